"""The worker process: one device, one model, a loop of claim -> schedule -> execute -> update (vLLM's EngineCore.step:
requests come in, the scheduler picks and groups them, the model runs, the outputs update the requests).

- claim: take over a job of a worker that went silent (XAUTOCLAIM, every so often) and run it alone, in
  quarantine (it may be a poison job that killed that worker); else claim up to `max_batch` new jobs, blocking
  at most `max_wait_ms`.
- schedule: check each job against the model, decode its inputs, group the jobs into batches (`make_batches`).
- execute: start a batch's jobs and run it on the device (`Runner.run`); after every sampler step the jobs'
  progress goes to the queue (with a preview PNG of a job's x0 estimate every `preview_every` steps, as in
  continuous mode), whose answer says which jobs were cancelled (stopped between steps) or taken over
  by another worker. Its result, a `BatchOutput`, is the images or the batch's failure.
- update: hand each job whose images are all decoded to the finisher (service/worker/finisher.py), whose thread
  waits for its PNGs, stores them and marks it succeeded (`finish`) while the next batch runs; or `fail` the
  batch's jobs; metrics, log.

A heartbeat thread registers the worker (`WorkerInfo`, with the tasks its model can do) every
`min(heartbeat_interval_s, visibility_timeout_s / 3)` and keeps every claimed job alive, including those waiting
behind the batch in hand, so that only a worker that really stopped loses its jobs.

SIGTERM / SIGINT: claim no more, finish the jobs in hand (at most `max_batch` claimed jobs), deregister, exit 0.
A second signal exits at once (the jobs in hand are taken over by another worker after the visibility timeout).

Cancellation is per job, batches are shared: a cancelled job is marked cancelled at the next step and its images
are dropped, while the rest of its batch runs on; when every job of a batch is stopped, the batch stops too.

With `LDM_BATCHING=continuous` the loop is service/worker/continuous.py's `ContinuousWorker`: the same phases at
every sampler step, so that jobs join and leave the running batch between steps.

Logs are one line per event with key=value fields (`event=batch_done model=... samples=4 seconds=0.41`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from types import FrameType

import torch
from PIL import Image

from service.config import Settings
from service.metrics import WorkerMetrics, start_metrics_server
from service.queue import Claim, QueueError, QueueUnavailable, SyncJobQueue, WorkerInfo
from service.schemas import BatchKey, GenerationRequest, Task
from service.worker.batcher import Batch, make_batches
from service.worker.finisher import Finisher
from service.worker.runner import Cancelled, JobFailure, Runner, SampleInput, StepCallback, TextOptions

log = logging.getLogger("service.worker")
PROCESS_TITLE = "ldm worker"
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def kv(event: str, **fields: object) -> str:
    """A log line of key=value fields; values with spaces or quotes are JSON-quoted."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={json.dumps(text) if _NEEDS_QUOTES.search(text) or not text else text}")
    return " ".join(parts)


@dataclass(eq=False)
class JobState:
    """A claimed job in this worker: decoded inputs, its batch key, the PNGs made so far."""

    claim: Claim
    key: BatchKey
    image: Image.Image | None = None
    mask: Image.Image | None = None
    pngs: dict[int, bytes] = field(default_factory=dict)  # filled by the finisher's thread
    encoding: dict[int, Future[bytes]] = field(default_factory=dict)  # image index -> its PNG, on the PNG threads
    started: float | None = None  # monotonic time it started running here
    done: bool = False  # settled, or taken over by another worker
    handed: bool = False  # to the finisher: from then on the finisher's thread alone reads and writes it

    @property
    def id(self) -> str:
        return self.claim.job.id

    @property
    def request(self) -> GenerationRequest:
        return self.claim.job.request


def png_fault(job: JobState) -> BaseException | None:
    """What the first of a job's finished PNGs to fail raised (None: none failed, or none has finished)."""
    return next((e for e in (f.exception() for f in job.encoding.values() if f.done()) if e is not None), None)


