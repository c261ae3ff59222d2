"""Webhooks against real parts: uvicorn (whose app runs the delivery loop), the test Redis, and a real HTTP receiver
on loopback that checks signatures itself (HMAC per the Standard Webhooks convention, not our code). Jobs end by
being cancelled while queued, so no worker is needed: a cancelled job's terminal event is delivered like any."""

from __future__ import annotations

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
