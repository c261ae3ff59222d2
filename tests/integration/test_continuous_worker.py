"""A worker with `LDM_BATCHING=continuous` as a real process on a real Redis (`random:tiny-sd` at 64x64), beside a
static one on its own key prefix that makes the reference PNGs.

Jobs with other step counts and samplers, submitted while a long job runs, join its batch at a step boundary and
leave it when done, and their PNGs (and the long job's) are byte for byte what the static worker makes; a cancelled
job leaves mid-run while the others go on; `preview_every` puts a PNG preview in the progress events seen over SSE.

In process (a `ContinuousWorker` on the test Redis, driven step by step): CUDA out of memory in a step, faked as
tests/integration/test_worker.py fakes it for the static worker (there is no GPU to exhaust), splits the running set
into calls of fewer rows with nothing lost and the images unchanged; one sample that does not fit fails its jobs
with `out_of_memory` and the worker goes on.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from service.config import Settings
from service.metrics import WorkerMetrics
from service.queue import Job, JobStatus, SyncJobQueue
from service.schemas import GenerationRequest
from service.worker.continuous import ContinuousWorker
from service.worker.runner import Runner, SampleInput
from tests.helpers import drop_keys, torch_threads, wait_until
from tests.integration.test_rest import serving, sse
from tests.integration.test_worker import MODEL, Cluster, WorkerProcess, cluster, metric, request

pytestmark = pytest.mark.timeout(240)
JOINED = f'ldm_samples_joined_mid_run_total{{model="{MODEL}"}}'


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[tuple[Cluster, WorkerProcess, Cluster]]:
    """A continuous worker (its cluster and process) and a static one (its cluster)."""
    with cluster(redis_url, tmp_path_factory.mktemp("continuous"), batching="continuous") as cont, \
            cluster(redis_url, tmp_path_factory.mktemp("static"), batching="static") as static:
        static.spawn()
        yield cont, cont.spawn(), static


def static_pngs(static: Cluster, requests: list[GenerationRequest]) -> list[list[bytes | None]]:
    jobs = [static.queue.submit(r) for r in requests]
    done = [static.wait(j.id, timeout_s=120) for j in jobs]
    assert all(d.status == JobStatus.succeeded for d in done)
    return [[static.queue.result(j.id, i) for i in range(j.request.n)] for j in jobs]


def test_jobs_join_a_running_batch_mid_run_and_make_the_static_pngs(
        workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    cont, worker, static = workers
    before = metric(worker.scrape(), JOINED)
    long = request(steps=150, seed=3)
    joiners = [request(prompt="a blue square", seed=7, steps=3, sampler="ddim"),
               request(prompt="a green cat", seed=8, steps=5, sampler="euler_a", guidance_scale=2.0, n=2),
               request(seed=9, steps=4, sampler="plms")]
    blocker = cont.queue.submit(long)
    wait_until(lambda: cont.job(blocker.id).step >= 2, 60, "the long job to run")
    jobs = [cont.queue.submit(r) for r in joiners]
    finished = [cont.wait(j.id) for j in jobs]
    assert all(j.status == JobStatus.succeeded for j in finished), [j.error for j in finished]
    ran_beside = cont.job(blocker.id)
    assert ran_beside.status == JobStatus.running and ran_beside.step < 150  # they joined and left while it ran
    assert cont.wait(blocker.id, timeout_s=120).status == JobStatus.succeeded
    assert metric(worker.scrape(), JOINED) - before == sum(r.n for r in joiners)
    got = [[cont.queue.result(j.id, i) for i in range(j.request.n)] for j in (blocker, *jobs)]
    assert all(p is not None for pngs in got for p in pngs)
    assert got == static_pngs(static, [long, *joiners])


def test_a_cancelled_job_leaves_mid_run_and_the_others_go_on(
        workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    cont, _, static = workers
    stays = request(steps=60, seed=6, sampler="ddim")
    doomed = cont.queue.submit(request(steps=400, seed=5))
    wait_until(lambda: cont.job(doomed.id).step >= 1, 60, "the doomed job to run")
    other = cont.queue.submit(stays)
    wait_until(lambda: cont.job(other.id).step >= 1, 60, "the other job to join")
    assert cont.queue.cancel(doomed.id) == JobStatus.running
    cancelled = cont.wait(doomed.id, timeout_s=30)
    assert cancelled.status == JobStatus.cancelled and cancelled.step < 400 and cancelled.results == 0
    assert cont.job(other.id).status == JobStatus.running  # it left while the other ran on
    assert cont.wait(other.id, timeout_s=60).status == JobStatus.succeeded
    assert [[cont.queue.result(other.id, 0)]] == static_pngs(static, [stays])


def test_previews_every_k_steps_arrive_over_sse_as_pngs(workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    cont, worker, _ = workers
    job = cont.queue.submit(request(steps=12, preview_every=4))
    assert cont.wait(job.id).status == JobStatus.succeeded
    with serving(cont.settings) as api:
        frames = sse(api.client, f"/v1/jobs/{job.id}/events")
    progress = [json.loads(f.data) for f in frames if f.event == "progress" and f.data]
    assert [p["step"] for p in progress] == list(range(1, 13))
    with_preview = {p["step"]: p["preview"] for p in progress if p.get("preview")}
    assert sorted(with_preview) == [4, 8]  # every 4 steps, none for the final image
    for data in with_preview.values():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and max(image.size) <= 256
    assert metric(worker.scrape(), f'ldm_preview_seconds_count{{model="{MODEL}"}}') >= 2


def test_a_static_worker_sends_previews_too_and_the_same_image(
        workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    """`LDM_BATCHING=static` honours `preview_every` as continuous mode does (every k steps, none for the final
    image), and watching the x0 estimates leaves the image byte for byte as it is without previews."""
    _, _, static = workers
    job = static.queue.submit(request(steps=6, preview_every=2, seed=5))
    plain = static.queue.submit(request(steps=6, seed=5))
    assert static.wait(job.id, timeout_s=120).status == JobStatus.succeeded
    assert static.wait(plain.id, timeout_s=120).status == JobStatus.succeeded
    assert static.queue.result(job.id, 0) == static.queue.result(plain.id, 0)
    with serving(static.settings) as api:
        frames = sse(api.client, f"/v1/jobs/{job.id}/events")
        plain_frames = sse(api.client, f"/v1/jobs/{plain.id}/events")
    progress = [json.loads(f.data) for f in frames if f.event == "progress" and f.data]
    assert [p["step"] for p in progress] == list(range(1, 7))
    with_preview = {p["step"]: p["preview"] for p in progress if p.get("preview")}
    assert sorted(with_preview) == [2, 4]
    for data in with_preview.values():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and max(image.size) <= 256 and image.size[0] == image.size[1]
    assert not any(json.loads(f.data).get("preview") for f in plain_frames if f.event == "progress" and f.data)
    scraped = static.workers[0].scrape()
    assert metric(scraped, f'ldm_preview_seconds_count{{model="{MODEL}"}}') >= 2


# ------------------------------------------------------------------------------- out of memory, in process

@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with torch_threads(1):
        yield Runner.load(MODEL, device="cpu")


@contextlib.contextmanager
def continuous_worker(runner: Runner, redis_url: str, **settings: Any,
                      ) -> Iterator[tuple[ContinuousWorker, SyncJobQueue]]:
    """A continuous worker (at most 4 samples unless `settings` say otherwise) on its own key prefix of the test
    Redis, driven by the test."""
    prefix = f"inproc-{uuid.uuid4().hex[:8]}"
    config = Settings(**{"redis_url": redis_url, "key_prefix": prefix, "max_batch": 4, "max_wait_ms": 20,
                         "batching": "continuous", **settings})
    with SyncJobQueue(config) as queue:
        try:
            yield ContinuousWorker(config, queue, runner, WorkerMetrics(), "w-inproc"), queue
        finally:
            drop_keys(redis_url, prefix)


@pytest.fixture
def in_process(runner: Runner, redis_url: str) -> Iterator[tuple[ContinuousWorker, SyncJobQueue]]:
    with continuous_worker(runner, redis_url) as found:
        yield found


def memory_for(rows: int, worker: ContinuousWorker, calls: list[int]) -> Callable[..., torch.Tensor]:
    """The batch's denoiser as a device with room for `rows` samples per call: beyond, the fault CUDA raises."""
    real = worker.batch.denoise

    def denoise(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, *args)

    return denoise


