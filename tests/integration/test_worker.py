"""Workers as real processes (`python -m service.worker`) on a real Redis, with `random:tiny-sd` at 64x64.

What the service promises of a worker, one test each: images with their parameters, batching of compatible
jobs (one sampler run, seen in the worker's own /metrics), an image independent of its batch, cancellation
between steps, inpainting that keeps the unmasked pixels, a clear 'unsupported' failure, graceful SIGTERM, and
no job lost or answered twice when a worker is killed mid-batch. The last section runs the runner in this
process, where a fault-injecting fake of the pipeline call stands in for CUDA running out of memory (a fault
this machine cannot cause).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from models.images import png_parameters
from service.config import Settings
from service.embedded import free_port
from service.metrics import ApiMetrics
from service.queue import Job, JobQueue, JobStatus, SyncJobQueue
from service.schemas import GenerationRequest, Task
from service.worker.batcher import make_batches
from service.worker.runner import JobFailure, Runner, SampleInput
from tests.helpers import drop_keys, torch_threads, wait_until

pytestmark = pytest.mark.timeout(120)
MODEL = "random:tiny-sd"
ROOT = Path(__file__).resolve().parents[2]
#: the workers' batching: `LDM_TEST_BATCHING=continuous pytest ...` runs this module against continuous workers
BATCHING = os.environ.get("LDM_TEST_BATCHING", "static")
STATIC_ONLY = pytest.mark.skipif(BATCHING != "static", reason="static batching (test_continuous_worker.py: the other)")
#: what both sides (this test and its workers) are configured with
COMMON: dict[str, Any] = {"redis_timeout_s": 2.0, "redis_connect_timeout_s": 0.5, "redis_retries": 2,
                          "redis_backoff_s": 0.05, "max_wait_ms": 20, "max_batch": 8, "batching": BATCHING}


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"model": MODEL, "prompt": "a red circle", "width": 64, "height": 64, "steps": 2,
                                "seed": 1, **fields})


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    id: str
    metrics_url: str
    log: Path

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as answer:
            return str(answer.read().decode())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


class Cluster:
    """Redis settings with one key prefix, a queue client, and the worker processes started on them."""

    def __init__(self, redis_url: str, folder: Path, **overrides: Any) -> None:
        self.redis_url, self.folder, self.overrides = redis_url, folder, {**COMMON, **overrides}
        self.settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", **self.overrides)
        self.queue = SyncJobQueue(self.settings)
        self.workers: list[WorkerProcess] = []

    def spawn(self) -> WorkerProcess:
        """Start a worker process and wait until it has registered (model loaded, heartbeat written)."""
        worker_id, port = f"w{len(self.workers) + 1}-{uuid.uuid4().hex[:6]}", free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env.update({f"LDM_{k.upper()}": str(v) for k, v in self.overrides.items()})
        env.update(LDM_REDIS_URL=self.redis_url, LDM_KEY_PREFIX=self.settings.key_prefix,
                   LDM_WORKER_METRICS_PORT=str(port), LDM_WORKER_TORCH_THREADS="1")
        log = self.folder / f"{worker_id}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "service.worker", "--model", MODEL, "--worker-id",
                                     worker_id], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        worker = WorkerProcess(proc, worker_id, f"http://127.0.0.1:{port}/metrics", log)
        self.workers.append(worker)

        def registered() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{worker.log_text()}")
            return any(w.id == worker_id for w in self.queue.workers(MODEL))

        wait_until(registered, 90, f"worker {worker_id} to register")
        return worker

    def wait(self, job_id: str, timeout_s: float = 60) -> Job:
        wait_until(lambda: self.job(job_id).status.terminal, timeout_s, f"job {job_id} to end")
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        assert job is not None
        return job

    def events(self, job_id: str) -> list[dict[str, Any]]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            entries: Any = client.xrange(f"{self.settings.key_prefix}:events:{job_id}")
        finally:
            client.close()
        return [json.loads(fields[b"data"]) for _, fields in entries]

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.queue.close()
        drop_keys(self.redis_url, self.settings.key_prefix)


@contextlib.contextmanager
def cluster(redis_url: str, folder: Path, **overrides: Any) -> Iterator[Cluster]:
    c = Cluster(redis_url, folder, **overrides)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def shared(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, WorkerProcess]]:
    """One worker for the tests that do not stop it."""
    with cluster(redis_url, tmp_path_factory.mktemp("workers")) as c:
        yield c, c.spawn()


def metric(text: str, line_prefix: str) -> float:
    """The value of the one sample line starting with `line_prefix` (0 when absent)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)]
    assert len(values) <= 1, line_prefix
    return values[0] if values else 0.0


# ------------------------------------------------------------------------------------------------ one worker

