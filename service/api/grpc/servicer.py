"""`DiffusionServicer`, ldm.v1.Diffusion's methods: messages in (`convert.py`), queue calls, messages out.

It submits jobs (after the same `check_model` as REST: the model, its tasks and the labels it takes), follows
their events and answers with their PNGs. It raises the queue's, the schemas' and `errors.py`'s exceptions as they
come and never picks a status code: `interceptor.py` does, for every method (`status.status_of`).

Deadlines: a waiting call follows its job at most until the client's deadline (a little before it, so the
client gets our message) and never longer than `job_deadline_s`; then, or when the client cancels the call, the
job is cancelled, unless the request carried an idempotency key: a retry with that key picks the job up again,
so it is left to finish. Either way the job id was sent at once as initial metadata `ldm-job-id`. A job's
`parameters.webhook_url` is checked against the allow-list before the model (INVALID_ARGUMENT naming it) and
registered once the job is queued (service/webhooks.py), as REST does: its terminal event reaches the URL even when
the call ended first. Without an
idempotency key, the client's deadline is also the job's deadline to start: should the cancellation be lost (the
API dies first), no worker runs a job whose caller has given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from service import webhooks
from service.api.grpc.convert import idempotency_key, to_image, to_job, to_parameters, to_progress, to_request
from service.api.grpc.errors import BadRequest, JobEnded, ResultsExpired, WaitTimeout
from service.api.grpc.stubs import pb, pb_grpc
from service.api.ownership import visible_job
from service.api.submit import check_model
from service.auth import current_principal
from service.config import Settings
from service.images import decode_image, decode_label_map, decode_mask
from service.queue import EVENT_ID, Job, JobEvent, JobNotFound, JobQueue, JobStatus, QueueUnavailable
from service.quotas import Quotas
from service.schemas import GenerationRequest, Task

log = logging.getLogger(__name__)

JOB_ID_METADATA = "ldm-job-id"  # initial metadata of every call that submits a job
DEADLINE_MARGIN_S = 0.05  # answer this much before the client's deadline, so it gets our status and message
POLL_S = 1.0  # longest blocking read of a job's events; between reads with no event the job record is checked


class _Submission(Protocol):
    """What every generating request message has: its parameters (with `webhook_url`) and its idempotency key."""

    @property
    def parameters(self) -> pb.GenerationParameters: ...

    @property
    def idempotency_key(self) -> str: ...


@dataclass
class _Waiting:
    """A call waiting for its job. When the call ends (answered, failed, cancelled, deadline) before the job did,
    the job is cancelled unless the request had an idempotency key (a retry with the key picks it up)."""

    job: Job
    keep: bool
    loop: asyncio.AbstractEventLoop
    job_ended: bool = False
    call_ended: bool = False


class DiffusionServicer(pb_grpc.DiffusionServicer):
    """ldm.v1.Diffusion: messages in, queue calls, messages out. Errors propagate to `StatusInterceptor`."""

    def __init__(self, queue: JobQueue, settings: Settings) -> None:
        self.queue, self.settings = queue, settings
        self.quotas = Quotas(queue)
        self._background: set[asyncio.Task[None]] = set()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.txt2img), request, context)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        waiting = await self._submit(to_request(request.parameters, Task.txt2img), request, context)
        job_id = waiting.job.id
        async with contextlib.aclosing(self._follow(waiting, context, positions=True)) as events:
            async for event in events:
                yield pb.GenerateStreamResponse(job_id=job_id, progress=to_progress(event))
        for image in await self._images(await self._succeeded(job_id)):
            yield pb.GenerateStreamResponse(job_id=job_id, image=image)

    async def Inpaint(self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        image = await asyncio.to_thread(decode_image, request.image, self.settings)  # CPU work: off the loop
        mask = await asyncio.to_thread(decode_mask, request.mask, image, self.settings)
        generation = to_request(request.parameters, Task.inpaint, image=image.png, mask=mask.png, size=image.size)
        return await self._generate(generation, request, context)

    async def Img2Img(self, request: pb.ImageRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._image_task(Task.img2img, request, context)

    async def Upscale(self, request: pb.ImageRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._image_task(Task.upscale, request, context)

    async def _image_task(self, task: Task, request: pb.ImageRequest,
                          context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        image = await asyncio.to_thread(decode_image, request.image, self.settings)  # CPU work: off the loop
        generation = to_request(request.parameters, task, image=image.png, size=image.size)
        return await self._generate(generation, request, context)

    async def ClassToImage(self, request: pb.GenerateRequest,
                           context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.class_), request, context)

    async def LayoutToImage(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.layout), request, context)

    async def SemanticToImage(self, request: pb.SemanticRequest,
                              context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        labels = await asyncio.to_thread(decode_label_map, request.label_map, self.settings)  # CPU work: off the loop
        generation = to_request(request.parameters, Task.semantic, label_map=labels.png, size=labels.size)
        return await self._generate(generation, request, context, labels.labels)

    async def Unconditional(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.unconditional), request, context)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        job = await self.queue.with_place(await self._visible(request.job_id))
        with_images = request.include_images and job.status == JobStatus.succeeded
        return to_job(job, await self._images(job) if with_images else ())

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.Progress]:
        """Relay the job's events up to its terminal one (see the proto). An observer: the job is not tied to the
        call, and the call's deadline (not `job_deadline_s`) bounds the wait."""
        after = request.after_event_id or "0-0"
        if not EVENT_ID.match(after):
            raise BadRequest("after_event_id", f"not an event id: {request.after_event_id!r}")
        await self._visible(request.job_id)  # NOT_FOUND (unknown or another key's) before the stream starts
        ended = asyncio.Event()
        context.add_done_callback(lambda _: ended.set())
        watched = self.queue.follow(request.job_id, after, poll_s=POLL_S, positions=True)
        async with contextlib.aclosing(watched) as batches:
            async for events in batches:
                if ended.is_set():  # the call ended: a cancellation a Redis call swallowed (Python 3.11)
                    return
                for event in events:
                    yield to_progress(event)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        await self._visible(request.job_id)  # its owner never changes: checked once, before the cancel
        await self.queue.cancel(request.job_id)
        return to_job(await self._visible(request.job_id))

    # -- helpers

    async def _generate(self, request: GenerationRequest, message: _Submission, context: grpc.aio.ServicerContext,
                        map_labels: Sequence[int] = ()) -> pb.GenerateResponse:
        """Submit the job, wait for its end, answer its images (the unary generating calls)."""
        waiting = await self._submit(request, message, context, map_labels)
        async with contextlib.aclosing(self._follow(waiting, context)) as events:
            async for _ in events:
                pass
        return await self._answer(waiting.job.id)

    async def _submit(self, request: GenerationRequest, message: _Submission, context: grpc.aio.ServicerContext,
                      map_labels: Sequence[int] = ()) -> _Waiting:
        """Check the webhook URL and the model (`check_model`: as REST does), queue the job, register its webhook,
        send its id as initial metadata, and tie the job to the call (see `_Waiting`)."""
        key = idempotency_key(message.idempotency_key, context.invocation_metadata())
        hook = webhooks.checked(message.parameters.webhook_url or None, self.settings)
        request = await check_model(self.queue, self.settings, request, map_labels)
        remaining = context.time_remaining()
        deadline_s = max(0.001, remaining) if remaining is not None and key is None else None
        job = await self.quotas.submit(current_principal.get(), request, idempotency_key=key, deadline_s=deadline_s)
        if hook is not None:
            await webhooks.register(self.queue, job.id, hook)
        waiting = _Waiting(job, keep=key is not None, loop=asyncio.get_running_loop())
        context.add_done_callback(lambda _: self._call_ended(waiting))  # runs however the call ends
        await context.send_initial_metadata(((JOB_ID_METADATA, waiting.job.id),))
        return waiting

    async def _follow(self, waiting: _Waiting, context: grpc.aio.ServicerContext,
                      positions: bool = False) -> AsyncGenerator[JobEvent, None]:
        """The job's events up to a terminal one (with `position` events while it is queued, for a streaming call);
        WaitTimeout when the call's deadline (or `job_deadline_s`) comes first."""
        job_id = waiting.job.id
        remaining = context.time_remaining()
        budget = self.settings.job_deadline_s
        if remaining is not None:
            budget = min(budget, remaining - DEADLINE_MARGIN_S)
        until = time.monotonic() + budget
        followed = self.queue.follow(job_id, poll_s=POLL_S, until=until, positions=positions)
        async with contextlib.aclosing(followed) as batches:
            async for events in batches:
                if waiting.call_ended:  # a cancellation of this task that a Redis call swallowed (Python 3.11)
                    raise asyncio.CancelledError
                for event in events:
                    waiting.job_ended = event.terminal
                    yield event
        if not waiting.job_ended:  # the deadline came first, or the job ended without an event we saw
            if not (await self._record(job_id)).status.terminal:
                raise WaitTimeout(job_id, waiting.keep)
            waiting.job_ended = True

    def _call_ended(self, waiting: _Waiting) -> None:
        waiting.call_ended = True
        if not (waiting.job_ended or waiting.keep):
            waiting.loop.call_soon_threadsafe(self._spawn_cancel, waiting.job.id)

    def _spawn_cancel(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel_abandoned(job_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_abandoned(self, job_id: str) -> None:
        try:
            status = await self.queue.cancel(job_id)
            log.info("job %s: its gRPC call ended first; cancelled (now %s)", job_id, status.value)
        except (JobNotFound, QueueUnavailable) as exc:
            log.warning("job %s: its gRPC call ended first, but cancelling it failed: %s", job_id, exc)

    async def drain(self) -> None:
        """Let the background cancellations finish (on shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _visible(self, job_id: str) -> Job:
        """The job if the caller (`current_principal`, set by the interceptor) may see it; JobNotFound, as for an
        unknown id, when it is another key's (service/api/ownership.py)."""
        return await visible_job(self.queue, job_id, current_principal.get())

    async def _record(self, job_id: str) -> Job:
        job = await self.queue.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def _succeeded(self, job_id: str) -> Job:
        job = await self._record(job_id)
        if job.status != JobStatus.succeeded:
            raise JobEnded(job)
        return job

    async def _images(self, job: Job) -> list[pb.Image]:
        pngs = await asyncio.gather(*(self.queue.result(job.id, i) for i in range(job.results)))
        if any(png is None for png in pngs):
            raise ResultsExpired(f"the images of job {job.id} have expired")
        return [to_image(png, i, seed) for i, (png, seed) in enumerate(zip(pngs, job.request.seeds(), strict=False))
                if png is not None]

    async def _answer(self, job_id: str) -> pb.GenerateResponse:
        job = await self._succeeded(job_id)
        return pb.GenerateResponse(job_id=job.id, images=await self._images(job), parameters=to_parameters(job.request))
