"""The gRPC front end: `ldm.v1.Diffusion` (proto/ldm/v1/ldm.proto) over the job queue, on grpc.aio.

Three parts, each doing one thing:
- conversions (`to_request`, `to_parameters`, `to_job`, ...): proto messages <-> the shared schemas, pure;
- `DiffusionServicer`: submits jobs (after the same `check_model` as REST: the model, its tasks and the labels it
  takes), follows their events, answers with their PNGs. It raises the queue's and the schemas' exceptions as they
  come; it never picks a status code;
- `StatusInterceptor`: the one place exceptions become status codes (`status_of`), for every method of the
  service; it also turns request bytes that do not parse into INVALID_ARGUMENT instead of grpc's UNKNOWN;
- `CallGuard`, run by the interceptor before each call: the API key (metadata `authorization: Bearer <key>`;
  UNAUTHENTICATED, or PERMISSION_DENIED for a revoked key; service/auth.py) and, for the calls that submit a
  job, the key's rate (RESOURCE_EXHAUSTED + `retry-after`; service/quotas.py).

Beside them on the same server: the standard health service (grpc.health.v1; "" and "ldm.v1.Diffusion" are
SERVING while Redis answers a ping, checked every `grpc_health_interval_s`) and server reflection.

Deadlines: a waiting call follows its job at most until the client's deadline (a little before it, so the
client gets our message) and never longer than `job_deadline_s`; then, or when the client cancels the call, the
job is cancelled, unless the request carried an idempotency key: a retry with that key picks the job up again,
so it is left to finish. Either way the job id was sent at once as initial metadata `ldm-job-id`. Without an
idempotency key, the client's deadline is also the job's deadline to start: should the cancellation be lost (the
API dies first), no worker runs a job whose caller has given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import struct
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service.api.images import ImageError, decode_image, decode_label_map, decode_mask
from service.api.submit import check_model
from service.auth import Authenticator, AuthError, current_principal
from service.config import Settings
from service.metrics import ApiMetrics
from service.queue import (
    EVENT_ID,
    IDEMPOTENCY_KEY,
    IdempotencyConflict,
    Job,
    JobEvent,
    JobNotFound,
    JobQueue,
    JobStatus,
    QueueFull,
    QueueUnavailable,
)
from service.quotas import QuotaExceeded, Quotas
from service.schemas import GenerationRequest, Task

try:
    from service.api._proto.ldm.v1 import ldm_pb2 as pb
    from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc
except ModuleNotFoundError as exc:  # pragma: no cover - a checkout where nobody built the stubs
    if not (exc.name or "").startswith("service.api._proto"):
        raise
    raise ModuleNotFoundError("the gRPC stubs are not generated: run `python -m service.api.proto_build` "
                              "(`make install` does)", name=exc.name) from exc

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Diffusion"].full_name  # "ldm.v1.Diffusion"
JOB_ID_METADATA = "ldm-job-id"  # initial metadata of every call that submits a job
IDEMPOTENCY_METADATA = "idempotency-key"
RETRY_AFTER_METADATA = "retry-after"  # trailing metadata of RESOURCE_EXHAUSTED and UNAVAILABLE (seconds)
AUTHORIZATION_METADATA = "authorization"  # "Bearer <API key>"
#: the calls that spend the key's rate
SUBMITTING_METHODS = frozenset({"Generate", "GenerateStream", "Inpaint", "Img2Img", "Upscale", "ClassToImage",
                                "LayoutToImage", "SemanticToImage", "Unconditional"})
DEADLINE_MARGIN_S = 0.05  # answer this much before the client's deadline, so it gets our status and message
POLL_S = 1.0  # longest blocking read of a job's events; between reads with no event the job record is checked
_PARAMETER_FIELDS = frozenset(pb.GenerationParameters.DESCRIPTOR.fields_by_name)
_OPTIONAL_FIELDS = ("seed", "steps", "guidance_scale", "width", "height", "n", "strength", "eta")


# ----------------------------------------------------------------------------------------------- errors

class BadRequest(ValueError):
    """A request the schemas cannot even be asked about (-> INVALID_ARGUMENT); `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class WaitTimeout(Exception):
    """The job did not end before the call's deadline (-> DEADLINE_EXCEEDED)."""

    def __init__(self, job_id: str, kept: bool) -> None:
        fate = ("it is left to finish: resend the request with the same idempotency key for its result" if kept
                else "it was cancelled")
        super().__init__(f"job {job_id} did not finish before the call's deadline; {fate}")


class JobEnded(Exception):
    """The job ended without images: cancelled (-> CANCELLED) or failed (-> the code of its reason, see
    `_FAILURE_CODES`; INTERNAL when none applies)."""

    def __init__(self, job: Job) -> None:
        detail = f"failed: {job.error}" if job.status == JobStatus.failed else f"was {job.status.value}"
        super().__init__(f"job {job.id} {detail}")
        self.job = job


class ResultsExpired(Exception):
    """The job succeeded but its PNGs are gone (result TTL) (-> NOT_FOUND)."""


# ----------------------------------------------------------------------------------------------- conversions

def to_request(params: pb.GenerationParameters, task: Task, *, image: bytes | None = None,
               mask: bytes | None = None, label_map: bytes | None = None,
               size: tuple[int, int] | None = None) -> GenerationRequest:
    """The schema request; unset proto fields are left to the schema's defaults. Raises ValidationError.
    `size` is the input image's (or label map's) (width, height), which the parameters must not contradict."""
    fields: dict[str, Any] = {"prompt": params.prompt, "negative_prompt": params.negative_prompt,
                              "karras": params.karras}
    if params.model:
        fields["model"] = params.model
    if params.sampler:
        fields["sampler"] = params.sampler
    if params.class_label:
        fields["class_label"] = params.class_label
    if params.layout:
        fields["layout"] = [{"label": b.label, "box": [b.x0, b.y0, b.x1, b.y1]} for b in params.layout]
    fields |= {name: getattr(params, name) for name in _OPTIONAL_FIELDS if params.HasField(name)}
    if size is not None:
        what = "label map" if label_map is not None else "image"
        for name, value in zip(("width", "height"), size, strict=True):
            if fields.setdefault(name, value) != value:
                raise BadRequest(f"parameters.{name}", f"{name} is {fields[name]} but the {what}'s is {value}; "
                                 f"leave it unset (the {what} sets the size)")
    return GenerationRequest(task=task, image=image, mask=mask, label_map=label_map, **fields)


def to_parameters(request: GenerationRequest) -> pb.GenerationParameters:
    """The parameters a job ran with (after admission every default is resolved, except a None size: the
    model's default, which the images' own sizes then show)."""
    layout = [pb.LayoutBox(label=str(b.label), x0=b.box[0], y0=b.box[1], x1=b.box[2], y1=b.box[3])
              for b in request.layout or ()]
    return pb.GenerationParameters(
        prompt=request.prompt, negative_prompt=request.negative_prompt, model=request.model or "",
        seed=request.seed, steps=request.steps, sampler=request.sampler, karras=request.karras,
        guidance_scale=request.effective_guidance, width=request.width, height=request.height, n=request.n,
        strength=request.effective_strength, eta=request.eta,
        class_label="" if request.class_label is None else str(request.class_label), layout=layout)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; (0, 0) if it is not a PNG."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return 0, 0
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def to_image(png: bytes, index: int, seed: int) -> pb.Image:
    width, height = png_size(png)
    return pb.Image(index=index, seed=seed, width=width, height=height, png=png)


def to_status(status: JobStatus) -> str:
    """The proto enum value's name (message constructors take names)."""
    return f"JOB_STATUS_{status.name.upper()}"


def to_progress(event: JobEvent) -> pb.Progress:
    return pb.Progress(type=f"EVENT_TYPE_{event.type.upper()}", status=to_status(event.status), step=event.step,
                       total=event.total, error=event.error or "", event_id=event.id)


def to_task(task: Task) -> str:
    """The proto enum value's name: TASK_ and the task's value (`Task.class_` is "class": TASK_CLASS)."""
    return f"TASK_{task.value.upper()}"


def to_job(job: Job, images: Sequence[pb.Image] = ()) -> pb.Job:
    return pb.Job(
        id=job.id, model=job.model, task=to_task(job.request.task), status=to_status(job.status),
        parameters=to_parameters(job.request), created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, step=job.step, total=job.total, attempts=job.attempts, error=job.error or "",
        results=job.results, cancel_requested=job.cancel_requested, images=images)


def idempotency_key(field_value: str, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key from the request field or the `idempotency-key` metadata (equal if both); None if neither."""
    from_metadata = next((str(v) for k, v in metadata or () if k.lower() == IDEMPOTENCY_METADATA), "")
    if field_value and from_metadata and field_value != from_metadata:
        raise BadRequest("idempotency_key", "the field and the idempotency-key metadata differ; send one")
    key = field_value or from_metadata
    if key and not IDEMPOTENCY_KEY.match(key):
        raise BadRequest("idempotency_key", "an idempotency key is 1-255 printable ASCII characters")
    return key or None


# ----------------------------------------------------------------------------------------------- the servicer

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
        return await self._generate(to_request(request.parameters, Task.txt2img), request.idempotency_key, context)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        waiting = await self._submit(to_request(request.parameters, Task.txt2img), request.idempotency_key, context)
        job_id = waiting.job.id
        async with contextlib.aclosing(self._follow(waiting, context)) as events:
            async for event in events:
                yield pb.GenerateStreamResponse(job_id=job_id, progress=to_progress(event))
        for image in await self._images(await self._succeeded(job_id)):
            yield pb.GenerateStreamResponse(job_id=job_id, image=image)

    async def Inpaint(self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        image = await asyncio.to_thread(decode_image, request.image, self.settings)  # CPU work: off the loop
        mask = await asyncio.to_thread(decode_mask, request.mask, image, self.settings)
        generation = to_request(request.parameters, Task.inpaint, image=image.png, mask=mask.png, size=image.size)
        return await self._generate(generation, request.idempotency_key, context)

    async def Img2Img(self, request: pb.ImageRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._image_task(Task.img2img, request, context)

    async def Upscale(self, request: pb.ImageRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._image_task(Task.upscale, request, context)

    async def _image_task(self, task: Task, request: pb.ImageRequest,
                          context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        image = await asyncio.to_thread(decode_image, request.image, self.settings)  # CPU work: off the loop
        generation = to_request(request.parameters, task, image=image.png, size=image.size)
        return await self._generate(generation, request.idempotency_key, context)

    async def ClassToImage(self, request: pb.GenerateRequest,
                           context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.class_), request.idempotency_key, context)

    async def LayoutToImage(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.layout), request.idempotency_key, context)

    async def SemanticToImage(self, request: pb.SemanticRequest,
                              context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        labels = await asyncio.to_thread(decode_label_map, request.label_map, self.settings)  # CPU work: off the loop
        generation = to_request(request.parameters, Task.semantic, label_map=labels.png, size=labels.size)
        return await self._generate(generation, request.idempotency_key, context, labels.labels)

    async def Unconditional(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._generate(to_request(request.parameters, Task.unconditional), request.idempotency_key,
                                    context)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        job = await self._record(request.job_id)
        with_images = request.include_images and job.status == JobStatus.succeeded
        return to_job(job, await self._images(job) if with_images else ())

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.Progress]:
        """Relay the job's events up to its terminal one (see the proto). An observer: the job is not tied to the
        call, and the call's deadline (not `job_deadline_s`) bounds the wait."""
        after = request.after_event_id or "0-0"
        if not EVENT_ID.match(after):
            raise BadRequest("after_event_id", f"not an event id: {request.after_event_id!r}")
        await self._record(request.job_id)  # NOT_FOUND before the stream starts
        ended = asyncio.Event()
        context.add_done_callback(lambda _: ended.set())
        async with contextlib.aclosing(self.queue.follow(request.job_id, after, poll_s=POLL_S)) as batches:
            async for events in batches:
                if ended.is_set():  # the call ended: a cancellation a Redis call swallowed (Python 3.11)
                    return
                for event in events:
                    yield to_progress(event)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        await self.queue.cancel(request.job_id)
        return to_job(await self._record(request.job_id))

    # -- helpers

    async def _generate(self, request: GenerationRequest, key_field: str, context: grpc.aio.ServicerContext,
                        map_labels: Sequence[int] = ()) -> pb.GenerateResponse:
        """Submit the job, wait for its end, answer its images (the unary generating calls)."""
        waiting = await self._submit(request, key_field, context, map_labels)
        async with contextlib.aclosing(self._follow(waiting, context)) as events:
            async for _ in events:
                pass
        return await self._answer(waiting.job.id)

    async def _submit(self, request: GenerationRequest, key_field: str, context: grpc.aio.ServicerContext,
                      map_labels: Sequence[int] = ()) -> _Waiting:
        """Check the model (`check_model`: as REST does), queue the job, send its id as initial metadata, and tie
        the job to the call (see `_Waiting`)."""
        key = idempotency_key(key_field, context.invocation_metadata())
        await check_model(self.queue, self.settings, request, map_labels)
        remaining = context.time_remaining()
        deadline_s = max(0.001, remaining) if remaining is not None and key is None else None
        job = await self.quotas.submit(current_principal.get(), request, idempotency_key=key, deadline_s=deadline_s)
        waiting = _Waiting(job, keep=key is not None, loop=asyncio.get_running_loop())
        context.add_done_callback(lambda _: self._call_ended(waiting))  # runs however the call ends
        await context.send_initial_metadata(((JOB_ID_METADATA, waiting.job.id),))
        return waiting

    async def _follow(self, waiting: _Waiting, context: grpc.aio.ServicerContext) -> AsyncGenerator[JobEvent, None]:
        """The job's events up to a terminal one; WaitTimeout when the call's deadline (or `job_deadline_s`)
        comes first."""
        job_id = waiting.job.id
        remaining = context.time_remaining()
        budget = self.settings.job_deadline_s
        if remaining is not None:
            budget = min(budget, remaining - DEADLINE_MARGIN_S)
        until = time.monotonic() + budget
        async with contextlib.aclosing(self.queue.follow(job_id, poll_s=POLL_S, until=until)) as batches:
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


# ----------------------------------------------------------------------------------------------- status codes

Metadata = tuple[tuple[str, str], ...]
_CODES: dict[type[Exception], grpc.StatusCode] = {
    ImageError: grpc.StatusCode.INVALID_ARGUMENT,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    JobNotFound: grpc.StatusCode.NOT_FOUND,
    ResultsExpired: grpc.StatusCode.NOT_FOUND,
    IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    WaitTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}


#: a failed job's error starts with its reason (the worker's JobFailure: "reason: message"; the queue's own
#: "deadline exceeded: ..."); reasons not listed (internal, gave up after N attempts) answer INTERNAL
_FAILURE_CODES = {
    "deadline exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,  # not started within job_deadline_s
    "unsupported": grpc.StatusCode.INVALID_ARGUMENT,  # the model cannot do this task
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,  # an input the worker could not use
    "out_of_memory": grpc.StatusCode.RESOURCE_EXHAUSTED,  # even one sample does not fit the device
}


def _job_ended_code(job: Job) -> grpc.StatusCode:
    if job.status == JobStatus.cancelled:
        return grpc.StatusCode.CANCELLED
    reason = (job.error or "").split(":", 1)[0]
    return _FAILURE_CODES.get(reason, grpc.StatusCode.INTERNAL)


def _field_path(loc: Sequence[Any]) -> str:
    """A schema field's place in the proto request: width -> parameters.width; image stays image."""
    name = ".".join(str(p) for p in loc) or "request"
    return f"parameters.{name}" if loc and loc[0] in _PARAMETER_FIELDS else name


def validation_message(exc: ValidationError) -> str:
    """Every problem, each with its field: 'parameters.width: width must be a multiple of 8, got 100; ...'."""
    return "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str, Metadata]:
    """The status code, message and trailing metadata that answer `exc`."""
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {validation_message(exc)}", ()
    if isinstance(exc, AuthError):
        code = grpc.StatusCode.PERMISSION_DENIED if exc.status == 403 else grpc.StatusCode.UNAUTHENTICATED
        return code, str(exc), ()
    if isinstance(exc, QueueFull | QuotaExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ((RETRY_AFTER_METADATA, str(exc.retry_after_s)),)
    if isinstance(exc, QueueUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"the job queue is unavailable: {exc}", ((RETRY_AFTER_METADATA, "1"),)
    if isinstance(exc, JobEnded):
        return _job_ended_code(exc.job), str(exc), ()
    code = next((c for kind, c in _CODES.items() if isinstance(exc, kind)), None)
    if code is not None:
        return code, str(exc), ()
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log", ()


@dataclass(frozen=True)
class _Undecodable:
    """What the tolerant deserializer hands on instead of raising, so the behaviour can answer for it."""

    error: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # any parse failure is the client's bytes' fault
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return parse


def _parsed(request: Any, method: str) -> Any:
    if isinstance(request, _Undecodable):
        raise BadRequest("request", f"the request bytes are not a valid message for {method} ({request.error})")
    return request


class _Answer:
    """The outcome of one call: an exception becomes its status (`status_of`; the call is aborted with it), a
    client that left or whose deadline passed counts as CANCELLED, and the call is recorded in the metrics."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str, metrics: ApiMetrics | None) -> None:
        self.context, self.method, self.metrics = context, method, metrics
        self.started = time.perf_counter()

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                self._count_refusal(exc)
                code, message, trailing = status_of(exc)
                if code == grpc.StatusCode.INTERNAL and not isinstance(exc, JobEnded):
                    log.error("%s failed", self.method, exc_info=exc)
                await self.context.abort(code, message, trailing_metadata=trailing)
            elif exc is not None:  # the client left, its deadline passed (CancelledError, GeneratorExit), ...
                code = self.context.code() if isinstance(exc, grpc.aio.AbortError) else grpc.StatusCode.CANCELLED
            return False
        finally:
            if self.metrics is not None:
                name = getattr(code, "name", "UNKNOWN")
                self.metrics.observe_grpc(self.method.rsplit("/", 1)[-1], name, time.perf_counter() - self.started)

    def _count_refusal(self, exc: Exception) -> None:
        if self.metrics is not None and isinstance(exc, AuthError):
            self.metrics.count_auth_failure("grpc", exc.reason)
        elif self.metrics is not None and isinstance(exc, QuotaExceeded):
            self.metrics.count_quota_rejection("grpc", exc.quota)


class CallGuard:
    """What every call of ldm.v1.Diffusion passes first: its API key, and for the calls that submit a job, the
    key's rate. The caller is left in `current_principal` for the servicer (its jobs-in-flight cap)."""

    def __init__(self, auth: Authenticator, quotas: Quotas) -> None:
        self.auth, self.quotas = auth, quotas

    async def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = [str(v) for k, v in context.invocation_metadata() or () if k.lower() == AUTHORIZATION_METADATA]
        if len(metadata) > 1:
            raise AuthError("malformed", "malformed authorization: send one authorization metadata entry")
        principal = self.auth.authenticate(metadata[0] if metadata else None)
        current_principal.set(principal)
        if method.rsplit("/", 1)[-1] in SUBMITTING_METHODS:
            await self.quotas.take_token(principal)


Guard = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method of ldm.v1.Diffusion: its exceptions become status codes (`status_of`), request bytes
    that do not parse become INVALID_ARGUMENT, and every call is counted (`ApiMetrics.observe_grpc`, when
    given). Other services (health, reflection) pass untouched."""

    def __init__(self, metrics: ApiMetrics | None = None, guard: Guard | None = None) -> None:
        self.metrics, self.guard = metrics, guard

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        options = {"request_deserializer": _tolerant(handler.request_deserializer),
                   "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method, self.metrics, self.guard), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, method, self.metrics, self.guard), **options)
        return handler  # no client-streaming methods in this service


async def _cancellable(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` in a task of its own, so that cancelling the caller takes effect at once, always.

    grpc cancels a handler's task when its client leaves or its deadline passes, and the Redis client can swallow
    that CancelledError (seen with redis-py 8 on Python 3.11: a handler kept following its job's events for a
    caller long gone). Waiting on a separate task cannot lose the cancellation: the handler ends, grpc runs the
    call's done-callbacks (which cancel the abandoned job and mark the call ended), and the child task, cancelled
    too, stops by itself at the latest when its loop sees the call has ended.
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_retrieve)
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a child task's outcome as seen (its caller may have been cancelled before it ended)."""
    if not task.cancelled():
        task.exception()