def test_txt2img_gives_n_pngs_carrying_their_parameters(shared: tuple[Cluster, WorkerProcess]) -> None:
    c, worker = shared
    job = c.queue.submit(request(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0, seed=11, n=2))
    done = c.wait(job.id)
    assert done.status == JobStatus.succeeded and done.results == 2 and done.worker == worker.id
    pngs = [c.queue.result(job.id, i) for i in range(2)]
    assert all(p is not None for p in pngs) and pngs[0] != pngs[1]
    for i, data in enumerate(pngs):
        assert data is not None
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        assert png_parameters(data) == {
            "task": "txt2img", "model": MODEL, "prompt": "a red circle", "negative_prompt": "blurry",
            "seed": str(11 + i), "steps": "2", "sampler": "dpmpp_2m", "karras": "False", "eta": "0.0",
            "guidance_scale": "5.0", "width": "64", "height": "64"}
    kinds = [(e["type"], e["step"]) for e in c.events(job.id)]
    assert kinds == [("queued", 0), ("started", 0), ("progress", 1), ("progress", 2), ("succeeded", 2)]


@STATIC_ONLY
def test_compatible_jobs_run_as_one_batch_and_an_image_does_not_depend_on_its_batch(
        shared: tuple[Cluster, WorkerProcess]) -> None:
    c, worker = shared
    alone = c.wait(c.queue.submit(request(prompt="a blue square", seed=7, steps=3)).id)
    assert alone.status == JobStatus.succeeded
    before = worker.scrape()
    # a longer job keeps the worker busy while the pair arrives, so that one claim takes both
    blocker = c.queue.submit(request(steps=40))
    wait_until(lambda: c.job(blocker.id).step >= 1, 60, "the blocker to run")
    pair = [c.queue.submit(request(prompt="a blue square", seed=7, steps=3)),
            c.queue.submit(request(prompt="a green cat", seed=8, guidance_scale=2.0, steps=3))]
    finished = [c.wait(j.id) for j in (blocker, *pair)]
    assert all(j.status == JobStatus.succeeded for j in finished)
    assert finished[1].started_at == finished[2].started_at  # started by one call: one batch
    after = worker.scrape()
    labels = f'model="{MODEL}",task="txt2img"'
    count = metric(after, f"ldm_batch_size_count{{{labels}}}") - metric(before, f"ldm_batch_size_count{{{labels}}}")
    total = metric(after, f"ldm_batch_size_sum{{{labels}}}") - metric(before, f"ldm_batch_size_sum{{{labels}}}")
    assert (count, total) == (2, 3)  # the blocker alone, then the pair together
    same, other = c.queue.result(pair[0].id, 0), c.queue.result(pair[1].id, 0)
    assert same == c.queue.result(alone.id, 0) and same is not None and other != same


def test_cancel_of_a_running_job_stops_it_between_steps(shared: tuple[Cluster, WorkerProcess]) -> None:
    c, _ = shared
    job = c.queue.submit(request(steps=400))
    wait_until(lambda: any(e["type"] == "progress" for e in c.events(job.id)), 60, "the first progress event")
    assert c.queue.cancel(job.id) == JobStatus.running  # the flag is set; the worker stops at the next step
    asked = time.monotonic()
    done = c.wait(job.id, timeout_s=30)
    assert done.status == JobStatus.cancelled and done.results == 0 and done.step < 400
    assert time.monotonic() - asked < 10
    assert c.events(job.id)[-1]["type"] == "cancelled"
    assert c.wait(c.queue.submit(request()).id).status == JobStatus.succeeded  # the worker serves on


def test_inpaint_repaints_the_mask_and_keeps_every_other_pixel(shared: tuple[Cluster, WorkerProcess]) -> None:
    c, _ = shared
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255  # white = repaint
    job = c.queue.submit(request(task=Task.inpaint, image=png(Image.fromarray(pixels)),
                                 mask=png(Image.fromarray(mask)), prompt="a cat", seed=3))
    done = c.wait(job.id)
    assert done.status == JobStatus.succeeded, done.error
    data = c.queue.result(job.id, 0)
    assert data is not None
    out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    keep = mask == 0
    assert np.array_equal(out[keep], pixels[keep])
    assert not np.array_equal(out[~keep], pixels[~keep])
    params = png_parameters(data)
    assert params["task"] == "inpaint" and params["strength"] == "1.0" and params["seed"] == "3"


