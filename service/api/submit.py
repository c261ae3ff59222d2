"""The submission flow the routes share: decode input images, check the model, submit, wait for the end.

Order of checks: the API key (middleware, 401/403, before the body is read), the key's rate (429, before any image
is decoded: `deps.get_submitter`), the body's static validation (FastAPI, 422), the input images (`images.py`:
413/422), the model (422 unless it is the default or a live worker serves it), the key's jobs in flight (429),
then the queue's admission (limits and rules between fields, 422), depth (429) and idempotency (409).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.api.bodies import JobBody
from service.api.errors import ApiError, validation_error
from service.api.images import DecodedImage, decode_image, decode_mask
from service.auth import Principal
from service.config import Settings
from service.jobs import JobNotFound, JobQueue
from service.quotas import Quotas
from service.schemas import IMAGE_TASKS, GenerationRequest, Job, JobStatus, Task


async def served_models(queue: JobQueue, settings: Settings) -> dict[str, int]:
    """Model name -> live workers serving it; the default model is always listed."""
    counts = {settings.default_model: 0}
    for worker in await queue.workers():
        for model in worker.models:
            counts[model] = counts.get(model, 0) + 1
    return counts


def _invalid(field: str, kind: str, message: str) -> ApiError:
    return validation_error([{"loc": ("body", field), "type": kind, "msg": message}])


async def check_model(queue: JobQueue, settings: Settings, request: GenerationRequest) -> None:
    """The model must be the default or served by a live worker (a job for a model nobody serves would only wait
    for its deadline), and when its live workers say which tasks they can do, one of them must do this task."""
    model = request.model or settings.default_model
    serving = [w for w in await queue.workers() if model in w.models]
    if not serving and model != settings.default_model:
        served = await served_models(queue, settings)
        raise _invalid("model", "model_not_found", f"unknown model {model!r}; served: {', '.join(sorted(served))}")
    if serving and all(w.tasks and request.task not in w.tasks for w in serving):
        can = sorted({t.value for w in serving for t in w.tasks})
        raise _invalid("task", "task_unsupported",
                       f"model {model!r} cannot do {request.task.value}; it can do {', '.join(can)}")


def _check_given_size(body: JobBody, image: DecodedImage) -> None:
    for name, given, actual in (("width", body.width, image.size[0]), ("height", body.height, image.size[1])):
        if given is not None and given != actual:
            raise _invalid(name, "size_mismatch", f"{name} {given} differs from the image's {name} {actual}; "
                           "leave width and height out for image tasks")


def decode_inputs(body: JobBody, settings: Settings) -> GenerationRequest:
    """The request with its images checked and normalised (RGB and L PNGs) and its size set from the image.
    Images on tasks that take none are passed on as they are, for admission to refuse. CPU work: run in a thread."""
    if body.task not in IMAGE_TASKS or body.image is None:
        return body.to_request()
    image = decode_image(body.image, settings)
    _check_given_size(body, image)
    update: dict[str, Any] = {"image": image.png, "width": image.size[0], "height": image.size[1]}
    if body.task == Task.inpaint and body.mask is not None:
        update["mask"] = decode_mask(body.mask, image, settings).png
    return body.to_request(**update)


@dataclass(frozen=True)
class Submitter:
    """What a route needs to queue a job for its caller: the queue, the settings, the quotas and who calls."""

    queue: JobQueue
    settings: Settings
    quotas: Quotas
    principal: Principal

    async def submit(self, request: GenerationRequest, idempotency_key: str | None = None,
                     deadline_s: float | None = None) -> Job:
        """Check the model, then queue within the caller's cap of jobs in flight."""
        await check_model(self.queue, self.settings, request)
        return await self.quotas.submit(self.principal, request, idempotency_key=idempotency_key,
                                        deadline_s=deadline_s)

    async def submit_body(self, body: JobBody, idempotency_key: str | None) -> Job:
        """Decode the body's images (in a thread: CPU work), then `submit`."""
        request = await run_in_threadpool(decode_inputs, body, self.settings)
        return await self.submit(request, idempotency_key, body.deadline_s)


def sync_timeout(settings: Settings, asked: float | None) -> float:
    """How long a synchronous endpoint waits: the client's `timeout`, at most `job_deadline_s`."""
    return min(asked, settings.job_deadline_s) if asked else settings.job_deadline_s


async def _follow(queue: JobQueue, job_id: str, request: Request, timeout_s: float) -> None:
    """Follow the job's events until a terminal one or the timeout; cancel the job if the client goes away."""
    deadline, after = time.monotonic() + timeout_s, "0-0"
    while (left := deadline - time.monotonic()) > 0:
        events = await queue.events(job_id, after, block_ms=int(min(left, 1.0) * 1000) + 1)
        if any(e.terminal for e in events):
            return
        after = events[-1].id if events else after
        if await request.is_disconnected():
            await queue.cancel(job_id)  # nobody is left to take the answer, and only this client knew the job
            raise ApiError(499, f"client closed the request; job {job_id} was cancelled")


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


async def wait_done(queue: JobQueue, job: Job, request: Request, timeout_s: float) -> Job:
    """The job once it has succeeded. Raises ApiError: 504 when it has not ended in `timeout_s` (with the job id,
    so the client can poll it), `failure_status` when it failed, 409 when it was cancelled."""
    await _follow(queue, job.id, request, timeout_s)
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
