"""Synchronous generation: submit, wait, answer the first image as image/png with its parameters in headers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from service.api.bodies import (
    Class2ImgBody,
    InpaintBody,
    JobBody,
    Layout2ImgBody,
    Semantic2ImgBody,
    Txt2ImgBody,
    UnconditionalBody,
)
from service.api.deps import (
    AUTH_RESPONSES,
    QUOTA_RESPONSES,
    IdempotencyKey,
    SubmitterDep,
    get_principal,
    hold_waiting_call,
)
from service.api.submit import Submitter, result_pngs, sync_timeout, wait_done
from service.queue import Job

router = APIRouter(prefix="/v1", tags=["synchronous"],
                   dependencies=[Depends(get_principal), Depends(hold_waiting_call)],
                   responses={**AUTH_RESPONSES, **QUOTA_RESPONSES})
Timeout = Annotated[float | None, Query(gt=0, description="seconds to wait (at most job_deadline_s); 504 after")]
RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"image/png": {}}, "description": "the first image; X-Job-Id and the parameters in headers"},
    504: {"description": "not finished in time: poll the job named by X-Job-Id / Location"}}


def _headers(job: Job) -> dict[str, str]:
    r = job.request
    return {"X-Job-Id": job.id, "X-Model": job.model, "X-Seed": str(r.seed), "X-Steps": str(r.steps),
            "X-Sampler": r.effective_sampler, "X-Guidance-Scale": f"{r.effective_guidance:g}",
            "X-Images": str(job.results),
            "X-Task": r.task.value, "Content-Location": f"/v1/jobs/{job.id}/images/0"}


async def _run(body: JobBody, request: Request, submitter: Submitter, idempotency_key: str | None,
               timeout: float | None) -> Response:
    job = await submitter.submit_body(body, idempotency_key)
    done = await wait_done(submitter.queue, job, request, sync_timeout(submitter.settings, timeout),
                           keep=idempotency_key is not None)
    [png] = await result_pngs(submitter.queue, done, count=1)
    return Response(png, media_type="image/png", headers=_headers(done))


@router.post("/txt2img", response_class=Response, responses=RESPONSES, summary="Generate an image (synchronous)")
async def txt2img(body: Txt2ImgBody, request: Request, submitter: SubmitterDep,
                  idempotency_key: IdempotencyKey = None, timeout: Timeout = None) -> Response:
    """Generate and answer the PNG (the first image when n > 1; the others are at /v1/jobs/{id}/images/{i})."""
    return await _run(body, request, submitter, idempotency_key, timeout)


@router.post("/inpaint", response_class=Response, responses=RESPONSES, summary="Inpaint an image (synchronous)")
async def inpaint(body: InpaintBody, request: Request, submitter: SubmitterDep,
                  idempotency_key: IdempotencyKey = None, timeout: Timeout = None) -> Response:
    """Repaint the white part of `mask` in `image` (both base64, same size) and answer the PNG."""
    return await _run(body, request, submitter, idempotency_key, timeout)


@router.post("/class2img", response_class=Response, responses=RESPONSES,
             summary="Draw an object of a class (synchronous)")
async def class2img(body: Class2ImgBody, request: Request, submitter: SubmitterDep,
                    idempotency_key: IdempotencyKey = None, timeout: Timeout = None) -> Response:
    """A class-conditional model draws `class_label` (a name such as 'red circle', or an id); answers the PNG."""
    return await _run(body, request, submitter, idempotency_key, timeout)


@router.post("/layout2img", response_class=Response, responses=RESPONSES,
             summary="Draw objects in boxes (synchronous)")
async def layout2img(body: Layout2ImgBody, request: Request, submitter: SubmitterDep,
                     idempotency_key: IdempotencyKey = None, timeout: Timeout = None) -> Response:
    """A layout-to-image model draws each box's object inside it; answers the PNG."""
    return await _run(body, request, submitter, idempotency_key, timeout)


@router.post("/semantic2img", response_class=Response, responses=RESPONSES,
             summary="Draw an image from a label map (synchronous)")
async def semantic2img(body: Semantic2ImgBody, request: Request, submitter: SubmitterDep,
                       idempotency_key: IdempotencyKey = None, timeout: Timeout = None) -> Response:
    """A semantic-synthesis model draws the image that `label_map` (base64 PNG of labels) describes, at its size."""
    return await _run(body, request, submitter, idempotency_key, timeout)


@router.post("/unconditional", response_class=Response, responses=RESPONSES,
             summary="Sample the model's own distribution (synchronous)")
async def unconditional(body: UnconditionalBody, request: Request, submitter: SubmitterDep,
                        idempotency_key: IdempotencyKey = None, timeout: Timeout = None) -> Response:
    """An image from no condition at all (an unconditional model, or a conditional one's null condition)."""
    return await _run(body, request, submitter, idempotency_key, timeout)