def test_upscale_on_a_text_to_image_model_fails_as_unsupported(shared: tuple[Cluster, WorkerProcess]) -> None:
    c, worker = shared
    (info,) = [w for w in c.queue.workers(MODEL) if w.id == worker.id]
    assert set(info.tasks) == {Task.txt2img, Task.img2img, Task.inpaint}  # what the API can check up front
    image = png(Image.new("RGB", (64, 64), (200, 30, 30)))
    done = c.wait(c.queue.submit(request(task=Task.upscale, image=image)).id)
    assert done.status == JobStatus.failed and done.results == 0
    assert done.error is not None and done.error.startswith("unsupported: ")
    assert "text-to-image model" in done.error and "upscale" in done.error
    assert metric(worker.scrape(), f'ldm_job_failures_total{{model="{MODEL}",reason="unsupported"}}') >= 1


def test_worker_serves_its_metrics(shared: tuple[Cluster, WorkerProcess]) -> None:
    c, worker = shared
    c.wait(c.queue.submit(request()).id)
    text = worker.scrape()
    assert metric(text, "ldm_worker_up ") == 1
    assert f'worker="{worker.id}"' in text and 'device="cpu"' in text  # ldm_worker_info
    assert metric(text, f'ldm_images_generated_total{{model="{MODEL}",task="txt2img"}}') >= 1
    assert metric(text, f'ldm_jobs_completed_total{{model="{MODEL}",status="succeeded"}}') >= 1
    assert metric(text, f'ldm_job_wait_seconds_count{{model="{MODEL}"}}') >= 1
    assert metric(text, f'ldm_sampler_step_seconds_count{{model="{MODEL}"}}') >= 1
    assert metric(text, "ldm_worker_heartbeats_total") >= 1
    assert 0 < metric(text, "ldm_worker_busy_ratio") <= 1
    assert Path(f"/proc/{worker.proc.pid}/comm").read_text().strip() == "ldm worker"  # `ps -e`, `top`


def test_api_queue_gauges_see_live_workers_and_queues_without_one(shared: tuple[Cluster, WorkerProcess]) -> None:
    c, _ = shared
    c.queue.submit(request(model="nobody"))  # a queue no worker serves: what an alert must see
    time.sleep(0.05)

    async def scrape() -> str:
        async with JobQueue(c.settings) as queue:
            body, content_type = await ApiMetrics().render(queue)
        assert content_type.startswith("text/plain")
        return body.decode()

    text = asyncio.run(scrape())
    assert metric(text, "ldm_redis_up ") == 1
    assert metric(text, f'ldm_workers{{model="{MODEL}"}}') == 1
    assert metric(text, 'ldm_workers{model="nobody"}') == 0
    assert metric(text, 'ldm_queue_depth{model="nobody"}') == 1
    assert metric(text, 'ldm_queue_oldest_job_age_seconds{model="nobody"}') > 0
    assert f'ldm_queue_depth{{model="{MODEL}"}}' in text


# ------------------------------------------------------------------------------------------------ stopping workers

def test_sigterm_finishes_the_batch_in_hand_claims_no_more_and_exits_zero(redis_url: str, tmp_path: Path) -> None:
    with cluster(redis_url, tmp_path) as c:
        worker = c.spawn()
        job = c.queue.submit(request(steps=40, n=2))
        wait_until(lambda: c.job(job.id).step >= 1, 60, "the job to run")
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "shutdown_requested" in worker.log_text(), 10, "the worker to take the signal")
        late = c.queue.submit(request())
        assert worker.proc.wait(timeout=60) == 0, worker.log_text()
        done = c.job(job.id)
        assert done.status == JobStatus.succeeded and done.results == 2 and done.step == 40
        assert c.job(late.id).status == JobStatus.queued and c.job(late.id).attempts == 0
        assert c.queue.workers(MODEL) == []  # deregistered


def test_kill_9_mid_batch_another_worker_finishes_every_job_exactly_once(redis_url: str, tmp_path: Path) -> None:
    with cluster(redis_url, tmp_path, visibility_timeout_s=2.0, heartbeat_interval_s=1.0) as c:
        jobs = [c.queue.submit(request(steps=30, seed=s, n=1 + s % 2)) for s in range(3)]  # waiting before it starts
        first = c.spawn()
        wait_until(lambda: all(c.job(j.id).step >= 1 for j in jobs), 60, "the batch to run")
        if BATCHING == "static":
            assert {c.job(j.id).started_at for j in jobs} == {c.job(jobs[0].id).started_at}  # one batch
        first.proc.kill()
        first.proc.wait(timeout=10)
        second = c.spawn()
        finished = [c.wait(j.id, timeout_s=60) for j in jobs]
        for job, done in zip(jobs, finished, strict=True):
            assert done.status == JobStatus.succeeded and done.worker == second.id and done.attempts == 2
            assert done.results == job.request.n
            assert all(c.queue.result(job.id, i) is not None for i in range(job.request.n))
            types = [e["type"] for e in c.events(job.id)]
            assert types.count("succeeded") == 1 and types.count("requeued") == 1
            assert not {"failed", "cancelled"} & set(types)
        assert c.queue.stats(MODEL).depth == 0  # every entry acknowledged
        assert metric(second.scrape(), f'ldm_jobs_reclaimed_total{{model="{MODEL}"}}') == len(jobs)
        assert second.stop() == 0


