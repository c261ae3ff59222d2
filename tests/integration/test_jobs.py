"""The job queue against a real Redis: the protocol's promises, one test each (DESIGN.md, "Job protocol")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.embedded import EmbeddedRedis, free_port
from service.queue import (
    GROUP,
    IdempotencyConflict,
    JobNotFound,
    JobQueue,
    JobStatus,
    QueueFull,
    QueueUnavailable,
    SyncJobQueue,
    WorkerInfo,
)
from service.schemas import GenerationRequest, Task

pytestmark = pytest.mark.timeout(30)
MODEL = "tiny"
PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 64


def req(**fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"model": MODEL, "prompt": "a red circle", "width": 64, "height": 64, "steps": 4,
                                "seed": 1, **fields})


async def pending_count(q: JobQueue, model: str = MODEL) -> int:
    return int((await q.redis.xpending(q.keys.stream(model), GROUP))["pending"])


@pytest.mark.anyio
async def test_submit_then_get_records_request_and_resolved_defaults(queue: JobQueue) -> None:
    job = await queue.submit(GenerationRequest(prompt="a cat", width=64, height=64))
    got = await queue.get(job.id)
    assert got is not None and got.id == job.id
    assert got.status == JobStatus.queued and got.attempts == 0 and got.started_at is None
    assert got.model == queue.settings.default_model == got.request.model
    assert got.request.seed is not None and got.request == job.request  # the random seed is recorded
    assert await queue.get("0" * 32) is None and await queue.get("not-an-id") is None


@pytest.mark.anyio
async def test_invalid_request_is_refused_and_nothing_is_queued(queue: JobQueue) -> None:
    with pytest.raises(ValidationError, match="width must be a multiple of 8"):
        await queue.submit(req(width=100))
    assert (await queue.stats(MODEL)).depth == 0


@pytest.mark.anyio
async def test_input_images_are_stored_beside_the_job_never_in_stream_or_record(queue: JobQueue) -> None:
    image, mask = PNG + b"image", PNG + b"mask"
    job = await queue.submit(req(task=Task.inpaint, image=image, mask=mask))
    assert await queue.inputs(job.id) == (image, mask)
    assert await queue.redis.pttl(queue.keys.input(job.id, "image")) > 0
    [(_, fields)] = await queue.redis.xrange(queue.keys.stream(MODEL))
    assert fields == {b"job": job.id.encode(), b"work": str(job.request.steps).encode()}  # work: for the ETA
    record = await queue.redis.hget(queue.keys.job(job.id), "request")
    assert b"image" not in record and b"mask" not in record
    [claim] = await queue.claim(MODEL, "w1")
    assert await queue.finish(claim, [PNG])
    assert await queue.inputs(job.id) == (None, None)  # dropped once the job ended


@pytest.mark.anyio
async def test_idempotency_key_answers_the_same_job_with_one_stream_entry(queue: JobQueue) -> None:
    first = await queue.submit(req(seed=None), idempotency_key="key-1")
    again = await queue.submit(req(seed=None), idempotency_key="key-1")
    assert again.id == first.id and again.request.seed == first.request.seed
    assert await queue.redis.xlen(queue.keys.stream(MODEL)) == 1
    other = await queue.submit(req(seed=None), idempotency_key="key-2")
    assert other.id != first.id
    with pytest.raises(IdempotencyConflict, match="different request"):
        await queue.submit(req(prompt="something else"), idempotency_key="key-1")


@pytest.mark.anyio
async def test_concurrent_submits_under_one_key_make_one_job(queue: JobQueue) -> None:
    jobs = await asyncio.gather(*(queue.submit(req(), idempotency_key="same") for _ in range(5)))
    assert len({j.id for j in jobs}) == 1
    assert await queue.redis.xlen(queue.keys.stream(MODEL)) == 1


@pytest.mark.anyio
async def test_idempotency_key_of_an_expired_job_starts_a_new_one(queue: JobQueue) -> None:
    first = await queue.submit(req(), idempotency_key="k")
    await queue.redis.delete(queue.keys.job(first.id))  # as if its record had expired
    second = await queue.submit(req(), idempotency_key="k")
    assert second.id != first.id and await queue.get(second.id) is not None
    assert (await queue.submit(req(), idempotency_key="k")).id == second.id


@pytest.mark.anyio
async def test_full_queue_refuses_with_retry_after_until_a_job_ends(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(queue_max_depth=2, queue_retry_after_s=7)) as q:
        await q.submit(req())
        await q.submit(req())
        with pytest.raises(QueueFull) as caught:
            await q.submit(req())
        assert caught.value.retry_after_s == 7 and caught.value.depth == 2 and caught.value.limit == 2
        other_model = await q.submit(req(model="other"))  # the limit is per model
        assert other_model.model == "other"
        [claim, _] = await q.claim(MODEL, "w1")
        await q.finish(claim, [PNG])
        await q.submit(req())


@pytest.mark.anyio
async def test_claim_takes_up_to_max_batch_and_waits_at_most_max_wait(
        make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(max_batch=3, max_wait_ms=150)) as q:
        ids = [(await q.submit(req(seed=i))).id for i in range(5)]
        first = await q.claim(MODEL, "w1")
        second = await q.claim(MODEL, "w1")
        assert [c.job.id for c in first] == ids[:3] and [c.job.id for c in second] == ids[3:]
        assert all(c.attempt == 1 and c.consumer == "w1" for c in first + second)
        t0 = time.monotonic()
        assert await q.claim(MODEL, "w1") == []
        assert 0.1 <= time.monotonic() - t0 < 1.0
        # a job arriving during the wait is returned at once
        waiting = asyncio.create_task(q.claim(MODEL, "w1", block_ms=1500))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        late = await q.submit(req())
        assert [c.job.id for c in await waiting] == [late.id]
        assert time.monotonic() - t0 < 0.5


@pytest.mark.anyio
async def test_a_claim_whose_reply_is_lost_gets_its_jobs_on_the_retry(
        make_settings: Callable[..., Settings]) -> None:
    """Redis ran the claim script but its reply never came (a timeout on a busy machine): the retry answers the jobs
    that try took, once, instead of leaving them pending until the visibility timeout."""
    async with JobQueue(make_settings(redis_backoff_s=0.01)) as q:
        ids = [(await q.submit(req(seed=i))).id for i in range(3)]
        script, calls = q._lua["claim"], 0

        async def reply_lost_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            reply = await script(*args, **kwargs)
            if calls == 1:
                raise RedisTimeoutError("Timeout reading from socket")
            return reply

        q._lua["claim"] = reply_lost_once  # a fake for a fault a test cannot time: the reply lost after the work
        claims = await q.claim(MODEL, "w1", count=2, block_ms=100)
        assert calls == 2 and [c.job.id for c in claims] == ids[:2]
        assert all(c.attempt == 1 and c.consumer == "w1" for c in claims)  # taken once, not counted twice
        assert [c.job.id for c in await q.start(claims)] == ids[:2]
        assert [c.job.id for c in await q.claim(MODEL, "w1", block_ms=100)] == ids[2:]  # a new call: new jobs only
        assert await pending_count(q) == 3


@pytest.mark.anyio
async def test_finish_stores_results_with_ttl_and_acks_only_then(queue: JobQueue) -> None:
    job = await queue.submit(req(n=2))
    [claim] = await queue.start(await queue.claim(MODEL, "w1"))
    assert (await queue.get(job.id)).status == JobStatus.running  # type: ignore[union-attr]
    assert await queue.progress([claim], 2, 4) == {}
    assert await pending_count(queue) == 1  # claimed, not acknowledged
    assert await queue.finish(claim, [PNG + b"0", PNG + b"1"])
    assert await pending_count(queue) == 0 and await queue.redis.xlen(queue.keys.stream(MODEL)) == 0
    assert [await queue.result(job.id, i) for i in range(3)] == [PNG + b"0", PNG + b"1", None]
    ttl_ms = await queue.redis.pttl(queue.keys.result(job.id, 0))
    assert 0 < ttl_ms <= queue.settings.result_ttl_s * 1000
    done = await queue.get(job.id)
    assert done is not None and done.status == JobStatus.succeeded and done.results == 2
    assert done.step == done.total == 4 and done.finished_at is not None
    assert await queue.finish(claim, [PNG + b"0", PNG + b"1"])  # a retried call is harmless


@pytest.mark.anyio
async def test_dead_workers_job_is_reclaimed_after_visibility_timeout(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(visibility_timeout_s=0.2)) as q:
        job = await q.submit(req())
        [a] = await q.start(await q.claim(MODEL, "worker-a"))  # worker A claims, starts, then dies
        assert await q.reclaim(MODEL, "worker-b") == []  # not idle long enough yet
        await asyncio.sleep(0.3)
        [b] = await q.reclaim(MODEL, "worker-b")
        assert b.job.id == job.id and b.attempt == 2 and b.job.status == JobStatus.queued
        assert [e.type for e in await q.events(job.id)][-1] == "requeued"
        # A comes back to life: it may neither report nor answer
        assert await q.progress([a], 3, 4) == {job.id: "lost"}
        assert not await q.finish(a, [PNG + b"from A"])
        assert await q.result(job.id, 0) is None
        [b] = await q.start([b])
        assert await q.finish(b, [PNG + b"from B"])
        assert await q.result(job.id, 0) == PNG + b"from B"
        assert await pending_count(q) == 0


@pytest.mark.anyio
async def test_progress_keeps_a_slow_job_from_being_taken_over(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(visibility_timeout_s=0.4)) as q:
        await q.submit(req())
        await q.submit(req())
        [running, waiting] = await q.claim(MODEL, "worker-a")
        [running] = await q.start([running])
        for step in range(10):  # 1 s of work, 2.5 times the visibility timeout
            await asyncio.sleep(0.1)
            assert await q.progress([running], step, 10) == {}
            assert await q.keepalive([waiting]) == {}
            assert await q.reclaim(MODEL, "worker-b") == []


@pytest.mark.anyio
async def test_job_out_of_attempts_goes_dead_and_others_still_run(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(visibility_timeout_s=0.1, max_attempts=2)) as q:
        doomed = await q.submit(req(prompt="crashes every worker"))
        fine = await q.submit(req(prompt="fine"))
        [first] = await q.claim(MODEL, "w1", count=1)
        assert first.job.id == doomed.id
        await asyncio.sleep(0.15)
        [second] = await q.reclaim(MODEL, "w2")
        assert second.attempt == 2
        await asyncio.sleep(0.15)
        assert await q.reclaim(MODEL, "w3") == []  # out of attempts: not handed out again
        dead = await q.get(doomed.id)
        assert dead is not None and dead.status == JobStatus.failed and dead.attempts == 2
        assert "2 attempts" in (dead.error or "")
        [letter] = await q.dead_letters()
        assert letter["job"] == doomed.id and letter["model"] == MODEL
        [claim] = await q.start(await q.claim(MODEL, "w3"))
        assert claim.job.id == fine.id and await q.finish(claim, [PNG])
        assert await pending_count(q) == 0 and await q.redis.xlen(q.keys.stream(MODEL)) == 0


@pytest.mark.anyio
async def test_cancel_queued_job_is_never_run(queue: JobQueue) -> None:
    cancelled, kept = await queue.submit(req()), await queue.submit(req())
    assert await queue.cancel(cancelled.id) == JobStatus.cancelled
    assert await queue.cancel(cancelled.id) == JobStatus.cancelled  # idempotent
    assert [c.job.id for c in await queue.claim(MODEL, "w1")] == [kept.id]
    record = await queue.get(cancelled.id)
    assert record is not None and record.status == JobStatus.cancelled and record.finished_at is not None
    assert (await queue.events(cancelled.id))[-1].type == "cancelled"
    with pytest.raises(JobNotFound):
        await queue.cancel("0" * 32)


@pytest.mark.anyio
async def test_cancel_of_claimed_but_not_started_job_is_skipped_by_start(queue: JobQueue) -> None:
    a, b = await queue.submit(req()), await queue.submit(req())
    claims = await queue.claim(MODEL, "w1")
    assert await queue.cancel(a.id) == JobStatus.cancelled
    assert [c.job.id for c in await queue.start(claims)] == [b.id]
    assert await pending_count(queue) == 1  # only b is still held


@pytest.mark.anyio
async def test_cancel_running_job_sets_a_flag_the_worker_reads(queue: JobQueue) -> None:
    job = await queue.submit(req())
    [claim] = await queue.start(await queue.claim(MODEL, "w1"))
    assert not await queue.is_cancelled(job.id)
    assert await queue.cancel(job.id) == JobStatus.running
    record = await queue.get(job.id)
    assert record is not None and record.status == JobStatus.running and record.cancel_requested
    assert await queue.is_cancelled(job.id)
    assert await queue.progress([claim], 1, 4) == {job.id: "cancel"}
    assert await queue.cancelled(claim)
    assert (await queue.get(job.id)).status == JobStatus.cancelled  # type: ignore[union-attr]
    assert await pending_count(queue) == 0
    assert [e.type for e in await queue.events(job.id)][-3:] == ["cancel_requested", "progress", "cancelled"]


@pytest.mark.anyio
async def test_events_come_in_order_and_resume_after_an_id(queue: JobQueue) -> None:
    job = await queue.submit(req())
    [claim] = await queue.start(await queue.claim(MODEL, "w1"))
    for step in (1, 2, 3):
        await queue.progress([claim], step, 4)
    await queue.finish(claim, [PNG])
    events = await queue.events(job.id)
    assert [e.type for e in events] == ["queued", "started", "progress", "progress", "progress", "succeeded"]
    assert [e.step for e in events[2:5]] == [1, 2, 3] and events[-1].results == 1 and events[-1].terminal
    assert await queue.events(job.id, events[2].id) == events[3:]
    assert await queue.events(job.id, events[-1].id) == []
    with pytest.raises(ValueError, match="event id"):
        await queue.events(job.id, "bogus")


@pytest.mark.anyio
async def test_blocking_events_read_and_wait_follow_a_live_job(queue: JobQueue) -> None:
    job = await queue.submit(req())
    [first] = await queue.events(job.id)
    reader = asyncio.create_task(queue.events(job.id, first.id, block_ms=2000))
    waiter = asyncio.create_task(queue.wait(job.id, timeout_s=5))
    await asyncio.sleep(0.05)
    [claim] = await queue.start(await queue.claim(MODEL, "w1"))
    assert [e.type for e in await reader] == ["started"]
    await queue.finish(claim, [PNG])
    done = await waiter
    assert done is not None and done.status == JobStatus.succeeded


@pytest.mark.anyio
async def test_heartbeat_registry_expires_silent_workers(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(heartbeat_interval_s=0.2)) as q:
        await q.heartbeat(WorkerInfo(id="w1", models=[MODEL], pid=1))
        await q.heartbeat(WorkerInfo(id="w2", models=["other"], pid=2))
        assert [w.id for w in await q.workers(MODEL)] == ["w1"]
        assert sorted(w.id for w in await q.workers()) == ["w1", "w2"]
        await q.deregister("w2")
        assert [w.id for w in await q.workers()] == ["w1"]
        await asyncio.sleep(0.8)  # over 3 intervals without a heartbeat
        assert await q.workers() == []
        assert await q.redis.zcard(q.keys.workers) == 0  # pruned


@pytest.mark.anyio
async def test_stats_report_depth_claimed_waiting_and_oldest_age(queue: JobQueue) -> None:
    empty = await queue.stats(MODEL)
    assert (empty.depth, empty.pending, empty.waiting, empty.oldest_waiting_age_s) == (0, 0, 0, 0.0)
    for _ in range(3):
        await queue.submit(req())
    await asyncio.sleep(0.05)
    await queue.claim(MODEL, "w1", count=1)
    stats = await queue.stats(MODEL)
    assert (stats.depth, stats.pending, stats.waiting) == (3, 1, 2)
    assert 0.04 <= stats.oldest_waiting_age_s < 5


@pytest.mark.anyio
async def test_job_not_started_before_its_deadline_fails(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(job_deadline_s=0.1)) as q:
        job = await q.submit(req())
        await asyncio.sleep(0.15)
        assert await q.claim(MODEL, "w1") == []
        record = await q.get(job.id)
        assert record is not None and record.status == JobStatus.failed and "deadline" in (record.error or "")


@pytest.mark.anyio
async def test_unreachable_redis_raises_queue_unavailable_quickly(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retries=2, redis_backoff_s=0.05)
    async with JobQueue(settings) as q:
        t0 = time.monotonic()
        with pytest.raises(QueueUnavailable):
            await q.submit(req())
        with pytest.raises(QueueUnavailable):
            await q.claim(MODEL, "w1")
        assert time.monotonic() - t0 < 3.0


def test_sync_queue_serves_a_worker_and_fails_fast_without_redis(make_settings: Callable[..., Settings]) -> None:
    with SyncJobQueue(make_settings()) as q:
        job = q.submit(req(n=2))
        claims = q.start(q.claim(MODEL, "w1"))
        assert [c.job.id for c in claims] == [job.id]
        assert q.progress(claims, 1, 4) == {} and not q.is_cancelled(job.id)
        assert q.finish(claims[0], [PNG, PNG])
        assert q.get(job.id).status == JobStatus.succeeded  # type: ignore[union-attr]
        assert q.result(job.id, 1) == PNG
    closed = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retries=1, redis_backoff_s=0.05)
    with SyncJobQueue(closed) as q:
        t0 = time.monotonic()
        with pytest.raises(QueueUnavailable):
            q.get("0" * 32)
        assert time.monotonic() - t0 < 3.0


@pytest.mark.anyio
async def test_embedded_redis_restart_keeps_an_accepted_job(data_dir: Path,
                                                            make_settings: Callable[..., Settings]) -> None:
    server = EmbeddedRedis(data_dir, port=free_port())
    server.start()
    try:
        async with JobQueue(make_settings(redis_url=server.url)) as q:
            job = await q.submit(req())
            server.stop()
            assert not server.running
            server.start()  # same folder, same port: the AOF brings the job back
            record = await q.get(job.id)  # the same client reconnects on its own
            assert record is not None and record.status == JobStatus.queued
            [claim] = await q.claim(MODEL, "w1")
            assert claim.job.id == job.id
    finally:
        server.stop()
    assert (data_dir / "redis.log").exists()


def test_second_embedded_redis_on_the_same_data_is_refused(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir), pytest.raises(RuntimeError, match="already runs"):
        EmbeddedRedis(data_dir).start()


@pytest.mark.anyio
async def test_a_job_no_worker_takes_fails_at_its_deadline_when_read(make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(job_deadline_s=30)) as q:
        claimed = await q.submit(req(), deadline_s=0.3)
        assert [c.job.id for c in await q.claim(MODEL, "w1")] == [claimed.id]
        waiting = await q.submit(req(), deadline_s=0.3)
        patient = await q.submit(req())  # the default deadline, 30 s
        first = await q.get(waiting.id)
        assert first is not None and first.status == JobStatus.queued
        await asyncio.sleep(0.4)
        # never delivered and past its deadline: failed on read, with its event, and gone from the stream
        record = await q.get(waiting.id)
        assert record is not None and record.status == JobStatus.failed
        assert (record.error or "").startswith("deadline exceeded: not started within 0.3 s")
        assert [e.type for e in await q.events(waiting.id)] == ["queued", "failed"]
        assert [c.job.id for c in await q.claim(MODEL, "w2", count=5)] == [patient.id]
        # delivered to a worker before its deadline: the worker decides, not a reader
        kept = await q.get(claimed.id)
        assert kept is not None and kept.status == JobStatus.queued and kept.attempts == 1
        # and a waiter sees the failure at once instead of waiting out its own timeout
        other = await q.submit(req(), deadline_s=0.2)
        began = time.monotonic()
        done = await q.wait(other.id, timeout_s=20)
        assert done is not None and done.status == JobStatus.failed and time.monotonic() - began < 3
