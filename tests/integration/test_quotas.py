"""Per-key quotas against the test Redis, over REST (real uvicorn) and gRPC (real grpc.aio): the submission rate
(token bucket) and the cap on jobs in flight, 429 / RESOURCE_EXHAUSTED with Retry-After, shared by replicas,
atomic under concurrent submissions, released by every way a job can end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from service import quotas as quotas_module
from service.auth import Authenticator, hash_key
from service.config import Settings
from service.queue import JobQueue, JobStatus
from service.quotas import QuotaExceeded, Quotas
from service.schemas import GenerationRequest
from tests.integration.secure import TXT, Keys, bearer, grpc_auth, grpc_serving, metric, params, pb, queued, redis_keys
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(60)
MODEL = "tiny-shapes"


@pytest.fixture
def keys() -> Keys:
    return Keys.fresh()


@pytest.fixture
def api(make_settings: Callable[..., Settings], keys: Keys) -> Iterator[Callable[..., Api]]:
    """start(**settings) -> an API with `keys` under uvicorn; every call shares this test's Redis prefix, so two
    calls are two replicas of one service."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serving(make_settings(**{**keys.settings(), **overrides})))


def submit(app: Api, key: str, **fields: object) -> httpx.Response:
    return app.client.post("/v1/jobs", json={**TXT, **fields}, headers=bearer(key))


def statuses(responses: list[httpx.Response]) -> list[int]:
    return [r.status_code for r in responses]


def concurrently(calls: list[Callable[[], httpx.Response]]) -> list[int]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return sorted(f.result().status_code for f in [pool.submit(c) for c in calls])


# ------------------------------------------------------------------------------------------------ rate

def test_rate_limit_is_per_key_with_retry_after_and_queues_nothing_beyond(api: Callable[..., Api], keys: Keys) -> None:
    app = api(key_rate_limit_per_s=0.5, key_rate_burst=3, key_max_jobs_in_flight=0)
    assert statuses([submit(app, keys.alice) for _ in range(3)]) == [202] * 3
    refused = submit(app, keys.alice)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"  # one token every 2 s
    assert refused.json()["detail"].startswith("rate limit of this API key exceeded (0.5 jobs/s, bursts of 3)")
    assert queued(app.settings, MODEL) == 3
    assert submit(app, keys.bob).status_code == 202  # another key, another bucket
    assert app.client.get("/v1/models", headers=bearer(keys.alice)).status_code == 200  # reads are free
    error = app.client.post("/v1/images/generations", json={"prompt": "x"}, headers=bearer(keys.alice))
    assert error.status_code == 429 and error.json()["error"]["code"] == "rate_limited"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{app.url}/v1", api_key=keys.alice, max_retries=0).images.generate(prompt="x")
    assert metric(app.client, 'ldm_quota_rejections_total{front_end="rest",quota="rate"}') == 3


def test_the_bucket_refills_at_the_configured_rate(api: Callable[..., Api], keys: Keys) -> None:
    app = api(key_rate_limit_per_s=4.0, key_rate_burst=1, key_max_jobs_in_flight=0)
    assert statuses([submit(app, keys.alice), submit(app, keys.alice)]) == [202, 429]
    time.sleep(0.3)  # > 1/4 s: one token back
    assert statuses([submit(app, keys.alice), submit(app, keys.alice)]) == [202, 429]


def test_replicas_share_one_bucket_and_spend_it_atomically(api: Callable[..., Api], keys: Keys) -> None:
    replicas = [api(key_rate_limit_per_s=0.01, key_rate_burst=5, key_max_jobs_in_flight=0) for _ in range(2)]
    calls = [lambda app=replicas[i % 2]: submit(app, keys.alice) for i in range(16)]
    assert concurrently(calls) == [202] * 5 + [429] * 11
    assert queued(replicas[0].settings, MODEL) == 5


# ------------------------------------------------------------------------------------------------ in flight

async def run_next(settings: Settings, job_id: str, how: str) -> None:
    """Play the worker for the next job on the queue, which must be `job_id`: finish it or fail it."""
    async with JobQueue(settings) as q:
        [claim] = await q.start(await q.claim(MODEL, "test-worker", count=1, block_ms=100))
        assert claim.job.id == job_id
        assert await (q.finish(claim, [b"png"]) if how == "finish" else q.fail(claim, "internal: test"))