@dataclass(frozen=True)
class BatchOutput:
    """What `execute` made of a batch, for `update`: `ran`, the samples that ran, with a PNG each (encoding; None:
    its job stopped mid-batch), or the `failure` of the whole batch; `seconds` it took."""

    ran: Batch[JobState]
    pngs: tuple[Future[bytes] | None, ...] = ()
    failure: JobFailure | None = None
    seconds: float = 0.0


class Worker:
    """The loop around one `Runner`; `run()` until `request_stop()`."""

    def __init__(self, settings: Settings, queue: SyncJobQueue, runner: Runner, metrics: WorkerMetrics,
                 worker_id: str) -> None:
        self.settings, self.queue, self.runner, self.metrics = settings, queue, runner, metrics
        self.id = worker_id
        self.model = runner.name
        self._stop = threading.Event()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._busy = False
        self._started_at = time.time()
        self._next_reclaim = 0.0
        self._steps_done: dict[str, int] = {}  # job id -> sampler steps it has done here (for steps_in_hand)
        self._step_rate = 0.0  # sample-steps per second, a moving average over recent steps
        s = settings
        self.beat_interval_s = min(s.heartbeat_interval_s, s.visibility_timeout_s / 3)
        self.reclaim_interval_s = max(0.05, min(s.visibility_timeout_s / 2, 10.0))
        self.finisher = Finisher(2 * s.max_batch, overlap=s.worker_finish_overlap,
                                 on_blocked=metrics.finish_blocked.labels(self.model).inc)

    # ------------------------------------------------------------------------------------------- life cycle

    def info(self) -> WorkerInfo:
        return WorkerInfo(id=self.id, models=[self.model], tasks=sorted(self.runner.tasks), labels=self.runner.labels,
                          default_guidance=self.runner.default_guidance,
                          default_sampler=self.runner.default_sampler,
                          sampler_guidance=self.runner.sampler_guidance, missing_null=self.runner.missing_null,
                          options=self.runner.options,
                          refiners=[self.runner.refiner_name] if self.runner.refiner_name else [],
                          host=socket.gethostname(), pid=os.getpid(), device=str(self.runner.device),
                          started_at=self._started_at, busy=self._busy, step_rate=round(self._step_rate, 3),
                          steps_in_hand=self._steps_in_hand())

    def _steps_in_hand(self) -> int:
        """Sample-steps left of the jobs this worker holds (claimed or running): the queue's ETAs."""
        with self._lock:
            held = list(self._held.values())
            done = dict(self._steps_done)
        return sum(c.job.request.n * max(0, c.job.request.steps - done.get(c.job.id, 0)) for c in held)

    def _stepped(self, samples: int, seconds: float, jobs: Sequence[tuple[Claim, int]]) -> None:
        """A step of `samples` samples took `seconds`; `jobs`: (claim, the step it reached) of each job in it. Feeds
        the step rate, steps in hand and time to first step."""
        if seconds > 0:
            rate = samples / seconds
            self._step_rate = rate if self._step_rate == 0 else 0.9 * self._step_rate + 0.1 * rate
        now = time.time()
        with self._lock:
            for claim, step in jobs:
                if claim.job.id not in self._steps_done:
                    self.metrics.first_step.labels(self.model).observe(max(0.0, now - claim.job.created_at.timestamp()))
                self._steps_done[claim.job.id] = step

    def request_stop(self) -> None:
        """Claim no more jobs; `run` returns once the jobs in hand are done."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """The loop; returns the exit code (0 after a requested stop)."""
        self._start_heartbeat()
        self.metrics.up.set(1)
        failures = 0
        try:
            while not self.stopping or self.in_hand():
                try:
                    if self.stopping and not self.holding():
                        self.finisher.drain()  # only jobs being finished are left
                    else:
                        self.step()
                    failures = 0
                except QueueUnavailable as exc:
                    failures += 1
                    delay = min(10.0, 0.5 * 2 ** min(failures, 5))
                    log.warning(kv("redis_unavailable", error=exc, retry_in_s=delay))
                    self.reset()
                    self._stop.wait(delay)
        finally:
            self.metrics.up.set(0)
            self._stop_heartbeat()
        return 0

    def in_hand(self) -> bool:
        """Whether jobs claimed by an earlier `step` are still to be run or finished."""
        return self.holding() or len(self.finisher) > 0

    def holding(self) -> bool:
        """Whether jobs claimed by an earlier `step` are still to be run (the static worker never keeps any)."""
        return False

    def reset(self) -> None:
        """After losing Redis: forget the jobs in hand (their entries stay pending: reclaimed after the
        visibility timeout)."""
        self.finisher.discard()
        with self._lock:
            self._held.clear()

    def close(self) -> None:
        """Leave the registry (best effort: the entry expires anyway)."""
        self.finisher.close()
        try:
            self.queue.deregister(self.id)
        except QueueError as exc:
            log.warning(kv("deregister_failed", error=exc))

    # ------------------------------------------------------------------------------------------- one step

    def step(self) -> int:
        """claim -> schedule -> (execute -> update) for each batch; the number of jobs taken."""
        self.finisher.collect()
        claims = self.claim()
        if claims:
            self.run_claims(claims)
        return len(claims)

    def run_claims(self, claims: Sequence[Claim]) -> None:
        """schedule -> (execute -> update) for each batch of `claims`, then release them all (those handed to the
        finisher as it settles them)."""
        self._busy = True
        handed: set[str] = set()
        try:
            with self.metrics.busy.busy():
                batches = self.schedule(claims)
                for batch in batches:
                    self.update(self.execute(batch))
                jobs = {j.id: j for b in batches for j in b.jobs}.values()
                handed = {j.id for j in jobs if j.handed}
                for j in (j for j in jobs if not j.handed and not j.done):  # never leave a claimed job behind
                    self._fail(j, JobFailure("internal", f"made {len(j.encoding)} of {j.request.n} images"))  # (net)
        finally:
            self._busy = False
            self._release([c for c in claims if c.job.id not in handed])

    def claim(self) -> list[Claim]:
        """One job of a silent worker (looked for every `reclaim_interval_s`), alone; else up to `max_batch` new
        jobs.

        A job taken over from a worker that stopped responding runs in quarantine: one at a time, with no other
        job claimed beside it. It may be what killed its worker (a poison job: a native crash, the OOM killer),
        and then, alone, it takes down no other job with it, while the batch-mates of its crash each get an
        attempt of their own instead of dying with it until they too are out of attempts. After a reclaim the
        next step looks for another at once, so the jobs of a dead worker are recovered one after the other."""
        return self.reclaim() or self.claim_new(self.settings.max_batch, self.settings.max_wait_ms)

    def reclaim(self) -> list[Claim]:
        """One job of a silent worker, when it is time to look (every `reclaim_interval_s`; at once again after a
        reclaim); held."""
        if time.monotonic() < self._next_reclaim:
            return []
        claims = self.queue.reclaim(self.model, self.id, count=1)
        if not claims:
            self._next_reclaim = time.monotonic() + self.reclaim_interval_s
        for c in claims:
            self.metrics.jobs_reclaimed.labels(self.model).inc()
            log.info(kv("job_reclaimed", job=c.job.id, attempt=c.attempt, previous_worker=c.job.worker))
        self._hold(claims)
        return claims

    def claim_new(self, count: int, block_ms: int) -> list[Claim]:
        """Up to `count` new jobs, waiting at most `block_ms` when there is none; held. SIGTERM and SIGINT wait
        until the claim is done, so that no job submitted after the stop was logged is claimed (the continuous
        worker claims at every step, and a signal taken while the read was on its way let one through)."""
        with _signals_deferred():
            claims = self.queue.claim(self.model, self.id, count=count, block_ms=block_ms)
        self._hold(claims)
        return claims

    def _hold(self, claims: Sequence[Claim]) -> None:
        for c in claims:
            self.metrics.queue_position.labels(self.model).observe(c.job.ahead_at_submit)
        with self._lock:
            self._held.update((c.job.id, c) for c in claims)

    # ------------------------------------------------------------------------------------------- schedule

    def schedule(self, claims: Sequence[Claim]) -> list[Batch[JobState]]:
        """The batches to run: each job checked against the model and its inputs decoded (a job that cannot run
        fails here, alone), then grouped (`make_batches`, with the decoded input's size in the key)."""
        jobs = [j for j in (self._prepare(c) for c in claims) if j is not None]
        return make_batches(jobs, self.settings.max_batch, request=lambda j: j.request, key=lambda j: j.key)

    def _prepare(self, claim: Claim) -> JobState | None:
        request = claim.job.request
        try:
            self.runner.check(request)
            image = mask = None
            if request.task != Task.txt2img:
                raw_image, raw_mask = self.queue.inputs(claim.job.id)
                image, mask = self.runner.inputs(request, raw_image, raw_mask,
                                                 max_pixels=self.settings.max_image_pixels)
            return JobState(claim, self.runner.batch_key(request, image), image, mask)
        except JobFailure as failure:
            self._fail(JobState(claim, request.batch_key()), failure)
            return None

    # ------------------------------------------------------------------------------------------- execute

    def execute(self, batch: Batch[JobState]) -> BatchOutput:
        """Start the batch's jobs and run it on the device. After every sampler step the jobs' progress goes to the
        queue, and the jobs it says were cancelled or taken over stop there (settled at once: their images are
        dropped). A failure of the whole batch is caught into the output; the queue's own errors propagate."""
        live = self._start(batch)
        if not live.samples:
            return BatchOutput(live)
        inputs = [SampleInput(s.job.request, s.seed, s.job.image, s.job.mask) for s in live.samples]
        began = time.monotonic()
        try:
            pngs = self.runner.submit(live.key, inputs, on_step=self._on_step(live))
        except JobFailure as failure:
            return BatchOutput(live, failure=failure)
        except QueueError:
            raise
        except Exception as exc:  # a fault of ours or of the device: the batch's jobs fail, the worker lives on
            fault, incident = JobFailure.internal()
            log.exception(kv("batch_error", model=self.model, task=live.key.task.value, error=type(exc).__name__,
                             incident=incident))
            return BatchOutput(live, failure=fault)
        return BatchOutput(live, tuple(pngs), seconds=time.monotonic() - began)

    def _start(self, batch: Batch[JobState]) -> Batch[JobState]:
        """Mark the batch's jobs running (those not started yet: a job's samples may span two batches); the samples
        whose jobs may run, as a batch."""
        fresh = [j for j in batch.jobs if not j.done and j.started is None]
        if fresh:
            runnable = {c.job.id for c in self.queue.start([j.claim for j in fresh])}
            now, mono = time.time(), time.monotonic()
            for j in fresh:
                if j.id in runnable:
                    j.started = mono
                    self.metrics.job_wait.labels(self.model).observe(max(0.0, now - j.claim.job.created_at.timestamp()))
                else:  # cancelled while queued (already acknowledged) or taken over by another worker
                    j.done = True
                    self._release([j.claim])
        return Batch(batch.key, tuple(s for s in batch.samples if not s.job.done))

    def _on_step(self, live: Batch[JobState]) -> StepCallback:
        """Progress to the queue after every step; stop cancelled jobs; raise Cancelled when none is left."""
        last = [time.monotonic()]

        def on_step(step: int, total: int, indices: Sequence[int], x0: Mapping[int, torch.Tensor]) -> None:
            now = time.monotonic()
            interval = now - last[0] if step > 1 else 0.0  # the first interval holds the batch's set-up (encoding)
            if interval:
                self.metrics.step_time.labels(self.model).observe(interval)
            last[0] = now
            running = Batch(live.key, tuple(live.samples[i] for i in indices))
            jobs = [j for j in running.jobs if not j.done]
            self._stepped(len(indices), interval, [(j.claim, step) for j in jobs])
            previews = self._previews(live, jobs, step, total, x0)
            stop = self.queue.progress([j.claim for j in jobs], step, total, previews=previews) if jobs else {}
            for j in jobs:
                if stop.get(j.id) == "cancel":
                    self._cancelled(j, step, total)
                elif stop.get(j.id) == "lost":
                    self._lost(j)
            if all(j.done for j in jobs):
                raise Cancelled

        return on_step

    def _previews(self, live: Batch[JobState], jobs: Sequence[JobState], step: int, total: int,
                  x0: Mapping[int, torch.Tensor]) -> dict[str, bytes]:
        """Job id -> a preview PNG of its first sample's x0 estimate, for each job whose `preview_every` falls on
        this step (not the last: its image follows), as service/worker/continuous.py makes them."""
        previews: dict[str, bytes] = {}
        for j in jobs:
            every = j.request.preview_every
            if not every or step % every or step >= total:
                continue
            latent = next((x0[i] for i, s in enumerate(live.samples) if s.job is j and i in x0), None)
            if latent is not None:
                began = time.monotonic()
                previews[j.id] = self.runner.preview(latent, live.key)
                self.metrics.preview_time.labels(self.model).observe(time.monotonic() - began)
        return previews

    # ------------------------------------------------------------------------------------------- update

    def update(self, output: BatchOutput) -> None:
        """Settle what a batch made: its jobs fail with the batch's failure; else each sample's PNG (encoding) is
        kept and every job with all its images goes to the finisher (stored, marked succeeded, acknowledged there).
        Metrics and the log line."""
        ran = output.ran
        if output.failure is not None:
            for j in ran.jobs:
                if not j.done:
                    self._fail(j, output.failure)
            return
        if not ran.samples:
            return
        key, jobs = ran.key, ran.jobs
        labels = (self.model, key.task.value)
        self.metrics.batch_size.labels(*labels).observe(len(ran))
        self.metrics.batch_duration.labels(*labels).observe(output.seconds)
        log.info(kv("batch_done", model=self.model, task=key.task.value, size=f"{key.width}x{key.height}",
                    steps=key.steps, jobs=len(jobs), samples=len(ran), seconds=output.seconds))
        for sample, png in zip(ran.samples, output.pngs, strict=True):
            if png is not None and not sample.job.done:
                sample.job.encoding[sample.index] = png
        for j in jobs:
            if not j.done and len(j.encoding) == j.request.n:
                self.hand(j)

    def hand(self, job: JobState) -> None:
        """Give a job whose images are all decoded (their PNGs encoding) to the finisher; the loop goes on."""
        job.handed = True
        self.finisher.hand(functools.partial(self._settle, job, time.monotonic()), len(job.encoding))

    def _settle(self, job: JobState, handed_at: float) -> None:
        """On the finisher's thread: wait for the job's PNGs and store it; a PNG that failed fails it alone. Queue
        errors propagate (the loop takes them at its next `collect`)."""
        try:
            wait(job.encoding.values())
            fault = png_fault(job)
            if fault is not None:
                self._png_failed(job, fault)
                return
            job.pngs.update((index, png.result()) for index, png in job.encoding.items())
            self._finish(job)
            self.metrics.finish_time.labels(self.model).observe(time.monotonic() - handed_at)
        finally:
            self._release([job.claim])

    def _png_failed(self, job: JobState, fault: BaseException) -> None:
        """A fault of the PNG encoder fails its job alone, with an incident id that finds this log line."""
        failure, incident = JobFailure.internal()
        log.error(kv("png_error", model=self.model, job=job.id, error=type(fault).__name__, incident=incident),
                  exc_info=fault)
        self._fail(job, failure)

    def _finish(self, job: JobState) -> None:
        pngs = [job.pngs[i] for i in range(job.request.n)]
        if not self.queue.finish(job.claim, pngs):
            self._lost(job)
            return
        task = job.request.task.value
        self.metrics.images.labels(self.model, task).inc(len(pngs))
        self._ended(job, "succeeded")
        log.info(kv("job_succeeded", job=job.id, task=task, images=len(pngs), attempt=job.claim.attempt))

    def _fail(self, job: JobState, failure: JobFailure) -> None:
        if not self.queue.fail(job.claim, str(failure)):
            self._lost(job)
            return
        self.metrics.job_failures.labels(self.model, failure.reason).inc()
        self._ended(job, "failed")
        log.warning(kv("job_failed", job=job.id, task=job.request.task.value, reason=failure.reason,
                       error=failure.message))

    def _cancelled(self, job: JobState, step: int, total: int) -> None:
        if not self.queue.cancelled(job.claim):
            self._lost(job)
            return
        self._ended(job, "cancelled")
        log.info(kv("job_cancelled", job=job.id, step=step, total=total))

    def _lost(self, job: JobState) -> None:
        job.done = True
        self._release([job.claim])
        self.metrics.jobs_lost.labels(self.model).inc()
        log.warning(kv("job_lost", job=job.id, reason="taken over by another worker"))

    def _ended(self, job: JobState, status: str) -> None:
        job.done = True
        self._release([job.claim])
        self.metrics.jobs_completed.labels(self.model, status).inc()
        if job.started is not None:
            self.metrics.job_run.labels(self.model, job.request.task.value).observe(time.monotonic() - job.started)

    def _release(self, claims: Sequence[Claim]) -> None:
        with self._lock:
            for c in claims:
                self._held.pop(c.job.id, None)
                self._steps_done.pop(c.job.id, None)

    # ------------------------------------------------------------------------------------------- heartbeat

    def _start_heartbeat(self) -> None:
        self._beat()  # registered before the first claim, so /readyz sees the worker at once
        self._beat_thread = threading.Thread(target=self._beat_loop, name="ldm-heartbeat", daemon=True)
        self._beat_thread.start()

    def _stop_heartbeat(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=self.beat_interval_s + 5)

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.beat_interval_s):
            self._beat()

    def _beat(self) -> None:
        """Heartbeat, and keep the claimed jobs (running or waiting their turn) from being taken over."""
        try:
            self.queue.heartbeat(self.info())
            self.metrics.heartbeats.inc()
            with self._lock:
                held = list(self._held.values())
            if held:
                self.queue.keepalive(held)
        except QueueError as exc:
            log.warning(kv("heartbeat_failed", error=exc))