def _unary(behavior: Callable[..., Awaitable[Any]], method: str,
           metrics: ApiMetrics | None, guard: Guard | None) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Answer(context, method, metrics):
            if guard is not None:
                await guard(method, context)
            return await _cancellable(behavior(_parsed(request, method), context))

    return call


def _streaming(behavior: Callable[..., AsyncGenerator[Any, None]], method: str,
               metrics: ApiMetrics | None, guard: Guard | None) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Answer(context, method, metrics):
            if guard is not None:
                await guard(method, context)
            messages = behavior(_parsed(request, method), context)
            try:
                while True:
                    try:
                        message = await _cancellable(anext(messages))
                    except StopAsyncIteration:
                        return
                    yield message
            finally:  # grpc closed us (the client left) between two messages: close the servicer's generator too
                if not getattr(messages, "ag_running", False):
                    await messages.aclose()

    return call


# ----------------------------------------------------------------------------------------------- the server

@dataclass
class _Runtime:
    """What lives beside one server: its queue, health service and the task that watches Redis."""

    port: int
    queue: JobQueue
    owns_queue: bool
    servicer: DiffusionServicer
    health: health.aio.HealthServicer
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


_RUNTIMES: weakref.WeakKeyDictionary[grpc.aio.Server, _Runtime] = weakref.WeakKeyDictionary()


