"""Native async jobs: submit, status, result images, progress events (SSE), cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.api.bodies import JobBody, JobView
from service.api.calls import CallLimits
from service.api.deps import (
    AUTH_RESPONSES,
    QUOTA_RESPONSES,
    IdempotencyKey,
    PrincipalDep,
    QueueDep,
    SettingsDep,
    SubmitterDep,
    get_limits,
    get_principal,
)
from service.api.errors import ApiError
from service.api.ownership import visible_job
from service.auth import Principal
from service.queue import EVENT_ID, JobEvent, JobQueue, JobStatus, QueueUnavailable

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(get_principal)], responses=AUTH_RESPONSES)
JobId = Annotated[str, Path(description="the job id (32 hex digits)")]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", pattern=EVENT_ID.pattern,
                                           description="resume after this event id")]
PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "the PNG"}}
SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}, "description": "progress events"}}


@router.post("", status_code=202, response_model=JobView, summary="Submit a job", responses=QUOTA_RESPONSES)
async def create_job(body: JobBody, response: Response, submitter: SubmitterDep,
                     idempotency_key: IdempotencyKey = None) -> JobView:
    """Queue a txt2img, img2img, inpaint, upscale, class, layout, semantic or unconditional job; 202 with the job
    and its Location. The same Idempotency-Key answers with the same job."""
    job = await submitter.submit_body(body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobView.of(job)


@router.get("/{job_id}", response_model=JobView, summary="A job's status")
async def get_job(job_id: JobId, queue: QueueDep, principal: PrincipalDep) -> JobView:
    """The job, if the caller's key submitted it (or is an admin key); 404, as for an unknown id, otherwise. While it
    is queued, `queue_position` (jobs workers take before it) and `eta_s` (estimated seconds until done)."""
    return JobView.of(await queue.with_place(await visible_job(queue, job_id, principal)))


@router.get("/{job_id}/images/{index}", response_class=Response, responses=PNG, summary="A result image")
async def get_image(job_id: JobId, index: Annotated[int, Path(ge=0)], queue: QueueDep, settings: SettingsDep,
                    principal: PrincipalDep) -> Response:
    """Result `index` (0-based) of a succeeded job, as PNG with the generation parameters in text chunks."""
    job = await visible_job(queue, job_id, principal)
    if job.status != JobStatus.succeeded:
        raise ApiError(409, f"job {job_id} is {job.status.value}: images are there once it has succeeded",
                       code="not_ready")
    if index >= job.results:
        raise ApiError(404, f"job {job_id} has {job.results} images (0 to {job.results - 1})", code="no_such_image")
    png = await queue.result(job_id, index)
    if png is None:
        raise ApiError(404, f"image {index} of job {job_id} has expired", code="result_expired")
    return Response(png, media_type="image/png", headers={
        "Cache-Control": f"private, max-age={settings.result_ttl_s}, immutable",
        "Content-Disposition": f'inline; filename="{job_id}-{index}.png"'})


@router.delete("/{job_id}", response_model=JobView, summary="Cancel a job",
               responses={202: {"description": "cancellation asked of the running worker"}})
async def cancel_job(job_id: JobId, response: Response, queue: QueueDep, principal: PrincipalDep) -> JobView:
    """A queued job is cancelled at once (200); a running one stops at its next step (202); a finished one
    cannot be (409). Another key's job answers 404, as an unknown one."""
    await visible_job(queue, job_id, principal)  # its owner never changes: checked once, before the cancel
    status = await queue.cancel(job_id)
    if status in (JobStatus.succeeded, JobStatus.failed):
        raise ApiError(409, f"job {job_id} has already {status.value}", code="already_finished")
    response.status_code = 202 if status == JobStatus.running else 200
    return JobView.of(await visible_job(queue, job_id, principal))


class HeldStream(StreamingResponse):
    """A progress stream holding its place among the process's streams (service/api/calls.py) from the route that
    took it until the response ends, however it ends (finished, client gone, server stopping): the place is released
    in `__call__`, which runs once the route returned it, whether or not the body was ever iterated."""

    def __init__(self, content: AsyncIterator[str], limits: CallLimits, principal: Principal,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._limits, self._principal = limits, principal

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._limits.release("streams", self._principal)


def _frame(event: JobEvent) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


async def _event_stream(queue: JobQueue, job_id: str, after: str, keepalive_s: float,
                        draining: asyncio.Event | None = None) -> AsyncIterator[str]:
    """SSE frames of the job's events after `after`, until a terminal one; a comment when idle for `keepalive_s`.
    When the API shuts down (`draining`) the stream ends within a second with a `shutting_down` event (no id, so
    the client's Last-Event-ID stays its last job event): the client reconnects and resumes where it was, instead
    of being cut off when uvicorn's grace runs out."""
    yield "retry: 1000\n\n"
    quiet_since = time.monotonic()
    try:
        followed = queue.follow(job_id, after, poll_s=min(keepalive_s, 1.0), positions=True)
        async with contextlib.aclosing(followed) as batches:
            async for events in batches:
                for event in events:
                    yield _frame(event)
                if draining is not None and draining.is_set():
                    detail = f"the API is shutting down; reconnect with Last-Event-ID to follow job {job_id}"
                    yield f"event: shutting_down\ndata: {json.dumps({'detail': detail})}\n\n"
                    return
                if events:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= keepalive_s:
                    yield ": keep-alive\n\n"
                    quiet_since = time.monotonic()
    except QueueUnavailable as exc:  # a fixed text and a code for the client; Redis's address goes to the log
        log.warning("event=queue_unavailable route=events error=%s", exc)
        data = {"error": "the job queue is unavailable; reconnect with Last-Event-ID", "code": "queue_unavailable"}
        yield f"event: error\ndata: {json.dumps(data)}\n\n"


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={**SSE, **QUOTA_RESPONSES},
            summary="Progress events (SSE)")
async def job_events(job_id: JobId, request: Request, queue: QueueDep, settings: SettingsDep,
                     principal: PrincipalDep, limits: Annotated[CallLimits, Depends(get_limits)],
                     last_event_id: LastEventId = None,
                     after: Annotated[str | None, Query(pattern=EVENT_ID.pattern)] = None) -> StreamingResponse:
    """Server-sent events: `queued`, `position` (while queued, when its `queue_position` or `eta_s` changes),
    `started`, `progress` (step/total), ..., then one terminal event
    (`succeeded`, `failed` or `cancelled`), after which the stream ends. Each event's `id:` is its Redis event
    id: reconnect with `Last-Event-ID` (or `?after=`) to resume after it. A stream that ends with
    `shutting_down` instead (the API is stopping) is to be reconnected the same way. A key holds at most
    `key_max_event_streams` streams at once (the process, `max_event_streams`): 429 beyond."""
    limits.acquire("streams", principal)  # 429 beyond the caps, before Redis is asked anything
    try:  # from here the place is released by HeldStream when the response ends, or below
        await visible_job(queue, job_id, principal)  # 404 (unknown or another key's) before the stream starts
        draining = getattr(request.app.state, "draining", None)  # set when the API shuts down (service/serve.py)
        stream = _event_stream(queue, job_id, last_event_id or after or "0-0", settings.sse_keepalive_s, draining)
        return HeldStream(stream, limits, principal, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except BaseException:
        limits.release("streams", principal)
        raise
