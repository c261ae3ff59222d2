"""The submission flow the routes share: decode input images, check the model, submit, wait for the end.

Order of checks: the API key (middleware, 401/403, before the body is read), the key's rate (429, before any image
is decoded: `deps.get_submitter`), the body's static validation (FastAPI, 422), the input images and label map
(`service/images.py`: 413/422), the model (422 unless it is the default or a live worker serves it; when its workers
say what it can do and which labels it takes, the task and the class labels, layout and label map too; an unset
guidance scale becomes the model's default its workers register, an unnamed sampler theirs, and guidance of a
model without a null condition is refused; SDXL micro-conditioning, noise_level and a refiner only where the workers
say their model takes them), the key's jobs in flight (429), then the queue's admission (limits and rules between
fields, 422), depth (429) and idempotency (409). A `webhook_url` is checked against the allow-list before the
images are decoded (422) and registered once the job is queued (service/webhooks.py). The gRPC front end runs the
same `check_model`; its ValidationError answers INVALID_ARGUMENT there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.concurrency import run_in_threadpool

from service import webhooks
from service.api.bodies import JobBody
from service.api.errors import ApiError
from service.auth import Principal
from service.config import Settings
from service.images import decode_image, decode_label_map, decode_mask
from service.queue import Job, JobNotFound, JobQueue, JobStatus, WorkerInfo
from service.quotas import Quotas
from service.schemas import (
    DEFAULT_SAMPLER,
    IMAGE_TASKS,
    MODEL_OPTIONS,
    GenerationRequest,
    Task,
    check_labels,
    option_message,
    refiner_message,
    unguided_message,
)


async def served_models(queue: JobQueue, settings: Settings) -> dict[str, int]:
    """Model name -> live workers serving it; the default model is always listed."""
    counts = {settings.default_model: 0}
    for worker in await queue.workers():
        for model in worker.models:
            counts[model] = counts.get(model, 0) + 1
    return counts


def _invalid(field: str, kind: str, message: str) -> ValidationError:
    """A ValidationError naming `field`: REST answers it 422 like a bad body, gRPC INVALID_ARGUMENT."""
    return ValidationError.from_exception_data("GenerationRequest", [
        InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=None)])


async def check_model(queue: JobQueue, settings: Settings, request: GenerationRequest,
                      map_labels: Iterable[int] = ()) -> GenerationRequest:
    """The model must be the default or served by a live worker (a job for a model nobody serves would only wait
    for its deadline); when its live workers say which tasks they can do, one of them must do this task, and when
    they say which labels their model takes, the class label, the layout's labels and box count and the label map's
    values (`map_labels`) must be among them (else the job would only fail as invalid_input in the worker).
    The request back, with the model's own default guidance scale where it gives none and the workers register one
    (a model without a null condition, such as the CompVis zoo's cin256, is unguided: 1, not the task's 5), so the
    job records the scale used; a scale other than 1 for such a model is refused naming the null condition it lacks.
    Its sampler, where it names none, is the one the workers register (else DEFAULT_SAMPLER).
    Raises pydantic.ValidationError."""
    model = request.model or settings.default_model
    serving = [w for w in await queue.workers() if model in w.models]
    if not serving and model != settings.default_model:
        served = await served_models(queue, settings)
        raise _invalid("model", "model_not_found", f"unknown model {model!r}; served: {', '.join(sorted(served))}")
    if serving and all(w.tasks and request.task not in w.tasks for w in serving):
        can = sorted({t.value for w in serving for t in w.tasks})
        raise _invalid("task", "task_unsupported",
                       f"model {model!r} cannot do {request.task.value}; it can do {', '.join(can)}")
    labels = next((w.labels for w in serving if w.labels is not None and request.task in w.tasks), None)
    if labels is not None:
        check_labels(request.model_copy(update={"model": model}), labels, map_labels)
    _check_options(request, model, serving)
    return _guided(_with_sampler(request, serving), model, serving)


def _check_options(request: GenerationRequest, model: str, serving: list[WorkerInfo]) -> None:
    """The model-specific fields (SDXL micro-conditioning, noise_level) must be ones the model's workers take, and
    a `refiner` one they hold; workers that do not say (no live one yet, an older worker) leave it to the worker."""
    said = [w for w in serving if w.options is not None]
    if said:
        for name in MODEL_OPTIONS:
            if name == "noise_level" and request.task != Task.upscale:
                continue  # admission refuses it for the task, whatever the model
            if getattr(request, name) is not None and not any(name in (w.options or ()) for w in said):
                raise _invalid(name, "option_unsupported", option_message(name, model))
    if request.refiner is not None and serving and not any(request.refiner in w.refiners for w in serving):
        raise _invalid("refiner", "refiner_not_found",
                       refiner_message(model, request.refiner, (r for w in serving for r in w.refiners)))


def _guided(request: GenerationRequest, model: str, serving: list[WorkerInfo]) -> GenerationRequest:
    """`request` with the guidance scale its model's workers register for its task (with its sampler, where they
    register one for that sampler) when it gives none; refused
    (ValidationError) when it asks guidance of a model that has no null condition."""
    if request.guidance_scale is None:
        tables = [w.sampler_guidance.get(request.effective_sampler, w.default_guidance) for w in serving]
        default = next((table[request.task] for table in tables if request.task in table), None)
        return request if default is None else request.model_copy(update={"guidance_scale": default})
    missing = next((w.missing_null for w in serving if w.missing_null is not None), None)
    if missing is not None and request.guidance_scale != 1.0:
        raise _invalid("guidance_scale", "guidance_unsupported",
                       unguided_message(model, missing, request.guidance_scale))
    return request


def _with_sampler(request: GenerationRequest, serving: list[WorkerInfo]) -> GenerationRequest:
    """`request` with the sampler its model's workers register when it names none (DEFAULT_SAMPLER when they
    register none, or when it asks for Karras sigmas, which only DPM-Solver++(2M) has), so the job records what
    ran."""
    if request.sampler is not None:
        return request
    own = next((w.default_sampler for w in serving if w.default_sampler is not None), None)
    sampler = DEFAULT_SAMPLER if own is None or request.karras else own
    return request.model_copy(update={"sampler": sampler})


def _check_given_size(body: JobBody, size: tuple[int, int], what: str = "image") -> None:
    advice = "for image tasks" if what == "image" else f"for {body.task.value}: the {what} sets the size"
    for name, given, actual in (("width", body.width, size[0]), ("height", body.height, size[1])):
        if given is not None and given != actual:
            raise _invalid(name, "size_mismatch", f"{name} {given} differs from the {what}'s {name} {actual}; "
                           f"leave width and height out {advice}")


@dataclass(frozen=True)
class Decoded:
    """A body with its inputs decoded: the request for the queue, and the labels its label map holds (semantic)."""

    request: GenerationRequest
    map_labels: tuple[int, ...] = ()


def decode_inputs(body: JobBody, settings: Settings) -> Decoded:
    """The request with its images checked and normalised (RGB and L PNGs) and its size set from the image (or the
    label map). Inputs on tasks that take none are passed on as they are, for admission to refuse. CPU work: run in
    a thread."""
    if body.task == Task.semantic and body.label_map is not None:
        labels = decode_label_map(body.label_map, settings)
        _check_given_size(body, labels.size, "label map")
        request = body.to_request(label_map=labels.png, width=labels.size[0], height=labels.size[1])
        return Decoded(request, labels.labels)
    if body.task not in IMAGE_TASKS or body.image is None:
        return Decoded(body.to_request())
    image = decode_image(body.image, settings)
    _check_given_size(body, image.size)
    update: dict[str, Any] = {"image": image.png, "width": image.size[0], "height": image.size[1]}
    if body.task == Task.inpaint and body.mask is not None:
        update["mask"] = decode_mask(body.mask, image, settings).png
    return Decoded(body.to_request(**update))


@dataclass(frozen=True)
class Submitter:
    """What a route needs to queue a job for its caller: the queue, the settings, the quotas and who calls."""

    queue: JobQueue
    settings: Settings
    quotas: Quotas
    principal: Principal

    async def submit(self, request: GenerationRequest, idempotency_key: str | None = None,
                     deadline_s: float | None = None, map_labels: Iterable[int] = ()) -> Job:
        """Check the model, then queue within the caller's cap of jobs in flight."""
        request = await check_model(self.queue, self.settings, request, map_labels)
        return await self.quotas.submit(self.principal, request, idempotency_key=idempotency_key,
                                        deadline_s=deadline_s)

    async def submit_body(self, body: JobBody, idempotency_key: str | None) -> Job:
        """Decode the body's images (in a thread: CPU work), then `submit`; then register its webhook, if any."""
        hook = webhooks.checked(body.webhook_url, self.settings)
        decoded = await run_in_threadpool(decode_inputs, body, self.settings)
        job = await self.submit(decoded.request, idempotency_key, body.deadline_s, decoded.map_labels)
        if hook is not None:
            await webhooks.register(self.queue, job.id, hook)
        return job


