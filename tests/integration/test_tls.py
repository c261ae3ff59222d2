"""TLS on both front ends (issue 16, item 7), as `ldm api` / `ldm serve` run them (`run_front_ends`): a certificate
made in the test, an https round trip with httpx trusting only that certificate, a gRPC round trip over a secure
channel with it as the root, and plain-text clients refused. The settings refuse half a TLS configuration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from service.config import Settings
from service.embedded import free_port
from service.serve import run_front_ends
from service.tls import tls_files
from tests.integration.secure import TXT, Keys, bearer, grpc_auth, pb, pb_grpc
from tests.tls import Certificate, self_signed

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def front_ends(settings: Settings) -> Iterator[None]:
    """REST and gRPC of `settings` on one loop in a thread (what `ldm api` runs), until the block ends."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(run_front_ends(settings, stop=stop))
        except BaseException as exc:  # surfaced by the waiting test below
            failed.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="front-ends", daemon=True)
    thread.start()
    try:
        yield
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        assert not failed, failed


def wait_https(url: str, certificate: Certificate) -> httpx.Response:
    for _ in range(200):
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(url, verify=str(certificate.cert), timeout=2)
        threading.Event().wait(0.05)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return self_signed(tmp_path / "tls")


def test_rest_and_grpc_round_trip_over_tls_and_refuse_plain_text(
        make_settings: Callable[..., Settings], certificate: Certificate) -> None:
    keys = Keys.fresh()
    rest, grpc_port = free_port(), free_port()
    settings = make_settings(rest_port=rest, grpc_port=grpc_port, tls_cert_file=certificate.cert,
                             tls_key_file=certificate.key, **keys.settings())
    with front_ends(settings):
        base = f"https://localhost:{rest}"
        assert wait_https(f"{base}/healthz", certificate).status_code == 200
        with httpx.Client(base_url=base, verify=str(certificate.cert), timeout=10) as client:
            submitted = client.post("/v1/jobs", json=TXT, headers=bearer(keys.alice))
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            assert client.get(f"/v1/jobs/{job_id}", headers=bearer(keys.alice)).json()["id"] == job_id
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{rest}/healthz", timeout=2)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(f"{base}/healthz", timeout=2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env.update(PYTHONPATH=str(ROOT), LDM_REST_PORT=str(rest), LDM_TLS_CERT_FILE=str(certificate.cert),
                   LDM_TLS_KEY_FILE=str(certificate.key))
        probe = subprocess.run([sys.executable, str(ROOT / "deploy/docker/healthcheck.py")], env=env,
                               capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode == 0 and f"healthy: https://127.0.0.1:{rest}/healthz" in probe.stdout, probe.stderr

        credentials = grpc.ssl_channel_credentials(root_certificates=certificate.cert.read_bytes())
        with grpc.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
            job = pb_grpc.DiffusionStub(channel).GetJob(pb.GetJobRequest(job_id=job_id), metadata=grpc_auth(keys.alice),
                                                        timeout=10)
            assert job.id == job_id  # the job REST accepted, read over gRPC with TLS
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as plain, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_half_a_tls_configuration_or_a_missing_file_is_refused(tmp_path: Path, certificate: Certificate) -> None:
    with pytest.raises(ValidationError, match="set both tls_cert_file and tls_key_file"):
        Settings(redis_url="redis://127.0.0.1:1/0", tls_cert_file=certificate.cert)
    missing = Settings(redis_url="redis://127.0.0.1:1/0", tls_cert_file=certificate.cert,
                       tls_key_file=tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="LDM_TLS_KEY_FILE .*nope.pem: no such file"):
        tls_files(missing)


def test_keys_served_beyond_loopback_without_tls_are_warned_about(
        make_settings: Callable[..., Settings], certificate: Certificate, caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys.fresh().settings()
    for tls, warned in (({}, True), ({"tls_cert_file": certificate.cert, "tls_key_file": certificate.key}, False)):
        caplog.clear()
        rest = free_port()
        settings = make_settings(rest_host="0.0.0.0", rest_port=rest, grpc_port=free_port(), **keys, **tls)
        with caplog.at_level("WARNING", logger="service.serve"), front_ends(settings):
            scheme = "https" if tls else "http"
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    httpx.get(f"{scheme}://127.0.0.1:{rest}/healthz", verify=False, timeout=2)
                    break
                threading.Event().wait(0.05)
        assert any("event=plain_text_keys hosts=0.0.0.0" in r.getMessage() for r in caplog.records) == warned