def run_until_done(worker: ContinuousWorker, queue: SyncJobQueue, jobs: list[Job]) -> list[Job]:
    """Step the worker until every job has ended; their records."""
    deadline = time.monotonic() + 60
    while True:
        records = [queue.get(j.id) for j in jobs]
        ended = [r for r in records if r is not None and r.status.terminal]
        if len(ended) == len(jobs) and not worker.in_hand():
            return ended
        assert time.monotonic() < deadline, "the jobs did not end"
        worker.step()


def test_out_of_memory_in_a_step_splits_the_running_set_and_the_images_do_not_change(
        runner: Runner, in_process: tuple[ContinuousWorker, SyncJobQueue], monkeypatch: pytest.MonkeyPatch) -> None:
    worker, queue = in_process
    requests = [request(prompt="a blue square", seed=11, steps=5, sampler="ddim", n=2),
                request(prompt="a green cat", seed=12, steps=4, sampler="euler_a", guidance_scale=2.0),
                request(seed=13, steps=3, sampler="plms")]
    solo = [runner.run(runner.batch_key(r, None), [SampleInput(r, seed) for seed in r.seeds()]) for r in requests]
    calls: list[int] = []
    ooms: list[int] = []
    monkeypatch.setattr(worker.batch, "denoise", memory_for(2, worker, calls))
    monkeypatch.setattr(runner, "on_oom", lambda: ooms.append(1))
    jobs = [queue.submit(r) for r in requests]
    finished = run_until_done(worker, queue, jobs)
    assert [j.status for j in finished] == [JobStatus.succeeded] * 3, [j.error for j in finished]
    assert [[queue.result(j.id, i) for i in range(j.request.n)] for j in jobs] == solo
    assert calls[:3] == [4, 2, 2] and max(calls[1:]) == 2 and len(ooms) == 1  # split once, the 4 samples kept
    assert worker.rows_per_call is None  # drained: the next batch tries one call again