# ----------------------------------------------------------------------------------------------- the process

@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread for the block's duration: the kernel gives them to another thread,
    and Python runs their handler in the main thread once it is back in Python code, after the block."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def default_worker_id() -> str:
    """host-pid-random: unique across restarts in a container where the pid is always the same."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:80] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def set_process_title(title: str = PROCESS_TITLE) -> str:
    """Make the process recognisable in `ps`; how it was done. With the optional `setproctitle` package the whole
    command line is replaced; otherwise, on Linux, the kernel's process name (`ps -o comm`, `ps -e`, `top`,
    `pgrep` without -f) is set with prctl(PR_SET_NAME), while the command line stays what started the process:
    `ldm worker ...` when started by the `ldm` command."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
        return "setproctitle"
    except ImportError:
        pass
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(15, title.encode()[:15], 0, 0, 0) == 0:  # 15 = PR_SET_NAME; 15 bytes + NUL
                return "prctl"
        except (OSError, AttributeError):
            pass
    return "none"


def configure_logging(level: str = "INFO") -> None:
    """key=value lines on stderr, unless the caller (the `ldm` command) configured logging already."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level.upper(), stream=sys.stderr,
                            format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")


class _Signals:
    """First SIGTERM/SIGINT: stop claiming and finish the jobs in hand; a second one: exit now."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.received = 0

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handle)
            signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received > 1:
            log.warning(kv("shutdown_now", signal=name))
            raise SystemExit(128 + signum)
        log.info(kv("shutdown_requested", signal=name, note="finishing the jobs in hand, claiming no more"))
        if self.worker is not None:
            self.worker.request_stop()


