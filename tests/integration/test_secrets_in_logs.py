"""Secrets never reach a log: `ldm api` and `ldm worker` as real processes at DEBUG level, on a Redis that wants a
password, serving keys from settings and from a key file; authenticated and refused calls over REST and gRPC, a
key rotation, /metrics with and without its token, and misconfigurations that make the CLI print an error. Then
every byte the processes wrote is searched for every key, the metrics token and the Redis password.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from service.auth import hash_key
from service.embedded import EmbeddedRedis, free_port
from tests.helpers import stop_process, wait_ready
from tests.integration.secure import Keys, bearer, grpc_auth, params, pb, pb_grpc

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
MODEL = "random:tiny-sd"


@dataclass
class Secrets:
    keys: Keys
    metrics_token: str
    redis_password: str

    def all(self) -> dict[str, str]:
        k = self.keys
        return {"alice's key": k.alice, "bob's key": k.bob, "a revoked key": k.revoked, "a wrong key": k.stranger,
                "the metrics token": self.metrics_token, "the Redis password": self.redis_password}


@dataclass
class Running:
    rest: str
    grpc_port: int
    key_file: Path
    logs: list[Path]


@pytest.fixture(scope="module")
def secret() -> Secrets:
    return Secrets(Keys.fresh(), "mt_" + secrets.token_urlsafe(24), "pw" + secrets.token_hex(16))


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory, secret: Secrets) -> Iterator[str]:
    """A private Redis that wants a password; its URL with the password in it."""
    with EmbeddedRedis(tmp_path_factory.mktemp("locked-redis"), port=0, password=secret.redis_password) as server:
        yield f"redis://:{secret.redis_password}@127.0.0.1:{server.port}/0"


def ldm(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "--log-level", "DEBUG", *args]


def environment(url: str, secret: Secrets, key_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update(LDM_REDIS_URL=url, LDM_API_KEY_HASHES=hash_key(secret.keys.bob), LDM_API_KEY_FILE=str(key_file),
               LDM_METRICS_TOKEN_HASH=hash_key(secret.metrics_token), LDM_DEFAULT_MODEL=MODEL,
               LDM_HEARTBEAT_INTERVAL_S="0.5", LDM_WORKER_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    return {**env, **extra}


@pytest.fixture(scope="module")
def running(locked_redis: str, secret: Secrets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`ldm api` and `ldm worker`, logs to files, until the module's tests are done."""
    folder = tmp_path_factory.mktemp("secret-logs")
    key_file = folder / "api-keys"
    key_file.write_text(f"{hash_key(secret.keys.alice)} alice\nrevoked {hash_key(secret.keys.revoked)} old\n")
    rest, grpc_port = free_port(), free_port()
    env = environment(locked_redis, secret, key_file, LDM_REST_PORT=str(rest), LDM_GRPC_PORT=str(grpc_port))
    logs = [folder / "api.log", folder / "worker.log"]
    procs = []
    for log, args in zip(logs, (ldm("api"), ldm("worker", "--model", MODEL)), strict=True):
        with log.open("wb") as sink:
            procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT))
    base = f"http://127.0.0.1:{rest}"
    try:
        wait_ready(lambda path: httpx.get(f"{base}{path}", timeout=2), 120, procs=procs,
                   log=lambda: "\n".join(log.read_text() for log in logs))
        yield Running(base, grpc_port, key_file, logs)
    finally:
        for proc in procs:
            stop_process(proc)


def test_no_key_token_or_password_appears_in_any_log(running: Running, secret: Secrets, locked_redis: str,
                                                     tmp_path: Path) -> None:
    k = secret.keys
    with httpx.Client(base_url=running.rest, timeout=60) as client:
        made = client.post("/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 1,
                                                "width": 64, "height": 64}, headers=bearer(k.alice))
        assert made.status_code == 200 and made.content[:4] == b"\x89PNG"
        for headers, status in ((bearer(k.stranger), 401), (bearer(k.revoked), 403),
                                ({"Authorization": f"Basic {k.alice}"}, 401), ({}, 401)):
            assert client.post("/v1/jobs", json={"prompt": "x"}, headers=headers).status_code == status
        assert client.get("/metrics", headers=bearer(k.bob)).status_code == 401
        assert "ldm_auth_failures_total" in client.get("/metrics", headers=bearer(secret.metrics_token)).text
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            stub = pb_grpc.DiffusionStub(channel)
            reply = stub.Generate(pb.GenerateRequest(parameters=params()), metadata=grpc_auth(k.bob), timeout=60)
            assert reply.images[0].png[:4] == b"\x89PNG"
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(parameters=params()), metadata=grpc_auth(k.stranger), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        running.key_file.write_text(f"revoked {hash_key(k.alice)} alice\n")  # rotation: logged, by digest only
        deadline = time.monotonic() + 10
        while client.get("/v1/models", headers=bearer(k.alice)).status_code != 403:
            assert time.monotonic() < deadline, "the key file was not re-read"
            time.sleep(0.2)

    # misconfigurations: the CLI's error names the setting, never the value
    bad = tmp_path / "bad-keys"
    bad.write_text(f"{k.alice}\n")  # a plain key where a digest belongs
    errors = [subprocess.run(ldm("api"), env=environment(locked_redis, secret, bad, **extra), cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
              for extra in ({}, {"LDM_API_KEY_HASHES": k.bob}, {"LDM_METRICS_TOKEN_HASH": secret.metrics_token})]
    assert all(e.returncode == 2 for e in errors), [e.stderr for e in errors]
    assert "line 1: expected" in errors[0].stderr and "not SHA-256 hex digests" in errors[1].stderr

    logs = "\n".join(log.read_text(errors="replace") for log in running.logs)
    logs += "\n".join(e.stdout + e.stderr for e in errors)
    for what in ("authentication: API keys (2 active)", "event=api_keys_reloaded", "worker_started",
                 "job_succeeded"):
        assert what in logs, f"the captured logs lack {what!r}: is anything captured at all?"
    leaked = [name for name, value in secret.all().items() if value in logs]
    assert leaked == []
