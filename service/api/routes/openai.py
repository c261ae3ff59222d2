"""OpenAI-compatible images API: the official `openai` client works against it with `base_url` set to ours.

Answers `{created, data: [{b64_json} | {url}]}`; errors `{error: {message, type, param, code}}` (errors.py).
`response_format: url` links to GET /v1/jobs/{id}/images/{i} on this server (valid for `result_ttl_s`).
Beyond OpenAI's fields we accept seed, steps, guidance_scale, sampler, negative_prompt, deadline_s, webhook_url,
priority and SDXL's micro-conditioning (original_size, crops_coords_top_left, target_size), plus loras, refiner and
refiner_switch for generations and strength for edits; with the openai client, pass them in `extra_body`. A
`webhook_url` is checked against the allow-list before anything else is read (422 naming it) and registered once the
job is queued (service/webhooks.py): the job's terminal event is POSTed there, signed, even when the client stopped
waiting.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service import webhooks
from service.api.bodies import (
    OpenAIEditForm,
    OpenAIGenerationBody,
    OpenAIImage,
    OpenAIImageParams,
    OpenAIImagesResponse,
    parse_size,
)
from service.api.deps import AUTH_RESPONSES, QUOTA_RESPONSES, SubmitterDep, get_principal, hold_waiting_call
from service.api.errors import ApiError, validation_error
from service.api.submit import Submitter, result_pngs, sync_timeout, wait_done
from service.config import Settings
from service.images import ImageError, openai_image_and_mask
from service.queue import Job, JobQueue
from service.schemas import GenerationRequest, Task

router = APIRouter(prefix="/v1/images", tags=["openai"],
                   dependencies=[Depends(get_principal), Depends(hold_waiting_call)],
                   responses={**AUTH_RESPONSES, **QUOTA_RESPONSES})
Timeout = Annotated[float | None, Query(gt=0, description="seconds to wait (at most job_deadline_s); 504 after")]
EditForm = Annotated[OpenAIEditForm, Form(media_type="multipart/form-data")]


def _as_size(errors: list[Any]) -> ApiError:
    """Admission names width/height; OpenAI clients sent `size`."""
    for e in errors:
        if tuple(e["loc"]) in (("width",), ("height",)):
            e["loc"] = ("size",)
    return validation_error(errors)


async def _submit(submitter: Submitter, params: OpenAIImageParams, task: Task, **fields: Any) -> Job:
    """Queue the job (admission's width/height errors named `size`), then register its webhook, if any."""
    try:
        job = await submitter.submit(params.request(task, **fields), deadline_s=params.deadline_s)
    except ValidationError as exc:
        raise _as_size(exc.errors(include_url=False)) from exc
    if params.webhook_url is not None:
        await webhooks.register(submitter.queue, job.id, params.webhook_url)
    return job


async def _answer(job: Job, request: Request, queue: JobQueue, settings: Settings, response_format: str,
                  timeout: float | None) -> OpenAIImagesResponse:
    done = await wait_done(queue, job, request, sync_timeout(settings, timeout))
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [OpenAIImage(url=f"{base}/v1/jobs/{done.id}/images/{i}") for i in range(done.results)]
    else:
        data = [OpenAIImage(b64_json=base64.b64encode(png).decode()) for png in await result_pngs(queue, done)]
    r: GenerationRequest = done.request
    size = f"{r.width}x{r.height}" if r.width and r.height else None
    return OpenAIImagesResponse(created=int(done.created_at.timestamp()), data=data, size=size)


@router.post("/generations", response_model=OpenAIImagesResponse, response_model_exclude_none=True,
             summary="Create images (OpenAI-compatible)")
async def generations(body: OpenAIGenerationBody, request: Request, submitter: SubmitterDep,
                      timeout: Timeout = None) -> OpenAIImagesResponse:
    """txt2img for `prompt`; waits for the images (504 with the job id after `timeout`/job_deadline_s)."""
    webhooks.checked(body.webhook_url, submitter.settings)
    job = await _submit(submitter, body, Task.txt2img)
    return await _answer(job, request, submitter.queue, submitter.settings, body.response_format, timeout)


async def _read(upload: UploadFile, field: str, settings: Settings) -> bytes:
    data = await upload.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise ImageError(field, f"{field} is over the limit of {settings.max_image_bytes} bytes", 413)
    return data


@router.post("/edits", response_model=OpenAIImagesResponse, response_model_exclude_none=True,
             summary="Edit an image (OpenAI-compatible inpainting)")
async def edits(form: EditForm, request: Request, submitter: SubmitterDep,
                timeout: Timeout = None) -> OpenAIImagesResponse:
    """Inpaint `image` where `mask` is transparent (no mask: where the image itself is transparent)."""
    settings = submitter.settings
    webhooks.checked(form.webhook_url, settings)
    image_bytes = await _read(form.image, "image", settings)
    mask_bytes = await _read(form.mask, "mask", settings) if form.mask is not None else None
    picture, white = await run_in_threadpool(openai_image_and_mask, image_bytes, mask_bytes, settings)
    if parse_size(form.size) not in ((None, None), picture.size):
        raise validation_error([{"loc": ("body", "size"), "type": "size_mismatch",
                                 "msg": f"size {form.size} differs from the image's {picture.size[0]}x"
                                        f"{picture.size[1]}; resizing is not supported: leave size out"}])
    job = await _submit(submitter, form, Task.inpaint, image=picture.png, mask=white.png,
                        width=picture.size[0], height=picture.size[1], strength=form.strength)
    return await _answer(job, request, submitter.queue, settings, form.response_format, timeout)
