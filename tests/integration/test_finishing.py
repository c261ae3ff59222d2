"""Finishing jobs while the next batch runs (service/worker/finisher.py), in process on the test Redis
(`random:tiny-sd` at 64x64), static and continuous workers driven step by step.

A job whose images are decoded goes to the finisher: the worker's step returns while its PNGs are still encoding
(held here by a gate in `Runner.png`), the next job's batch runs meanwhile, and once the PNGs are made the job is
stored with the bytes a solo run makes. A PNG fault fails its job alone; Redis lost while a job is stored comes
back in the loop (its reset), and the job, still pending in Redis, is taken over and made again; a stop waits for
the jobs being finished; with LDM_WORKER_FINISH_OVERLAP=false a job is stored before the step returns.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service.config import Settings
from service.metrics import WorkerMetrics
from service.queue import Job, JobStatus, QueueUnavailable, SyncJobQueue
from service.worker.continuous import ContinuousWorker
from service.worker.process import Worker
from service.worker.runner import Runner, SampleInput
from tests.helpers import drop_keys, torch_threads, wait_until
from tests.integration.test_worker import MODEL, request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with torch_threads(1):
        yield Runner.load(MODEL, device="cpu")


@contextlib.contextmanager
def worker_on(runner: Runner, redis_url: str, batching: str = "static", **settings: Any,
              ) -> Iterator[tuple[Worker, SyncJobQueue]]:
    """A worker of `batching` on its own key prefix of the test Redis, driven by the test."""
    prefix = f"finish-{uuid.uuid4().hex[:8]}"
    config = Settings(**{"redis_url": redis_url, "key_prefix": prefix, "max_batch": 4, "max_wait_ms": 20,
                         "batching": batching, **settings})
    with SyncJobQueue(config) as queue:
        worker = (ContinuousWorker if batching == "continuous" else Worker)(
            config, queue, runner, WorkerMetrics(), f"w-{prefix}")
        try:
            yield worker, queue
        finally:
            worker.finisher.close()
            drop_keys(redis_url, prefix)


@contextlib.contextmanager
def gated_pngs(runner: Runner, monkeypatch: pytest.MonkeyPatch, seeds: set[int]) -> Iterator[threading.Event]:
    """`Runner.png` waits for the gate for samples of `seeds` (a slow encoder); the gate opens on leaving."""
    gate = threading.Event()
    real = runner.png

    def png(key: Any, sample: SampleInput, image: Any) -> bytes:
        if sample.seed in seeds:
            assert gate.wait(60), "the gate was never opened"
        return real(key, sample, image)

    monkeypatch.setattr(runner, "png", png)
    try:
        yield gate
    finally:
        gate.set()


def solo(runner: Runner, **fields: Any) -> bytes | None:
    r = request(**fields)
    return runner.run(runner.batch_key(r, None), [SampleInput(r, r.seed or 0)])[0]


def status(queue: SyncJobQueue, job: Job) -> JobStatus:
    record = queue.get(job.id)
    assert record is not None
    return record.status


def settle(worker: Worker) -> None:
    """Step until nothing is in hand (what the loop does)."""
    deadline = time.monotonic() + 60
    while worker.in_hand():
        assert time.monotonic() < deadline, "the worker did not settle"
        worker.step()


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_the_next_batch_runs_while_a_jobs_pngs_encode_and_the_pngs_are_the_solo_ones(
        runner: Runner, redis_url: str, monkeypatch: pytest.MonkeyPatch, batching: str) -> None:
    first_fields = {"seed": 51, "steps": 3, "sampler": "ddim"}
    second_fields = {"seed": 52, "steps": 2, "sampler": "ddim"}
    expected = [solo(runner, **first_fields), solo(runner, **second_fields)]
    with worker_on(runner, redis_url, batching) as (worker, queue), \
            gated_pngs(runner, monkeypatch, {51}) as gate:
        first = queue.submit(request(**first_fields))
        deadline = time.monotonic() + 60
        while len(worker.finisher) == 0:  # sampled and decoded, handed over
            assert time.monotonic() < deadline
            worker.step()
        assert status(queue, first) == JobStatus.running and worker.in_hand()  # its PNG is held at the gate
        second = queue.submit(request(**second_fields))
        while (queue.get(second.id) or second).step < 2:  # the second job's steps run meanwhile
            assert time.monotonic() < deadline
            worker.step()
        assert status(queue, first) == JobStatus.running
        gate.set()
        settle(worker)
        assert [status(queue, first), status(queue, second)] == [JobStatus.succeeded] * 2
        assert [queue.result(first.id, 0), queue.result(second.id, 0)] == expected
    scraped = worker.metrics.registry
    assert scraped.get_sample_value("ldm_finish_seconds_count", {"model": MODEL}) == 2


def test_a_png_fault_fails_its_job_alone_and_the_batch_mate_is_stored(
        runner: Runner, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    kept = solo(runner, seed=41, steps=2)
    real = runner.png

    def png(key: Any, sample: SampleInput, image: Any) -> bytes:
        if sample.seed == 42:
            raise ValueError("the encoder broke on /srv/tenant-b")
        return real(key, sample, image)

    monkeypatch.setattr(runner, "png", png)
    with worker_on(runner, redis_url) as (worker, queue):
        jobs = [queue.submit(request(seed=41, steps=2)), queue.submit(request(seed=42, steps=2))]
        with caplog.at_level("ERROR"):
            wait_until(lambda: (worker.step() or True) and not worker.in_hand()
                       and all(status(queue, j).terminal for j in jobs), 60, "the jobs to end")
        failed = queue.get(jobs[1].id)
        assert [status(queue, jobs[0]), failed and failed.status] == [JobStatus.succeeded, JobStatus.failed]
        assert queue.result(jobs[0].id, 0) == kept and queue.result(jobs[1].id, 0) is None
        assert failed is not None and failed.error and failed.error.startswith("internal")
        assert "tenant-b" not in failed.error
        incident = failed.error.split("incident ")[1][:8]
        assert any(incident in r.getMessage() and "png_error" in r.getMessage() for r in caplog.records)


def test_redis_lost_while_a_job_is_stored_reaches_the_loop_and_the_job_is_made_again(
        runner: Runner, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is the fault (Redis gone between two calls, faked: the real one stays up for the rest): the
    loop's next step raises it (`Worker.run` resets and retries there), the job is still pending in Redis, and
    after the visibility timeout it is taken over and stored with the same PNG."""
    expected = solo(runner, seed=61, steps=2)
    with worker_on(runner, redis_url, visibility_timeout_s=1.0) as (worker, queue):
        real = queue.finish

        def finish(*args: Any, **kwargs: Any) -> bool:
            raise QueueUnavailable("Redis call did not complete in 5 s")

        monkeypatch.setattr(queue, "finish", finish)
        job = queue.submit(request(seed=61, steps=2))
        with pytest.raises(QueueUnavailable):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                worker.step()
        assert status(queue, job) == JobStatus.running  # nothing stored, nothing lost: still pending
        worker.reset()
        assert not worker.in_hand()
        monkeypatch.setattr(queue, "finish", real)
        wait_until(lambda: (worker.step() or True) and status(queue, job) == JobStatus.succeeded, 60,
                   "the job to be taken over and made again")
        settle(worker)
        assert queue.result(job.id, 0) == expected
        record = queue.get(job.id)
        assert record is not None and record.attempts == 2


