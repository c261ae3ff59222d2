"""Continuous batching in the worker (`LDM_BATCHING=continuous`): the sampler loop is a step scheduler.

The static worker claims a batch and samples it to its end, so a job that arrives one step later waits for the
whole batch. Here every loop iteration is one denoiser call over the samples running (models/step_batch.py; Orca's
and vLLM's iteration-level scheduling), and at each step boundary the worker

- retires the samples whose plan ended: decode (`Started.finish`), PNG (on the runner's PNG threads), and once all
  of a job's images are decoded the job goes to the finisher (service/worker/finisher.py), whose thread waits for
  its PNGs, stores it and acknowledges it (`finish`) while the next steps run;
- reports each job's step to the queue, with a preview PNG of its x0 estimate every `preview_every` steps when the
  request asks for one; the queue's answer stops cancelled jobs (their samples leave the batch at once, the slot is
  free for the next step) and drops jobs another worker took over;
- claims new jobs without blocking (an idle worker blocks up to `max_wait_ms` as the static one does), holding at
  most `max_batch` samples, and admits them while they fit: same task and image size as the jobs running (the model
  is the worker's; `StepBatch.refusal` has the last word), at most `max_batch` samples, or fewer under a step cost
  budget (`step_cost_budget`, service/worker/admission.py: the worker measures its step times by batch size).
  Samplers, step counts, guidance scales, strengths and seeds may differ. Waiting jobs take free slots in the
  `admission_order` (arrival order, or least work first with aging). A job is started (text encoding, noise) when
  its first sample fits; its other samples join as slots free up, before any later job's. The first job in that
  order that does not fit waits, and the jobs behind it too, so the batch drains for it: nobody starves.

An image is bit-identical to the one the static worker makes (and to a solo run) on the CPU, whenever it joined:
each sample has its own state and generator, and guidance is mixed per row (models/step_batch.py).

A job taken over from a silent worker (XAUTOCLAIM) still runs alone, in quarantine: nothing more is admitted until
the running samples finish, then it runs by the static path. Heartbeats keep every claimed job alive (running or
waiting); SIGTERM stops claiming, and the loop runs until the jobs in hand are done.

CUDA out of memory in a step splits it, as the static worker splits a batch in halves: a step is all or nothing
(`StepBatch.step`), so no sample loses its state, and the next steps run the same samples in denoiser calls of half
as many rows (`rows_per_call`), halving again at each new out-of-memory, until the running set drains; then a new
batch tries one call again. Nothing leaves the batch and the images do not change (the rows of a call do not depend
on its other rows). When one sample alone does not fit, the running jobs fail with `out_of_memory`. Any other fault
of a step (ours or the device's) fails the jobs running; the worker lives on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from PIL import Image

from models.pipeline import Started
from models.step_batch import StepBatch, StepSample
from service.queue import Claim, QueueError
from service.worker.admission import StepCosts, Waiting, admission_order, step_capacity
from service.worker.process import JobState, Worker, kv, png_fault
from service.worker.runner import JobFailure, SampleInput

log = logging.getLogger("service.worker")


@dataclass(eq=False)
class Running:
    """A started job: its pipeline start (for `finish`), its samples' inputs, those not admitted yet."""

    job: JobState
    started: Started
    inputs: list[SampleInput]
    queued: list[StepSample] = field(default_factory=list)
    keys: list[Hashable] = field(default_factory=list)
    #: final latents of the first model's share, by image index, while a second model is to finish them (`then`)
    handed: dict[int, torch.Tensor] = field(default_factory=dict)