def sync_timeout(settings: Settings, asked: float | None) -> float:
    """How long a synchronous endpoint waits: the client's `timeout`, at most `job_deadline_s`."""
    return min(asked, settings.job_deadline_s) if asked else settings.job_deadline_s


async def _follow(queue: JobQueue, job_id: str, request: Request, timeout_s: float, *, keep: bool = False) -> None:
    """Follow the job's events until a terminal one or the timeout. When the client goes away the job is
    cancelled, unless `keep` (it came with an Idempotency-Key): then a resend with that key collects its result,
    as over gRPC."""
    async with contextlib.aclosing(queue.follow(job_id, until=time.monotonic() + timeout_s)) as batches:
        async for events in batches:
            if any(e.terminal for e in events):
                return
            if await request.is_disconnected():
                if keep:
                    raise ApiError(499, f"client closed the request; job {job_id} goes on for a resend with the "
                                   "same Idempotency-Key")
                await queue.cancel(job_id)  # nobody is left to take the answer, and only this client knew the job
                raise ApiError(499, f"client closed the request; job {job_id} was cancelled")
            draining = getattr(request.app.state, "draining", None)  # set when the API shuts down (service/serve.py)
            if draining is not None and draining.is_set():
                raise ApiError(503, f"the API is shutting down; job {job_id} goes on: poll GET /v1/jobs/{job_id}, "
                               "or resend the request with the same Idempotency-Key", code="shutting_down",
                               headers={"Retry-After": "1", "Location": f"/v1/jobs/{job_id}"},
                               extra={"job_id": job_id})