def test_out_of_memory_for_one_sample_fails_the_running_jobs_and_the_worker_goes_on(
        runner: Runner, in_process: tuple[ContinuousWorker, SyncJobQueue], monkeypatch: pytest.MonkeyPatch) -> None:
    worker, queue = in_process
    calls: list[int] = []
    ooms: list[int] = []
    real = worker.batch.denoise
    monkeypatch.setattr(worker.batch, "denoise", memory_for(0, worker, calls))
    monkeypatch.setattr(runner, "on_oom", lambda: ooms.append(1))
    doomed = [queue.submit(request(seed=21, steps=3)), queue.submit(request(seed=22, steps=4, sampler="ddim"))]
    failed = run_until_done(worker, queue, doomed)
    assert [j.status for j in failed] == [JobStatus.failed] * 2
    assert all(j.error == "out_of_memory: one 64x64 image does not fit in the memory of cpu" for j in failed)
    assert calls == [2, 1] and len(ooms) == 1 and worker.rows_per_call is None
    monkeypatch.setattr(worker.batch, "denoise", real)  # memory again
    after = run_until_done(worker, queue, [queue.submit(request(seed=23, steps=2))])
    assert after[0].status == JobStatus.succeeded


def test_out_of_memory_at_a_jobs_start_fails_that_job_and_the_running_one_finishes(
        runner: Runner, in_process: tuple[ContinuousWorker, SyncJobQueue], monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a job (its conditioning, its noise) is its smallest unit: out of memory there fails it alone, with
    out_of_memory, and frees the memory; the job already running keeps its slots and its image."""
    worker, queue = in_process
    ooms: list[int] = []
    real = runner.start

    def start(key: Any, samples: Any) -> Any:
        if samples[0].request.seed == 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(key, samples)

    monkeypatch.setattr(runner, "start", start)
    monkeypatch.setattr(runner, "on_oom", lambda: ooms.append(1))
    running = request(seed=31, steps=4, sampler="ddim")
    solo = runner.run(runner.batch_key(running, None), [SampleInput(running, 31)])
    first = queue.submit(running)
    worker.step()  # the first job is running when the second comes
    doomed = queue.submit(request(seed=32, steps=3))
    ended = {j.id: j for j in run_until_done(worker, queue, [first, doomed])}
    assert ended[doomed.id].status == JobStatus.failed and len(ooms) == 1
    assert ended[doomed.id].error == "out_of_memory: one 64x64 image does not fit in the memory of cpu"
    assert ended[first.id].status == JobStatus.succeeded and [queue.result(first.id, 0)] == solo


def test_out_of_memory_at_decode_fails_that_job_alone_and_keeps_none_of_its_images(
        runner: Runner, in_process: tuple[ContinuousWorker, SyncJobQueue], monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding one image is the smallest unit there: out of memory fails its job (no partial result), once, and
    the other job in the batch finishes with its own image."""
    worker, queue = in_process
    ooms: list[int] = []
    decodes: list[int] = []
    real = runner.start

    def start(key: Any, samples: Any) -> Any:
        started = real(key, samples)
        if samples[0].request.seed != 42:
            return started

        def finish(index: int, latent: torch.Tensor) -> Any:
            decodes.append(index)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return dataclasses.replace(started, finish=finish)

    monkeypatch.setattr(runner, "start", start)
    monkeypatch.setattr(runner, "on_oom", lambda: ooms.append(1))
    kept = request(seed=41, steps=3, sampler="ddim")
    solo = runner.run(runner.batch_key(kept, None), [SampleInput(kept, 41)])
    jobs = [queue.submit(kept), queue.submit(request(seed=42, steps=3, sampler="ddim", n=2))]
    ended = run_until_done(worker, queue, jobs)
    assert [j.status for j in ended] == [JobStatus.succeeded, JobStatus.failed]
    assert ended[1].error == "out_of_memory: one 64x64 image does not fit in the memory of cpu"
    assert decodes == [0] and len(ooms) == 1  # the second image was not decoded after the first failed
    assert [queue.result(jobs[0].id, 0)] == solo and queue.result(jobs[1].id, 1) is None
    assert not worker.in_hand()


def test_the_images_of_a_step_encode_on_the_png_threads_and_a_png_fault_fails_its_job_alone(
        runner: Runner, in_process: tuple[ContinuousWorker, SyncJobQueue], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image finished at a step is encoded at once on the runner's PNG threads (the same bytes as one by one);
    an encoding fault (a fault we cannot cause otherwise) fails that job alone, and the other job's image is kept."""
    worker, queue = in_process
    threads: list[str] = []
    real = runner.png

    def png(key: Any, sample: SampleInput, image: Any) -> bytes:
        threads.append(threading.current_thread().name)
        if sample.seed == 42:
            raise ValueError("the encoder broke")
        return real(key, sample, image)

    kept = request(seed=41, steps=3, sampler="ddim")
    solo = runner.run(runner.batch_key(kept, None), [SampleInput(kept, 41)])
    monkeypatch.setattr(runner, "png", png)
    jobs = [queue.submit(kept), queue.submit(request(seed=42, steps=3, sampler="ddim"))]
    ended = run_until_done(worker, queue, jobs)
    assert [j.status for j in ended] == [JobStatus.succeeded, JobStatus.failed]
    assert ended[1].error is not None and ended[1].error.startswith("internal")
    assert [queue.result(jobs[0].id, 0)] == solo and queue.result(jobs[1].id, 0) is None
    assert len(threads) == 2 and all(name.startswith("png") for name in threads)
    assert not worker.in_hand()


def test_a_batchs_pngs_are_the_one_by_one_pngs(runner: Runner) -> None:
    r = request(seed=7, steps=2, sampler="ddim", n=3)
    key = runner.batch_key(r, None)
    samples = [SampleInput(r, 7 + i) for i in range(3)]
    pngs = runner.run(key, samples)
    images = [Image.open(io.BytesIO(png)).copy() for png in pngs if png is not None]
    encoded = [runner.submit_png(key, s, im) for s, im in zip(samples, images, strict=True)]  # all at once
    assert [f.result() for f in encoded] == [runner.png(key, s, im) for s, im in zip(samples, images, strict=True)]


# ------------------------------------------------------------------------------- admission policy, in process

def test_a_step_cost_budget_caps_the_samples_per_step_and_shortest_work_goes_first(
        runner: Runner, redis_url: str) -> None:
    """LDM_STEP_COST_BUDGET=1 (a step may cost one solo step) with LDM_ADMISSION_ORDER=shortest: one sample per step,
    the waiting jobs taken by least work (the three are claimed together), and the images still the solo runs'."""
    with continuous_worker(runner, redis_url, step_cost_budget=1.0, admission_order="shortest") as (worker, queue):
        calls: list[int] = []
        real = worker.batch.denoise

        def counted(x: torch.Tensor, *args: Any) -> torch.Tensor:
            calls.append(x.shape[0])
            return real(x, *args)

        worker.batch.denoise = counted  # type: ignore[method-assign]  # the worker's own batch: no patch to undo
        requests = [request(seed=31, steps=6), request(seed=32, steps=2, sampler="ddim"),
                    request(seed=33, steps=4, sampler="euler_a")]
        jobs = [queue.submit(r) for r in requests]
        finished = run_until_done(worker, queue, jobs)
        assert [j.status for j in finished] == [JobStatus.succeeded] * 3
        assert calls == [1] * 12  # one sample per step, 6 + 2 + 4 steps
        ends = sorted(finished, key=lambda j: j.finished_at or 0)
        assert [j.request.steps for j in ends] == [2, 4, 6]  # least work first
        solo = [runner.run(runner.batch_key(r, None), [SampleInput(r, r.seed or 0)])[0] for r in requests]
        assert [queue.result(j.id, 0) for j in jobs] == solo