def test_a_stop_waits_for_the_jobs_being_finished(runner: Runner, redis_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with worker_on(runner, redis_url) as (worker, queue), gated_pngs(runner, monkeypatch, {71}) as gate:
        job = queue.submit(request(seed=71, steps=2))
        code: list[int] = []
        loop = threading.Thread(target=lambda: code.append(worker.run()))
        loop.start()
        wait_until(lambda: len(worker.finisher) == 1, 60, "the job to be handed to the finisher")
        worker.request_stop()
        time.sleep(0.2)
        assert loop.is_alive() and status(queue, job) == JobStatus.running  # waiting for its PNG
        gate.set()
        loop.join(60)
        assert code == [0] and status(queue, job) == JobStatus.succeeded and queue.result(job.id, 0) is not None


def test_without_overlap_the_job_is_stored_before_the_step_returns(runner: Runner, redis_url: str) -> None:
    with worker_on(runner, redis_url, worker_finish_overlap=False) as (worker, queue):
        job = queue.submit(request(seed=81, steps=2))
        assert worker.step() == 1
        assert status(queue, job) == JobStatus.succeeded and not worker.in_hand()
        assert queue.result(job.id, 0) == solo(runner, seed=81, steps=2)
        blocked = worker.metrics.registry.get_sample_value("ldm_finish_blocked_seconds_total", {"model": MODEL})
        assert blocked is not None and blocked > 0


def test_a_continuous_job_whose_png_failed_leaves_the_batch_before_its_next_image(
        runner: Runner, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one slot a job's two images run one after the other: the first image's PNG fails while the second is
    sampled, and the job fails at the next step boundary instead of making an image that would be thrown away."""
    real = runner.png
    encoded: list[int] = []

    def png(key: Any, sample: SampleInput, image: Any) -> bytes:
        encoded.append(sample.seed)
        if sample.seed == 90:
            raise ValueError("the encoder broke")
        return real(key, sample, image)

    monkeypatch.setattr(runner, "png", png)
    with worker_on(runner, redis_url, "continuous", max_batch=1) as (worker, queue):
        job = queue.submit(request(seed=90, n=2, steps=6, sampler="ddim"))
        wait_until(lambda: (worker.step() or True) and status(queue, job).terminal and not worker.in_hand(), 60,
                   "the job to end")
        failed = queue.get(job.id)
        assert failed is not None and failed.status == JobStatus.failed and failed.error
        assert failed.error.startswith("internal")
        assert encoded == [90]  # the second image was never finished
        assert len(worker.batch) == 0 and not worker.running