#: a failed job's error starts with its reason (the worker's "reason: message", the queue's "deadline exceeded");
#: the client's faults answer 4xx as they would have at submission, the rest 500 (gRPC: grpc._FAILURE_CODES)
FAILURE_STATUS = {
    "deadline exceeded": 504,  # not started within its deadline
    "unsupported": 422,  # the model cannot do this task
    "invalid_input": 422,  # an input the worker could not use
    "out_of_memory": 413,  # even one image of this size does not fit the device
}


def failure_status(job: Job) -> int:
    return FAILURE_STATUS.get((job.error or "").split(":", 1)[0], 500)


async def wait_done(queue: JobQueue, job: Job, request: Request, timeout_s: float, *, keep: bool = False) -> Job:
    """The job once it has succeeded. Raises ApiError: 504 when it has not ended in `timeout_s` (with the job id,
    so the client can poll it), `failure_status` when it failed, 409 when it was cancelled. `keep`: see `_follow`."""
    await _follow(queue, job.id, request, timeout_s, keep=keep)
    final = await queue.get(job.id)
    if final is None:
        raise JobNotFound(job.id)
    where = {"Location": f"/v1/jobs/{job.id}"}
    if not final.status.terminal:
        raise ApiError(504, f"job {job.id} did not finish within {timeout_s:g} s (it is {final.status.value}); "
                       f"poll GET /v1/jobs/{job.id}", code="timeout", headers=where, extra={"job_id": job.id})
    if final.status == JobStatus.failed:
        raise ApiError(failure_status(final), f"job {job.id} failed: {final.error}", code="job_failed",
                       headers=where, extra={"job_id": job.id})
    if final.status == JobStatus.cancelled:
        raise ApiError(409, f"job {job.id} was cancelled", code="job_cancelled", headers=where,
                       extra={"job_id": job.id})
    return final


async def result_pngs(queue: JobQueue, job: Job, count: int | None = None) -> list[bytes]:
    """The first `count` (default: all) result PNGs of a succeeded job."""
    pngs = []
    for i in range(job.results if count is None else min(count, job.results)):
        png = await queue.result(job.id, i)
        if png is None:
            raise ApiError(404, f"result {i} of job {job.id} has expired", code="result_expired")
        pngs.append(png)
    if not pngs:
        raise ApiError(500, f"job {job.id} succeeded without images", code="no_results")
    return pngs
