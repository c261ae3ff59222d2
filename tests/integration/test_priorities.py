"""Priorities, aging and queue positions against a real Redis: one stream per priority per model, read high before
normal before low, a lower stream first once its oldest job has aged past the bound; the consumer-group guarantees
(reclaim, dead letters) hold on every stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from service.config import Settings
from service.queue import GROUP, JobQueue, JobStatus, WorkerInfo
from service.schemas import GenerationRequest

pytestmark = pytest.mark.timeout(30)
MODEL = "tiny"


def req(**fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"model": MODEL, "prompt": "a red circle", "width": 64, "height": 64, "steps": 4,
                                "seed": 1, **fields})


async def claim_one(q: JobQueue, consumer: str = "w1") -> str:
    [claim] = await q.claim(MODEL, consumer, count=1, block_ms=50)
    return claim.job.id


@pytest.mark.anyio
async def test_claims_are_ordered_by_priority_then_by_arrival(queue: JobQueue) -> None:
    low = await queue.submit(req(priority="low"))
    normal1 = await queue.submit(req())
    high = await queue.submit(req(priority="high"))
    normal2 = await queue.submit(req())
    assert await queue.redis.xlen(queue.keys.stream(MODEL, "high")) == 1  # one stream per priority
    assert [await claim_one(queue) for _ in range(4)] == [high.id, normal1.id, normal2.id, low.id]
    assert await queue.claim(MODEL, "w1", count=1, block_ms=20) == []


@pytest.mark.anyio
async def test_a_batch_claim_fills_from_the_next_priority(queue: JobQueue) -> None:
    low = await queue.submit(req(priority="low"))
    high = await queue.submit(req(priority="high"))
    claims = await queue.claim(MODEL, "w1", count=8, block_ms=50)
    assert [c.job.id for c in claims] == [high.id, low.id]


@pytest.mark.anyio
async def test_aging_lets_a_waiting_low_job_go_before_newer_high_ones(
        make_settings: Callable[..., Settings]) -> None:
    async with JobQueue(make_settings(priority_aging_s=0.4)) as q:
        low = await q.submit(req(priority="low"))
        fresh_high = await q.submit(req(priority="high"))
        assert await claim_one(q) == fresh_high.id  # not aged yet: high first
        await asyncio.sleep(0.85)  # > 2 x aging: the low job now ranks with high jobs, by age
        newer = [await q.submit(req(priority="high")) for _ in range(3)]
        assert await claim_one(q) == low.id
        assert [await claim_one(q) for _ in range(3)] == [j.id for j in newer]


@pytest.mark.anyio
async def test_a_steady_stream_of_high_jobs_does_not_starve_a_low_one(make_settings: Callable[..., Settings]) -> None:
    """A worker taking one job at a time while a new high job arrives before each claim: the low job is taken within
    about 2 x aging_s, not never."""
    aging = 0.25
    async with JobQueue(make_settings(priority_aging_s=aging)) as q:
        await q.submit(req(priority="high"))
        low = await q.submit(req(priority="low"))
        began = time.monotonic()
        while True:
            await q.submit(req(priority="high"))
            taken = await claim_one(q)
            if taken == low.id:
                break
            assert time.monotonic() - began < 2 * aging + 1.0, "the low job starved"
            await asyncio.sleep(0.02)
        assert time.monotonic() - began >= aging  # and it did wait behind high work meanwhile


@pytest.mark.anyio
async def test_reclaim_stats_and_cancel_cover_every_priority_stream(queue: JobQueue) -> None:
    high = await queue.submit(req(priority="high"))
    low = await queue.submit(req(priority="low"))
    stats = await queue.stats(MODEL)
    assert (stats.depth, stats.waiting, stats.pending) == (2, 2, 0)
    [claim] = await queue.claim(MODEL, "dead-worker", count=1, block_ms=50)
    assert claim.job.id == high.id and (await queue.stats(MODEL)).pending == 1
    [taken] = await queue.reclaim(MODEL, "w2", min_idle_ms=0)  # its worker went silent
    assert taken.job.id == high.id and taken.attempt == 2
    [started] = await queue.start([taken])
    assert await queue.finish(started, [b"png"])
    pending = await queue.redis.xpending(queue.keys.stream(MODEL, "high"), GROUP)
    assert pending["pending"] == 0 and await queue.redis.xlen(queue.keys.stream(MODEL, "high")) == 0
    assert await queue.cancel(low.id) == JobStatus.cancelled
    assert await queue.redis.xlen(queue.keys.stream(MODEL, "low")) == 0
    assert (await queue.stats(MODEL)).depth == 0


@pytest.mark.anyio
async def test_queue_position_decreases_as_jobs_ahead_finish(queue: JobQueue) -> None:
    jobs = [await queue.submit(req(steps=10)) for _ in range(3)]
    mine = await queue.submit(req(steps=10))
    place = await queue.place(mine)
    assert place is not None and place.queue_position == 3 and place.eta_s is None  # no worker measured a rate
    recorded = await queue.get(mine.id)
    assert recorded is not None and recorded.ahead_at_submit == 3  # ldm_queue_position_at_claim observes it
    await queue.heartbeat(WorkerInfo(id="w1", models=[MODEL], step_rate=20.0, steps_in_hand=0))
    seen = []
    for job in jobs:
        place = await queue.place(mine)
        assert place is not None and place.eta_s is not None
        seen.append((place.queue_position, place.eta_s))
        [claim] = await queue.claim(MODEL, "w1", count=1, block_ms=50)
        assert claim.job.id == job.id
        [started] = await queue.start([claim])
        assert await queue.finish(started, [b"png"])
    final = await queue.place(mine)
    assert final is not None
    seen.append((final.queue_position, final.eta_s))
    assert [p for p, _ in seen] == [3, 2, 1, 0]
    assert [eta for _, eta in seen] == [2.0, 1.5, 1.0, 0.5]  # (10 steps x jobs ahead + its own 10) / 20 per s
    assert (await queue.get(mine.id)) is not None
    with_place = await queue.with_place(mine)
    assert with_place.queue_position == 0 and with_place.eta_s == 0.5


@pytest.mark.anyio
async def test_position_counts_higher_priorities_and_work_in_hand(queue: JobQueue) -> None:
    mine = await queue.submit(req(steps=10))
    await queue.submit(req(priority="low", steps=50))  # behind it: not counted
    await queue.submit(req(priority="high", steps=30, n=2))  # ahead of it although submitted later
    await queue.heartbeat(WorkerInfo(id="w1", models=[MODEL], step_rate=10.0, steps_in_hand=40))
    place = await queue.place(mine)
    assert place is not None and place.queue_position == 1
    assert place.eta_s == (30 * 2 + 40 + 10) / 10
    [claim] = await queue.claim(MODEL, "w1", count=1, block_ms=50)
    assert claim.job.request.priority == "high"
    assert (claim.job.ahead_at_submit, mine.ahead_at_submit) == (0, 0)  # ldm_queue_position_at_claim observes it
    assert (await queue.get(mine.id)).ahead_at_submit == 0  # type: ignore[union-attr]
    [running] = await queue.start([claim])
    assert await queue.place(running.job) is None  # running: no place
    later = await queue.place(mine)
    assert later is not None and later.queue_position == 0


@pytest.mark.anyio
async def test_queue_metrics_count_every_priority_stream(queue: JobQueue) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from service.metrics import register_queue_collector

    await queue.submit(req(model="only-high", priority="high"))  # a model whose only stream is its high one
    await queue.submit(req(priority="low"))
    await queue.submit(req())
    registry = CollectorRegistry()
    collector = register_queue_collector(registry)
    await collector.refresh(queue)
    text = generate_latest(registry).decode()
    assert 'ldm_queue_depth{model="only-high"} 1.0' in text and f'ldm_queue_depth{{model="{MODEL}"}} 2.0' in text