@pytest.mark.anyio
async def test_jobs_in_flight_are_capped_per_key_and_freed_by_every_end(api: Callable[..., Api], keys: Keys) -> None:
    app = api(key_rate_limit_per_s=0, key_max_jobs_in_flight=2, queue_retry_after_s=3)
    a, b = (submit(app, keys.alice).json()["id"] for _ in range(2))
    refused = submit(app, keys.alice)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert refused.json()["detail"].startswith("this API key has 2 jobs in flight (queued or running), its limit of 2")
    bobs = submit(app, keys.bob).json()["id"]  # bob has his own cap
    assert app.client.delete(f"/v1/jobs/{a}", headers=bearer(keys.alice)).status_code == 200  # cancelled
    c = submit(app, keys.alice).json()["id"]
    assert submit(app, keys.alice).status_code == 429
    await run_next(app.settings, b, "finish")  # the queue now holds b, bob's, c
    d = submit(app, keys.alice, deadline_s=0.2).json()["id"]
    assert submit(app, keys.alice).status_code == 429
    await run_next(app.settings, bobs, "finish")
    await run_next(app.settings, c, "fail")
    await asyncio.sleep(0.3)
    async with JobQueue(app.settings) as q:  # d expires when a worker reaches it: it fails, unrun
        assert await q.claim(MODEL, "test-worker", count=1, block_ms=100) == []
        expired = await q.get(d)
        assert expired is not None and expired.status == JobStatus.failed
        assert (expired.error or "").startswith("deadline exceeded: not started within 0.2 s")
    assert statuses([submit(app, keys.alice), submit(app, keys.alice), submit(app, keys.alice)]) == [202, 202, 429]
    assert metric(app.client, 'ldm_quota_rejections_total{front_end="rest",quota="in_flight"}') == 4


def test_the_cap_holds_under_concurrent_submissions_to_two_replicas(api: Callable[..., Api], keys: Keys) -> None:
    replicas = [api(key_rate_limit_per_s=0, key_max_jobs_in_flight=3) for _ in range(2)]
    calls = [lambda app=replicas[i % 2]: submit(app, keys.alice) for i in range(12)]
    assert concurrently(calls) == [202] * 3 + [429] * 9
    assert queued(replicas[0].settings, MODEL) == 3


@pytest.mark.anyio
async def test_a_reservation_left_by_a_dead_api_lapses(make_settings: Callable[..., Settings], keys: Keys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotas_module, "RESERVATION_S", 1)
    settings = make_settings(**keys.settings(), key_max_jobs_in_flight=1)
    principal = Authenticator(settings).authenticate(f"Bearer {keys.alice}")
    async with JobQueue(settings) as queue:
        quotas = Quotas(queue)
        await quotas._reserve_slot(principal.key_id, "r-crashed-mid-submit", 1)  # reserved, never committed
        with pytest.raises(QuotaExceeded, match="1 jobs in flight"):
            await quotas.submit(principal, GenerationRequest(prompt="x"))
        await asyncio.sleep(1.1)
        job = await quotas.submit(principal, GenerationRequest(prompt="x"))
        assert await quotas.in_flight(principal) == 1 and job.status == JobStatus.queued


def test_without_keys_no_quota_applies(make_settings: Callable[..., Settings]) -> None:
    with serving(make_settings(key_rate_limit_per_s=0.01, key_rate_burst=1, key_max_jobs_in_flight=1)) as app:
        assert statuses([app.client.post("/v1/jobs", json=TXT) for _ in range(4)]) == [202] * 4


# ------------------------------------------------------------------------------------------------ gRPC

@pytest.mark.anyio
async def test_grpc_quotas_are_resource_exhausted_with_retry_after(make_settings: Callable[..., Settings],
                                                                    keys: Keys) -> None:
    settings = make_settings(**keys.settings(), key_rate_limit_per_s=0.1, key_rate_burst=2,
                             key_max_jobs_in_flight=1, queue_retry_after_s=5)
    async with grpc_serving(settings) as env:
        def generate(key: str, idem: str) -> grpc.aio.UnaryUnaryCall:
            return env.stub.Generate(pb.GenerateRequest(parameters=params(), idempotency_key=idem),
                                     metadata=grpc_auth(key), timeout=0.5)

        with pytest.raises(grpc.aio.AioRpcError) as err:  # accepted; no worker, so its deadline passes
            await generate(keys.alice, "first")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # kept for its idempotency key: 1 job in flight
            await generate(keys.alice, "second")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "jobs in flight" in (err.value.details() or "")
        assert dict(err.value.trailing_metadata() or ())["retry-after"] == "5"
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the burst of 2 is spent
            await generate(keys.alice, "third")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in (err.value.details() or "")
        assert 1 <= int(dict(err.value.trailing_metadata() or ())["retry-after"]) <= 10
        with pytest.raises(grpc.aio.AioRpcError) as err:  # reads spend nothing
            await env.stub.GetJob(pb.GetJobRequest(job_id="0" * 32), metadata=grpc_auth(keys.alice))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        sample = env.metrics.registry.get_sample_value
        assert sample("ldm_quota_rejections_total", {"front_end": "grpc", "quota": "rate"}) == 1
        assert sample("ldm_quota_rejections_total", {"front_end": "grpc", "quota": "in_flight"}) == 1
        assert queued(settings, MODEL) == 1


def test_quota_state_is_keyed_by_digest_prefix(api: Callable[..., Api], keys: Keys) -> None:
    app = api(key_max_jobs_in_flight=4)
    submit(app, keys.alice)
    quota_keys = [k for k in redis_keys(app.settings) if ":quota:" in k]
    prefix = hash_key(keys.alice)[:12]
    assert quota_keys and all(k.endswith(prefix) for k in quota_keys)
