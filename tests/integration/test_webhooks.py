"""Webhooks against real parts: uvicorn (whose app runs the delivery loop), the test Redis, and a real HTTP receiver
on loopback that checks signatures itself (HMAC per the Standard Webhooks convention, not our code). Jobs end by
being cancelled while queued, so no worker is needed: a cancelled job's terminal event is delivered like any."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.config import Settings
from tests.integration.test_rest import FAST, TXT, Api, serving

pytestmark = pytest.mark.timeout(60)
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Receiver:
    url: str
    fail_first: int
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def verified(self, headers: dict[str, str], body: bytes) -> bool:
        key = base64.b64decode(SECRET.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        return f"v1,{expected}" in headers["webhook-signature"].split()


@contextlib.contextmanager
def receiving(fail_first: int = 0) -> Iterator[Receiver]:
    """An HTTP server on loopback that records every POST and answers 500 to the first `fail_first`."""
    receiver = Receiver("", fail_first)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers["content-length"]))
            receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(500 if len(receiver.calls) <= receiver.fail_first else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Api]]:
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serving(make_settings(**{
            **FAST, "webhook_secret": SECRET, "webhook_backoff_s": 0.2, **overrides})))


def until(predicate: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def metric(app: Api, outcome: str) -> float:
    line = f'ldm_webhook_deliveries_total{{outcome="{outcome}"}} '
    found = [ln for ln in app.client.get("/metrics").text.splitlines() if ln.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_a_failing_receiver_gets_the_signed_terminal_event_on_the_third_attempt(api: Callable[..., Api]) -> None:
    with receiving(fail_first=2) as receiver:
        app = api(webhook_allowed_hosts=("127.0.0.1",))
        job = app.client.post("/v1/jobs", json={**TXT, "webhook_url": receiver.url}).json()
        assert app.client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        until(lambda: len(receiver.calls) >= 3 and metric(app, "delivered") == 1)
        time.sleep(0.5)
        assert len(receiver.calls) == 3  # delivered once answered 2xx, then never again
        assert (metric(app, "failed"), metric(app, "dead")) == (2, 0)
        ids = {headers["webhook-id"] for headers, _ in receiver.calls}
        assert ids == {f"{job['id']}.cancelled"}  # one event: the same id on every retry
        for headers, body in receiver.calls:
            assert receiver.verified(headers, body)
            event = json.loads(body)
            assert event["type"] == "job.cancelled" and event["data"]["id"] == job["id"]
            assert event["data"]["status"] == "cancelled" and event["data"]["links"]["self"] == f"/v1/jobs/{job['id']}"
            assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30


def test_hosts_outside_the_allow_list_are_refused_and_get_nothing(make_settings: Callable[..., Settings]) -> None:
    def settings(*allowed: str) -> Settings:  # one server at a time: replicas share one configuration
        return make_settings(**FAST, webhook_secret=SECRET, webhook_allowed_hosts=allowed)

    with receiving() as receiver:
        with serving(settings("hooks.example.com", ".example.org")) as public_only:
            resp = public_only.client.post("/v1/jobs", json={**TXT, "webhook_url": receiver.url})
            assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "webhook_url"]
            assert "not in this server's allow-list" in resp.json()["message"]
        with serving(settings()) as off:
            resp = off.client.post("/v1/txt2img", json={**TXT, "webhook_url": receiver.url})
            assert resp.status_code == 422 and "webhooks are off" in resp.json()["message"]
        # a listed *name* that resolves to a loopback address: accepted at submission, refused at delivery
        with serving(settings("localhost")) as by_name:
            url = receiver.url.replace("127.0.0.1", "localhost")
            job = by_name.client.post("/v1/jobs", json={**TXT, "webhook_url": url}).json()
            by_name.client.delete(f"/v1/jobs/{job['id']}")
            until(lambda: metric(by_name, "dead") == 1)
            assert metric(by_name, "refused") == 1 and receiver.calls == []
            credentials = by_name.client.post("/v1/jobs", json={**TXT, "webhook_url": "http://u:p@localhost/x"})
            assert credentials.status_code == 422 and "credentials" in credentials.json()["message"]


def assert_one_signed_cancellation(receiver: Receiver, job_id: str) -> None:
    """Exactly one delivery, signed, of the job's cancellation."""
    assert len(receiver.calls) == 1
    headers, body = receiver.calls[0]
    assert receiver.verified(headers, body) and headers["webhook-id"] == f"{job_id}.cancelled"
    event = json.loads(body)
    assert event["type"] == "job.cancelled" and event["data"]["id"] == job_id


def test_the_openai_route_takes_webhook_url_as_an_extra_body_field(api: Callable[..., Api]) -> None:
    with receiving() as receiver:
        app = api(webhook_allowed_hosts=("127.0.0.1",))
        refused = app.client.post("/v1/images/generations", json={
            "prompt": "a red circle", "size": "64x64", "webhook_url": "http://elsewhere.example.net/hook"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_url"  # OpenAI: 400
        assert "allow-list" in refused.json()["error"]["message"] and receiver.calls == []
        # no worker: the wait times out (504 with the job id), the job stays queued until we cancel it
        waited = app.client.post("/v1/images/generations", params={"timeout": 0.3}, json={
            "prompt": "a red circle", "size": "64x64", "steps": 2, "webhook_url": receiver.url})
        assert waited.status_code == 504, waited.text
        job_id = waited.headers["location"].rsplit("/", 1)[-1]
        assert app.client.delete(f"/v1/jobs/{job_id}").status_code == 200
        until(lambda: metric(app, "delivered") == 1)
        assert_one_signed_cancellation(receiver, job_id)


@pytest.mark.anyio
async def test_grpc_takes_webhook_url_in_its_parameters(make_settings: Callable[..., Settings]) -> None:
    """The gRPC server queues the registration; the REST process beside it (as `ldm serve` runs them) delivers."""
    import grpc  # noqa: PLC0415 (the stubs are a build output: imported once they are built)

    from service.api import proto_build  # noqa: PLC0415
    proto_build.ensure()
    from service.api.grpc import JOB_ID_METADATA, bound_port, create_grpc_server, stop_grpc  # noqa: PLC0415
    from service.api.grpc.stubs import pb, pb_grpc  # noqa: PLC0415

    settings = make_settings(**FAST, webhook_secret=SECRET, webhook_backoff_s=0.2, grpc_port=0,
                             webhook_allowed_hosts=("127.0.0.1",))
    with receiving() as receiver, serving(settings) as app:
        server = create_grpc_server(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{bound_port(server)}") as channel:
                stub = pb_grpc.DiffusionStub(channel)
                params = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2}
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
                        **params, webhook_url="http://elsewhere.example.net/hook")), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "parameters.webhook_url" in (refused.value.details() or "")
                # no worker: the call's deadline passes; with an idempotency key its job stays queued (no deadline of
                # its own to race with) until CancelJob ends it, and that terminal event is delivered
                call = stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
                    **params, webhook_url=receiver.url), idempotency_key="hooked"), timeout=1.0)
                job_id = dict(await call.initial_metadata())[JOB_ID_METADATA]
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await call
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10)
                deadline = time.monotonic() + 20
                while metric(app, "delivered") < 1:
                    assert time.monotonic() < deadline, "the webhook was not delivered"
                    await asyncio.sleep(0.1)
        finally:
            await stop_grpc(server, 0)
        assert_one_signed_cancellation(receiver, job_id)
