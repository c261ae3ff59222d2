"""Synchronous generation: submit, wait, answer the first image as image/png with its parameters in headers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from service.api.bodies import InpaintBody, JobBody, Txt2ImgBody
from service.api.deps import AUTH_RESPONSES, QUOTA_RESPONSES, IdempotencyKey, SubmitterDep, get_principal
from service.api.submit import Submitter, result_pngs, sync_timeout, wait_done
from service.schemas import Job

router = APIRouter(prefix="/v1", tags=["synchronous"], dependencies=[Depends(get_principal)],
                   responses={**AUTH_RESPONSES, **QUOTA_RESPONSES})
Timeout = Annotated[float | None, Query(gt=0, description="seconds to wait (at most job_deadline_s); 504 after")]
RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"image/png": {}}, "description": "the first image; X-Job-Id and the parameters in headers"},
    504: {"description": "not finished in time: poll the job named by X-Job-Id / Location"}}


def _headers(job: Job) -> dict[str, str]:
    r = job.request
    return {"X-Job-Id": job.id, "X-Model": job.model, "X-Seed": str(r.seed), "X-Steps": str(r.steps),
            "X-Sampler": r.sampler, "X-Guidance-Scale": f"{r.guidance_scale:g}", "X-Images": str(job.results),
            "X-Task": r.task.value, "Content-Location": f"/v1/jobs/{job.id}/images/0"}


async def _run(body: JobBody, request: Request, submitter: Submitter, idempotency_key: str | None,
               timeout: float | None) -> Response:
    job = await submitter.submit_body(body, idempotency_key)
    done = await wait_done(submitter.queue, job, request, sync_timeout(submitter.settings, timeout))
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
