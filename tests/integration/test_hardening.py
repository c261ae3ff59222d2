"""Safe defaults of the front ends (issue 16, item 8), against a real uvicorn, grpc.aio and the test Redis:
reflection off once keys are configured (a setting turns it on), clients read a reason code and a short fixed
text (never Redis's address or a driver's message), job views carry no worker host, and `ldm api` refuses the
Kubernetes base's placeholder Redis password."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.grpc import SERVICE_NAME
from service.config import Settings
from service.embedded import EmbeddedRedis
from service.queue import SyncJobQueue
from tests.integration.secure import TXT, Keys, bearer, grpc_auth, grpc_serving, pb
from tests.integration.test_rest import serving

pytestmark = pytest.mark.timeout(60)


async def reflected_services(channel: grpc.aio.Channel) -> set[str] | grpc.StatusCode:
    """The services reflection lists, or the status code that refused the call.

    The request is written with `call.write`, not handed over as a request iterator: with an iterator, grpc.aio
    answers a call the server refuses at once with INTERNAL ("Internal error from Core") about 2 % of the time on
    a busy machine (the iterator's write races the server's status; grpc/grpc#36066), where `write` raises the
    server's own status."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=5)
    try:
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        reply = await call.read()
    except grpc.aio.AioRpcError as err:
        return err.code()
    if reply is grpc.aio.EOF:
        raise AssertionError(f"no reply: {await call.code()}")
    return {s.name for s in reply.list_services_response.service}


@pytest.mark.anyio
@pytest.mark.parametrize(("keys", "setting", "listed"), [(False, "auto", True), (True, "auto", False),
                                                         (True, "on", True), (False, "off", False)])
async def test_reflection_is_off_by_default_once_keys_are_configured(
        make_settings: Callable[..., Settings], keys: bool, setting: str, listed: bool) -> None:
    settings = make_settings(grpc_reflection=setting, **(Keys.fresh().settings() if keys else {}))
    async with grpc_serving(settings) as env:
        services = await reflected_services(env.channel)
    if listed:
        assert isinstance(services, set) and SERVICE_NAME in services
    else:
        assert services == grpc.StatusCode.UNIMPLEMENTED


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
async def test_a_redis_outage_answers_a_code_and_a_fixed_text_never_its_address(
        make_settings: Callable[..., Settings]) -> None:
    port = closed_port()
    settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_connect_timeout_s=0.2, redis_retries=0)
    leaks = (str(port), "127.0.0.1", "refused", "Error ")
    with serving(settings) as app:
        resp = app.client.post("/v1/jobs", json=TXT)
        assert resp.status_code == 503
        assert resp.json() == {"detail": "the job queue is unavailable; retry shortly", "code": "queue_unavailable"}
        ready = app.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "Redis unreachable"
        assert not [leak for leak in leaks if leak in resp.text + ready.text]
    async with grpc_serving(settings) as env:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.GetJob(pb.GetJobRequest(job_id="0" * 32), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "the job queue is unavailable; retry shortly"


@pytest.mark.anyio
async def test_errors_carry_a_reason_code_and_undecodable_bytes_no_parser_text(
        make_settings: Callable[..., Settings]) -> None:
    keys = Keys.fresh()
    settings = make_settings(**keys.settings())
    with serving(settings) as app:
        missing = app.client.get(f"/v1/jobs/{'a' * 32}", headers=bearer(keys.alice))
        assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"
        assert app.client.get("/v1/jobs/x", headers=bearer(keys.stranger)).json()["code"] == "invalid_api_key"
    async with grpc_serving(settings) as env:
        generate = env.channel.unary_unary(f"/{SERVICE_NAME}/Generate")  # raw bytes: no serializer
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(b"\xff\xff\xff\xff garbage", metadata=grpc_auth(keys.alice), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert details.startswith("request: the request bytes are not a valid message for /ldm.v1.Diffusion/Generate")
        assert "Error parsing" not in details and "truncated" not in details.lower()


def test_a_job_view_shows_no_worker_host(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    with serving(settings) as app, SyncJobQueue(settings) as queue:
        job_id = app.client.post("/v1/jobs", json=TXT).json()["id"]
        claims = queue.claim(settings.default_model, "gpu-host-7.internal-4242-ab12", count=1, block_ms=100)
        assert [c.job.id for c in claims] == [job_id]
        queue.start(claims)
        stored = queue.get(job_id)
        assert stored is not None and stored.worker == "gpu-host-7.internal-4242-ab12"  # the record has it ...
        view = app.client.get(f"/v1/jobs/{job_id}")
        assert view.json()["status"] == "running"
        assert "gpu-host" not in view.text and "worker" not in view.json()  # ... the client's view does not


def test_ldm_api_refuses_the_placeholder_redis_password_and_says_how() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update(LDM_REDIS_URL="redis://:change-me@127.0.0.1:1/0", LDM_REST_PORT="0", LDM_GRPC_PORT="0")
    done = subprocess.run([sys.executable, "-m", "service.cli", "api"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "placeholder Redis password" in done.stderr and "REDIS_PASSWORD" in done.stderr, done.stderr


def test_an_event_stream_cut_by_a_redis_outage_says_so_without_its_address(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", port=0) as server:  # TCP: the address the old text showed
        settings = make_settings(redis_url=server.url, redis_retries=0, redis_connect_timeout_s=0.2)
        with serving(settings) as app:
            job_id = app.client.post("/v1/jobs", json=TXT).json()["id"]
            lines: list[str] = []
            with app.client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    lines.append(line)
                    if line.startswith("id:") and server.running:  # the first event came: now Redis goes away
                        server.stop()
    text = "\n".join(lines)
    assert "event: error" in text, text
    error = json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))
    assert error == {"error": "the job queue is unavailable; reconnect with Last-Event-ID", "code": "queue_unavailable"}
    assert str(server.port) not in text and "127.0.0.1" not in text
