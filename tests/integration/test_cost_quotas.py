"""Cost-aware quotas over REST (real uvicorn) and gRPC (real grpc.aio) against the test Redis: a key's budget of
work (images x pixels x steps) and its cap on stored result bytes, each 429 / RESOURCE_EXHAUSTED with Retry-After,
counted, and never in the way of another key.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from service.auth import Authenticator
from service.config import Settings
from service.queue import JobQueue, SyncJobQueue
from service.quotas import Quotas, work_units
from service.schemas import GenerationRequest
from tests.integration.secure import TXT, Keys, bearer, grpc_auth, grpc_serving, metric, params, pb, queued
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(60)
MODEL = "tiny-shapes"
#: 8 images of 1024x1024 at 10 steps: 80 work units
LARGE = {**TXT, "n": 8, "width": 1024, "height": 1024, "steps": 10}
SMALL = {**TXT, "n": 1, "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def keys() -> Keys:
    return Keys.fresh()


@pytest.fixture
def api(make_settings: Callable[..., Settings], keys: Keys) -> Iterator[Callable[..., Api]]:
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serving(make_settings(**{**keys.settings(), **overrides})))


def submit(app: Api, key: str, body: dict[str, object], **headers: str) -> httpx.Response:
    return app.client.post("/v1/jobs", json=body, headers={**bearer(key), **headers})


def test_work_units_are_images_times_pixels_times_steps() -> None:
    assert work_units(GenerationRequest(**LARGE)) == 80
    assert work_units(GenerationRequest(**SMALL)) == 64 * 64 * 2 / 2**20
    assert work_units(GenerationRequest(prompt="x", steps=4)) == 512 * 512 * 4 / 2**20  # size left to the model


def test_a_flood_of_large_requests_is_held_at_the_budget_and_another_key_is_not(
        api: Callable[..., Api], keys: Keys) -> None:
    """A burst of 200 units and a trickle of refill: of ten 80-unit requests two are queued and eight refused with
    429 `work_budget_exceeded`, whose Retry-After is the time to refill the missing units; meanwhile another key's
    small requests are all accepted. What a refused submission spent comes back; an Idempotency-Key resend costs
    nothing; a request larger than the whole burst is accepted from a full bucket only."""
    rate = 0.01
    app = api(key_work_per_s=rate, key_work_burst=200, key_rate_burst=40)
    flood, small = [], []
    for _ in range(10):
        flood.append(submit(app, keys.alice, LARGE))
        small.append(submit(app, keys.bob, SMALL))
    assert [r.status_code for r in flood] == [202, 202] + [429] * 8
    assert {r.status_code for r in small} == {202}
    refused = flood[2]
    assert refused.json()["detail"].startswith("this request costs 80 work units")
    assert math.ceil((80 - 40) / rate) - 5 <= int(refused.headers["Retry-After"]) <= math.ceil((80 - 40) / rate)
    assert queued(app.settings, MODEL) == 12

    bad = submit(app, keys.alice, {**SMALL, "n": 8, "width": 1024, "height": 1024, "steps": 4,
                                   "guidance_scale": 99})  # 32 units, refused by admission after the spend
    assert bad.status_code == 422
    assert submit(app, keys.alice, {**SMALL, "n": 8, "width": 1024, "height": 1024, "steps": 4}).status_code == 202
    assert submit(app, keys.alice, SMALL).status_code == 202  # 8 - 0.008 units left: a small one still fits
    first = submit(app, keys.bob, LARGE, **{"Idempotency-Key": "bobs-large"})  # bob: ~200 -> ~120
    assert first.status_code == 202
    assert submit(app, keys.bob, LARGE).status_code == 202  # ~40 left: too little for another 80
    resend = submit(app, keys.bob, LARGE, **{"Idempotency-Key": "bobs-large"})
    assert resend.status_code == 202 and resend.json()["id"] == first.json()["id"]  # the same job, free

    huge = {**LARGE, "steps": 40}  # 320 units, more than the burst: only from a full bucket, and bob's is not
    assert submit(app, keys.bob, huge).status_code == 429
    assert metric(app.client, 'ldm_quota_rejections_total{front_end="rest",quota="work"}') == 9  # 8 + huge


def test_a_request_larger_than_the_burst_runs_from_a_full_bucket_and_leaves_it_in_debt(
        make_settings: Callable[..., Settings], keys: Keys) -> None:
    settings = make_settings(**keys.settings(), key_work_per_s=0.01, key_work_burst=200)
    with serving(settings) as app:
        assert submit(app, keys.alice, {**LARGE, "steps": 40}).status_code == 202  # 320 units
        small = submit(app, keys.alice, SMALL)
        assert small.status_code == 429 and int(small.headers["Retry-After"]) > 100 / 0.01  # 120 in debt


@pytest.mark.anyio
async def test_grpc_answers_an_exhausted_work_budget_with_resource_exhausted(
        make_settings: Callable[..., Settings], keys: Keys) -> None:
    settings = make_settings(**keys.settings(), key_work_per_s=0.01, key_work_burst=100)
    async with grpc_serving(settings) as env:
        big = params(n=8, width=1024, height=1024, steps=10)  # 80 units: the second finds 20 left
        calls = [env.stub.Generate(pb.GenerateRequest(parameters=big), metadata=grpc_auth(keys.alice), timeout=3)
                 for _ in range(2)]
        errors = []
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            errors.append(caught.value)
        codes = sorted(e.code().name for e in errors)
        assert codes == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]  # one queued (no worker: it waits), one refused
        exhausted = next(e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "work units" in exhausted.details()
        assert dict(exhausted.trailing_metadata() or ())["retry-after"] == str(math.ceil(60 / 0.01))
    assert env.metrics.registry.get_sample_value("ldm_quota_rejections_total",
                                                 {"front_end": "grpc", "quota": "work"}) == 1


def finish_next(settings: Settings, blob: bytes) -> None:
    """Play a worker: claim the oldest queued job and finish it with one result of `blob`."""
    with SyncJobQueue(settings) as q:
        claims = q.start(q.claim(MODEL, "test-worker", count=1, block_ms=100))
        assert len(claims) == 1 and q.finish(claims[0], [blob])


@pytest.mark.anyio
async def test_stored_result_bytes_are_capped_per_key_until_they_expire(
        make_settings: Callable[..., Settings], keys: Keys) -> None:
    """Two finished jobs of 6000 bytes each put a key over its 10000-byte cap: its next submission is 429
    `storage_quota_exceeded` with a Retry-After no later than the results' expiry, another key's is accepted; once
    the results expire, the key is accepted again and its count is back to 0."""
    settings = make_settings(**keys.settings(), key_max_stored_bytes=10_000, result_ttl_s=2)
    with serving(settings) as app:
        for _ in range(2):
            assert submit(app, keys.alice, SMALL).status_code == 202
            finish_next(settings, b"\x89PNG" + b"\0" * 5996)
        principal = Authenticator(settings).authenticate(f"Bearer {keys.alice}")
        quotas_queue = JobQueue(settings)
        try:
            assert await Quotas(quotas_queue).stored_bytes(principal) == 12_000
            over = submit(app, keys.alice, SMALL)
            assert over.status_code == 429 and "key_max_stored_bytes" in over.json()["detail"]
            assert 1 <= int(over.headers["Retry-After"]) <= 2
            assert submit(app, keys.bob, SMALL).status_code == 202
            time.sleep(2.1)
            assert submit(app, keys.alice, SMALL).status_code == 202
            assert await Quotas(quotas_queue).stored_bytes(principal) == 0
        finally:
            await quotas_queue.aclose()
        assert metric(app.client, 'ldm_quota_rejections_total{front_end="rest",quota="stored_bytes"}') == 1