def _lora_metrics(metrics: WorkerMetrics, runner: Runner) -> None:
    """The LoRA cache's gauges (read from the runner at every scrape) and its file-read counter."""
    metrics.lora_cache_bytes.labels(runner.name).set_function(lambda: runner.lora_stats()[0])
    metrics.lora_cache_adapters.labels(runner.name).set_function(lambda: runner.lora_stats()[1])
    runner.on_lora_load = metrics.lora_loads.labels(runner.name).inc


def run_worker(settings: Settings, model_spec: str, *, worker_id: str | None = None, device: str | None = None,
               model_name: str | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT; the exit code (0 clean, 1 could not start: model or Redis).

    `model_spec`: a shipped model name, a checkpoint file, a diffusers folder or `random:<config>`; the worker
    serves the queue `model_name` (default: `served_name(model_spec)`). `device` overrides `worker_device`.
    """
    configure_logging()
    how = set_process_title()
    signals = _Signals()
    signals.install()
    worker_id = worker_id or default_worker_id()
    if settings.worker_torch_threads:
        torch.set_num_threads(settings.worker_torch_threads)
    metrics = WorkerMetrics()
    try:
        runner = Runner.load(model_spec, name=model_name, device=device or settings.worker_device,
                             dtype=settings.worker_dtype, winograd=settings.worker_winograd,
                             gpu=settings.worker_gpu_mode,
                             tokenizer_dir=settings.worker_tokenizer_dir,
                             tokenizer_2_dir=settings.worker_tokenizer_2_dir,
                             text=TextOptions(settings.prompt_syntax, settings.embeddings_dir, settings.lora_dir,
                                              int(settings.lora_cache_mb * 2**20)),
                             refiner=settings.worker_refiner)
    except (ValueError, OSError, RuntimeError) as exc:
        log.error(kv("model_load_failed", model=model_spec, refiner=settings.worker_refiner or "", error=exc))
        return 1
    runner.on_oom = metrics.oom_retries.labels(runner.name).inc
    _lora_metrics(metrics, runner)
    metrics.describe_worker(worker_id, runner.name, str(runner.device), str(runner.dtype).removeprefix("torch."))
    queue = SyncJobQueue(settings)
    server = None
    try:
        try:
            queue.ping()
        except QueueUnavailable as exc:
            log.error(kv("redis_unavailable", error=exc))
            return 1
        server, url = start_metrics_server(metrics.registry, settings.worker_metrics_port,
                                           settings.worker_metrics_host)
        from service.worker.continuous import ContinuousWorker  # it builds on this module's Worker

        worker_class = ContinuousWorker if settings.batching == "continuous" else Worker
        worker = worker_class(settings, queue, runner, metrics, worker_id)
        signals.worker = worker
        if signals.received:  # a signal while the model loaded
            worker.request_stop()
        log.info(kv("worker_started", worker=worker_id, model=runner.name, spec=model_spec,
                    refiner=runner.refiner_name or "", device=runner.device,
                    dtype=str(runner.dtype).removeprefix("torch."), tasks=",".join(sorted(runner.tasks)),
                    max_batch=settings.max_batch, batching=settings.batching, metrics=url, pid=os.getpid(), title=how))
        try:
            code = worker.run()
        except Exception:  # a bug: exit non-zero so a supervisor restarts us; our jobs are taken over
            log.exception(kv("worker_crashed", worker=worker_id))
            code = 1
        finally:
            worker.close()
        log.info(kv("worker_stopped", worker=worker_id, exit_code=code))
        return code
    finally:
        if server is not None:
            server.shutdown()
        queue.close()