# ---------------------------------------------------------------------------------------------- the runner, in process

@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with torch_threads(1):
        yield Runner.load(MODEL, device="cpu")


def samples(n: int) -> list[SampleInput]:
    return [SampleInput(request(prompt=f"prompt {i}", seed=100 + i), 100 + i) for i in range(n)]


def test_out_of_memory_splits_the_batch_in_halves_and_the_images_do_not_change(
        runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    key = runner.batch_key(request(), None)
    expected = runner.run(key, samples(3))
    real, sizes, ooms = runner.pipeline.txt2img, [], []

    def out_of_memory_once(specs: Any, *args: Any, **kwargs: Any) -> Any:  # the fault CUDA would raise
        sizes.append(len(specs))
        if len(sizes) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(specs, *args, **kwargs)

    monkeypatch.setattr(runner.pipeline, "txt2img", out_of_memory_once)
    monkeypatch.setattr(runner, "on_oom", lambda: ooms.append(1))
    assert runner.run(key, samples(3)) == expected
    assert sizes == [3, 2, 1] and len(ooms) == 1


def test_out_of_memory_for_a_single_image_fails_the_batch(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    def always(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner.pipeline, "txt2img", always)
    with pytest.raises(JobFailure, match="out_of_memory") as failure:
        runner.run(runner.batch_key(request(), None), samples(2))
    assert failure.value.reason == "out_of_memory"


def test_bad_inputs_fail_the_job_with_a_clear_reason(runner: Runner) -> None:
    r = request(task=Task.img2img, image=b"x")
    with pytest.raises(JobFailure, match="invalid_input: the image cannot be decoded"):
        runner.inputs(r, b"not an image", None, max_pixels=10**6)
    with pytest.raises(JobFailure, match="invalid_input: the image has 64x64 pixels; the limit is 100"):
        runner.inputs(r, png(Image.new("RGB", (64, 64))), None, max_pixels=100)
    with pytest.raises(JobFailure, match="the request says 64x64"):
        runner.inputs(r, png(Image.new("RGB", (32, 64))), None, max_pixels=10**6)
    inpaint = request(task=Task.inpaint, image=b"x", mask=b"x")
    with pytest.raises(JobFailure, match="must be the same size"):
        runner.inputs(inpaint, png(Image.new("RGB", (64, 64))), png(Image.new("L", (32, 32))), max_pixels=10**6)
    with pytest.raises(JobFailure, match="unsupported: .* cannot do upscale"):
        runner.check(request(task=Task.upscale, image=b"x"))
    layout = request(task=Task.layout, prompt="", layout=[{"label": "red circle", "box": [0, 0, 1, 1]}])
    with pytest.raises(JobFailure, match="unsupported: model 'random:tiny-sd' is a text-to-image model and cannot "
                       r"do layout \(it can do: img2img, inpaint, txt2img\)"):
        runner.check(layout)


def test_size_left_to_the_model_batches_with_the_same_size_spelled_out(runner: Runner) -> None:
    jobs = [request(width=None, height=None), request(width=64, height=64)]
    batches = make_batches(jobs, 8, request=lambda r: r, key=lambda r: runner.batch_key(r, None))
    assert len(batches) == 1 and (batches[0].key.width, batches[0].key.height) == (64, 64)


def test_an_internal_fault_reaches_the_client_as_an_incident_id_not_its_text(
        runner: Runner, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The exception's text (paths, hosts, another job's data) stays in the worker's log; the job's error (what
    GET /v1/jobs and gRPC show) says "internal" and an incident id that finds that log line."""
    from service.metrics import WorkerMetrics
    from service.worker.process import Worker

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot read /srv/secret-models/tenant-b.ckpt on gpu-host-7")

    monkeypatch.setattr(runner.pipeline, "txt2img", broken)
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, key_prefix=prefix)
    with SyncJobQueue(settings) as queue:
        try:
            job = queue.submit(request())
            worker = Worker(settings, queue, runner, WorkerMetrics(), "w-fault")
            with caplog.at_level("ERROR"):
                assert worker.step() == 1
            failed = queue.get(job.id)
        finally:
            drop_keys(redis_url, prefix)
    assert failed is not None and failed.status == JobStatus.failed and failed.error
    assert failed.error.startswith("internal: the worker could not run the job (incident ")
    assert "secret" not in failed.error and "gpu-host" not in failed.error and "RuntimeError" not in failed.error
    incident = failed.error.split("incident ")[1][:8]
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "tenant-b.ckpt" in str(logged[0].exc_info[1])