class ContinuousWorker(Worker):
    """A `Worker` whose step is one sampler step of every running sample (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch = self._new_batch()
        self.waiting: list[JobState] = []  # claimed, not started
        self.running: dict[str, Running] = {}  # started, in arrival order
        self.quarantined: list[Claim] = []
        self.rows_per_call: int | None = None  # samples per denoiser call after an out-of-memory split; None: all
        self.costs = StepCosts()  # measured step times by batch size (the step cost budget's estimates)

    def _new_batch(self) -> StepBatch:
        pipeline = self.runner.pipeline
        return StepBatch(pipeline.denoiser, max_items=self.settings.max_batch, around=pipeline.adapters_for)

    def holding(self) -> bool:
        return bool(self.running or self.waiting or self.quarantined)

    def reset(self) -> None:
        super().reset()
        self.batch = self._new_batch()
        self.waiting, self.running, self.quarantined = [], {}, []
        self.rows_per_call = None

    def step(self) -> int:
        """Take what there is room for, admit what fits, run one step; the number of jobs taken."""
        self.finisher.collect()
        taken = self._take()
        if self.quarantined and not self.running:  # drained: the taken-over job runs alone
            claims, self.quarantined = self.quarantined, []
            self.run_claims(claims)
            return taken
        if not self.running and not self.waiting:
            return taken
        self._busy = True
        try:
            with self.metrics.busy.busy():
                self._admit()
                if len(self.batch):
                    self._iterate()
                if not len(self.batch):  # drained: the next batch tries one call again
                    self.rows_per_call = None
        finally:
            self._busy = self.holding()
        return taken

    # ------------------------------------------------------------------------------------------- take and admit

    def _take(self) -> int:
        """Claim new jobs for the free slots (not while stopping, nor while a taken-over job waits its turn)."""
        if self.stopping or self.quarantined:
            return 0
        reclaimed = self.reclaim()
        if reclaimed:
            self.quarantined = reclaimed
            return len(reclaimed)
        waiting = sum(j.request.n for j in self.waiting) + sum(len(r.queued) for r in self.running.values())
        room = self.settings.max_batch - len(self.batch) - waiting
        if room <= 0:
            return 0
        busy = bool(self.running or self.waiting)
        claims = self.claim_new(room, 1 if busy else self.settings.max_wait_ms)
        self.waiting += [j for j in (self._prepare(c) for c in claims) if j is not None]
        return len(claims)

    def _room(self) -> int:
        """Samples that may join the next step: up to `max_batch`, or the step cost budget's capacity."""
        capacity = step_capacity(self.costs, self.settings.step_cost_budget, self.settings.max_batch)
        return capacity - len(self.batch)

    def _fits(self, job: JobState) -> bool:
        """Same task and image size as the jobs running (or none running)."""
        first = next(iter(self.running.values()), None)
        return first is None or (first.job.key.task, first.job.key.width, first.job.key.height) == (
            job.key.task, job.key.width, job.key.height)

    def _admit(self) -> None:
        """Queued samples of started jobs first, then waiting jobs in order while they fit (none while a
        taken-over job waits to run alone)."""
        for r in list(self.running.values()):
            self._admit_samples(r)
        self._order_waiting()
        while (self.waiting and not self.quarantined and self._room() > 0 and self._fits(self.waiting[0])
               and not any(r.queued for r in self.running.values())):  # waiting samples first (no starving)
            job = self.waiting.pop(0)
            running = self._start_job(job)
            if running is not None:
                self.running[job.id] = running
                self._retire_unstepped(running)
                self._admit_samples(running)

    def _order_waiting(self) -> None:
        """Put the waiting jobs in the order they may take free slots (`admission_order`; stable: fifo keeps them)."""
        if self.settings.admission_order == "fifo" or len(self.waiting) < 2:
            return
        now = time.time()
        views = [Waiting(work=j.request.n * j.request.steps, waited_s=now - j.claim.job.created_at.timestamp())
                 for j in self.waiting]
        order = admission_order(views, self.settings.admission_order, self.settings.priority_aging_s)
        self.waiting = [self.waiting[i] for i in order]

    def _admit_samples(self, r: Running) -> None:
        while r.queued and self._room() > 0:
            sample = r.queued[0]
            if not self.batch.compatible(sample):  # contexts of another length: it joins when the batch drains
                return
            reason = self.batch.refusal(sample)
            if reason is not None:  # the key check let it through, so this is ours to explain
                self._drop(r)
                self._fail(r.job, JobFailure("internal", f"cannot join the running batch: {reason}"))
                return
            mid_run = len(self.batch) > 0
            self.batch.admit(r.queued.pop(0))
            if mid_run:
                self.metrics.joined_mid_run.labels(self.model).inc()

    def _start_job(self, job: JobState) -> Running | None:
        """Mark the job running in the queue and start its samples; None when it was cancelled while queued, taken
        over, or failed to start."""
        if job.done:
            return None
        if not self.queue.start([job.claim]):
            job.done = True
            self._release([job.claim])
            return None
        job.started = time.monotonic()
        self.metrics.job_wait.labels(self.model).observe(max(0.0, time.time() - job.claim.job.created_at.timestamp()))
        inputs = [SampleInput(job.request, seed, job.image, job.mask) for seed in job.request.seeds()]
        try:
            started = self.runner.start(job.key, inputs)
        except JobFailure as failure:
            self._fail(job, failure)
            return None
        except QueueError:
            raise
        except torch.cuda.OutOfMemoryError:
            started = None  # handled below, outside the handler, so the traceback's frames free their tensors first
        except Exception as exc:  # a fault of ours or of the device: this job fails, the worker lives on
            fault, incident = JobFailure.internal()
            log.exception(kv("start_error", model=self.model, job=job.id, error=type(exc).__name__, incident=incident))
            self._fail(job, fault)
            return None
        if started is None:
            self._fail(job, self._out_of_memory("start", job))
            return None
        samples = [replace(s, key=(job.id, index)) for index, s in enumerate(started.samples)]
        return Running(job, started, inputs, queued=samples, keys=[s.key for s in samples])

    def _retire_unstepped(self, r: Running) -> None:
        """Samples with no step to run (an img2img plan of strength 0) are done as they start."""
        for s in [s for s in r.queued if s.state.done]:
            if r.job.id not in self.running:  # failed at an earlier image's decode
                return
            r.queued.remove(s)
            image = self._decoded(r, s)
            if image is not None:
                r.job.encoding[_index(s)] = self.runner.submit_png(r.job.key, r.inputs[_index(s)], image)
        if r.job.id in self.running:
            self._settle_if_done(r)

    # ------------------------------------------------------------------------------------------- one step

    def _iterate(self) -> None:
        began = time.monotonic()
        size = len(self.batch)
        task = next(iter(self.running.values())).job.key.task.value
        try:
            advanced = self.batch.step(self.rows_per_call)
        except torch.cuda.OutOfMemoryError:
            advanced = None  # split below, outside the handler, so the traceback's frames free their tensors first
        except Exception as exc:  # a fault of ours or of the device: the running jobs fail, the worker lives on
            failure, incident = JobFailure.internal()
            log.exception(kv("step_error", model=self.model, error=type(exc).__name__, incident=incident))
            self.runner.free_cached_memory()
            self._fail_running(failure)
            return
        if advanced is None:
            self._split(size)
            return
        seconds = time.monotonic() - began
        self.costs.observe(size, seconds)
        self.metrics.step_time.labels(self.model).observe(seconds)
        self.metrics.batch_size.labels(self.model, task).observe(size)
        by_job: dict[str, list[StepSample]] = {}
        for s in advanced:
            by_job.setdefault(_job_id(s), []).append(s)
        self._stepped(size, seconds, [(self.running[j].job.claim, samples[0].state.i) for j, samples in by_job.items()
                                      if j in self.running])
        self._report(by_job)
        self._retire(by_job)
        self._png_faults()

    def _retire(self, by_job: dict[str, list[StepSample]]) -> None:
        """Decode the samples whose plan ended at this step, their PNGs to the runner's PNG threads, and hand the
        jobs that have all of their images to the finisher; a fault fails its job alone."""
        for job_id, samples in by_job.items():
            r = self.running.get(job_id)
            if r is None or r.job.done:
                continue
            for s in samples:
                if s.state.done and r.job.id in self.running:  # not failed at an earlier image's decode
                    image = self._decoded(r, s)
                    if image is not None:
                        r.job.encoding[_index(s)] = self.runner.submit_png(r.job.key, r.inputs[_index(s)], image)
        for job_id in by_job:
            r = self.running.get(job_id)
            if r is not None and not r.job.done:
                self._settle_if_done(r)

    def _png_faults(self) -> None:
        """A running job one of whose PNGs already failed fails now, and its samples leave the batch: the images it
        has left to make would be thrown away (the finisher fails a job whose PNG fails after its last image)."""
        for r in list(self.running.values()):
            fault = png_fault(r.job)
            if fault is not None:
                self._drop(r)
                self._png_failed(r.job, fault)

    def _split(self, size: int) -> None:
        """A step of `size` samples ran out of device memory (and changed nothing): the next steps make denoiser calls
        of half as many rows; when one row did not fit, the running jobs fail with `out_of_memory`."""
        self.runner.free_cached_memory()
        rows = min(self.rows_per_call or size, size)
        if rows <= 1:
            self._fail_running(self.runner.out_of_memory(next(iter(self.running.values())).job.key))
            return
        self.rows_per_call = (rows + 1) // 2
        log.warning(kv("out_of_memory_split", model=self.model, samples=size, rows_per_call=self.rows_per_call))
        if self.runner.on_oom is not None:
            self.runner.on_oom()

    def _out_of_memory(self, stage: str, job: JobState) -> JobFailure:
        """Starting a job (encoding its inputs, its conditioning) or decoding one of its images ran out of device
        memory: no smaller unit is left to try there, so that job fails with `out_of_memory`; the memory the fault
        held is freed, and the worker and the other running jobs go on."""
        self.runner.free_cached_memory()
        log.warning(kv("out_of_memory", model=self.model, job=job.id, stage=stage, running=len(self.batch)))
        if self.runner.on_oom is not None:
            self.runner.on_oom()
        return self.runner.out_of_memory(job.key)

    def _fail_running(self, failure: JobFailure) -> None:
        for r in list(self.running.values()):
            self._drop(r)
            self._fail(r.job, failure)

    def _decoded(self, r: Running, s: StepSample) -> Image.Image | None:
        """A finished sample's image (its PNG is the caller's), or None: handed to the refiner, or the job failed."""
        index = _index(s)
        if r.started.then is not None:
            self._hand_over(r, index, s.latent)
            return None
        try:
            image = r.started.finish(index, s.latent)
        except torch.cuda.OutOfMemoryError:
            image = None  # handled below, outside the handler (its frames hold the decoder's tensors)
        if image is None:
            failure = self._out_of_memory("decode", r.job)
            self._drop(r)
            self._fail(r.job, failure)
            return None
        return image

    def _hand_over(self, r: Running, index: int, latent: torch.Tensor) -> None:
        """SDXL's refiner: the base's share ran in the step batch; once all of the job's images have reached the
        switch, the refiner finishes them in one run (the static path's `then`, the same images), between two
        steps of the batch (its steps are reported, not stopped: a cancel takes effect when it is done)."""
        r.handed[index] = latent
        if len(r.handed) < r.job.request.n or r.started.then is None:
            return
        latents = torch.cat([r.handed[k] for k in range(r.job.request.n)])

        def progress(step: int, total: int) -> None:  # the refiner's steps, reported as the static worker does
            self.queue.progress([r.job.claim], step, total)

        with _failing(self, r):
            refined = r.started.then(latents, progress)
            for k in range(r.job.request.n):
                image = r.started.finish(k, refined[k : k + 1])
                r.job.encoding[k] = self.runner.submit_png(r.job.key, r.inputs[k], image)

    def _settle_if_done(self, r: Running) -> None:
        """A job with all of its images decoded leaves the running set for the finisher."""
        if not r.job.done and len(r.job.encoding) == r.job.request.n:
            self.running.pop(r.job.id, None)
            self.hand(r.job)

    def _report(self, by_job: dict[str, list[StepSample]]) -> None:
        """Each advanced job's step (and preview) to the queue, one call per (step, total); stop the jobs it says
        to stop."""
        groups: dict[tuple[int, int], list[Running]] = {}
        previews: dict[str, bytes] = {}
        for job_id, samples in by_job.items():
            r = self.running.get(job_id)
            if r is None or r.job.done:
                continue
            state = samples[0].state
            step, total = state.i, r.started.total_steps or state.plan.steps  # a refiner's steps count too
            groups.setdefault((step, total), []).append(r)
            every = r.job.request.preview_every
            if every and step % every == 0 and step < total and state.denoised is not None:
                began = time.monotonic()
                previews[job_id] = self.runner.preview(state.denoised, r.job.key)
                self.metrics.preview_time.labels(self.model).observe(time.monotonic() - began)
        for (step, total), group in groups.items():
            stop = self.queue.progress([r.job.claim for r in group], step, total,
                                       previews={r.job.id: previews[r.job.id] for r in group if r.job.id in previews})
            for r in group:
                if stop.get(r.job.id) == "cancel":
                    self._drop(r)
                    self._cancelled(r.job, step, total)
                elif stop.get(r.job.id) == "lost":
                    self._drop(r)
                    self._lost(r.job)

    def _drop(self, r: Running) -> None:
        """Take a job's samples out of the batch (their slots are free for the next step)."""
        for key in r.keys:
            self.batch.cancel(key)
        r.queued.clear()
        self.running.pop(r.job.id, None)


@contextlib.contextmanager
def _failing(worker: ContinuousWorker, r: Running) -> Iterator[None]:
    """A fault while a job's images are finished (the refiner's run, decoding) fails that job alone (its PNGs'
    faults fail it in the finisher)."""
    try:
        yield
    except QueueError:
        raise
    except Exception as exc:
        failure, incident = JobFailure.internal()
        log.exception(kv("finish_error", model=worker.model, job=r.job.id, error=type(exc).__name__,
                         incident=incident))
        worker._drop(r)  # its samples still running (if any) leave the batch too
        worker._fail(r.job, failure)


def _job_id(sample: StepSample) -> str:
    """Sample keys in this batch are (job id, image index)."""
    key = cast(tuple[str, int], sample.key)
    return key[0]


def _index(sample: StepSample) -> int:
    key = cast(tuple[str, int], sample.key)
    return key[1]