async def _watch_redis(runtime: _Runtime, interval_s: float) -> None:
    """Health: SERVING for "" and ldm.v1.Diffusion while Redis answers a ping, NOT_SERVING otherwise (and
    until the first ping, a few milliseconds after start)."""
    for service in ("", SERVICE_NAME):
        await runtime.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    last = None
    while not runtime.stopping.is_set():  # a flag, not only cancellation: redis-py may swallow a cancel
        try:
            await runtime.queue.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except QueueUnavailable as exc:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            if last != status:
                log.warning("gRPC health: NOT_SERVING (%s)", exc)
        for service in ("", SERVICE_NAME):
            await runtime.health.set(service, status)
        last = status
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.stopping.wait(), interval_s)


async def _run_beside(server: grpc.aio.Server, runtime: _Runtime, interval_s: float) -> None:
    """Watch Redis while the server lives; when it stops, finish abandoned-job cancellations, close the queue."""
    watcher = asyncio.create_task(_watch_redis(runtime, interval_s))
    try:
        await server.wait_for_termination()
    finally:
        runtime.stopping.set()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.sleep(0)  # let the done-callbacks of the last calls schedule their cancellations
        await runtime.servicer.drain()
        if runtime.owns_queue:
            await runtime.queue.aclose()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def create_grpc_server(settings: Settings, queue: JobQueue | None = None, *,
                       metrics: ApiMetrics | None = None) -> grpc.aio.Server:
    """A gRPC server bound to `grpc_host:grpc_port` (port 0: any free port, see `bound_port`) with
    ldm.v1.Diffusion, health checking and reflection; not started. Call it inside the event loop that will run
    it. Without `queue` it opens its own on `settings` and closes it when the server stops. With `metrics` (the
    API process's, shared with the REST app) every call is counted in `ldm_grpc_requests_total` and timed."""
    owns_queue = queue is None
    queue = queue if queue is not None else JobQueue(settings)
    limit = settings.grpc_max_message_bytes
    servicer = DiffusionServicer(queue, settings)
    server = grpc.aio.server(
        interceptors=[StatusInterceptor(metrics, CallGuard(Authenticator(settings), servicer.quotas))],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    pb_grpc.add_DiffusionServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(_address(settings.grpc_host, settings.grpc_port))
    runtime = _Runtime(port, queue, owns_queue, servicer, health_servicer)
    runtime.task = asyncio.get_running_loop().create_task(
        _run_beside(server, runtime, settings.grpc_health_interval_s))
    _RUNTIMES[server] = runtime
    return server


def bound_port(server: grpc.aio.Server) -> int:
    """The port a server made by `create_grpc_server` listens on."""
    return _RUNTIMES[server].port


async def stop_grpc(server: grpc.aio.Server, grace_s: float | None) -> None:
    """Graceful stop: health says NOT_SERVING, new calls are refused, running ones get `grace_s` seconds
    (None: aborted at once); then the server's own queue is closed."""
    runtime = _RUNTIMES.get(server)
    if runtime is not None:
        await runtime.health.enter_graceful_shutdown()
    await server.stop(grace_s)
    if runtime is not None and runtime.task is not None:
        await runtime.task


async def serve_grpc(settings: Settings, queue: JobQueue | None = None, *, stop: asyncio.Event | None = None,
                     metrics: ApiMetrics | None = None) -> None:
    """Run the gRPC server until `stop` is set (without one: until SIGINT or SIGTERM), then stop gracefully
    (`grpc_shutdown_grace_s`)."""
    server = create_grpc_server(settings, queue, metrics=metrics)
    await server.start()
    log.info("gRPC (ldm.v1.Diffusion, health, reflection) on %s", _address(settings.grpc_host, bound_port(server)))
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_grpc(server, settings.grpc_shutdown_grace_s)
