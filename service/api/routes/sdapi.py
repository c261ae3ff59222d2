"""AUTOMATIC1111-compatible API (`/sdapi/v1`), so A1111 clients (the `webuiapi` package, Open WebUI, SillyTavern,
Krita plugins, bots) work against ldm-serve as they are.

The same submission path as every route (service/api/submit.py): the API key (Bearer; A1111's basic auth is not
taken), its rate and jobs in flight, the limits, the job queue. txt2img and img2img wait for their job and answer
A1111's shape; the mapping of every A1111 field is in service/api/a1111.py and docs/a1111.md. Options, progress,
interrupt and skip are per API key (service/api/a1111_session.py). Errors keep FastAPI's `{"detail": ...}`
shape, which is A1111's too.
"""

from __future__ import annotations

import base64
import binascii
import io
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from PIL import Image, ImageOps
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from service import webhooks
from service.api import a1111
from service.api.a1111 import A1111Body, A1111Image, Img2ImgBody, Txt2ImgBody
from service.api.a1111_session import A1111Session, OptionsTooLarge
from service.api.deps import (
    AUTH_RESPONSES,
    QUOTA_RESPONSES,
    PrincipalDep,
    QueueDep,
    SettingsDep,
    SubmitterDep,
    get_principal,
    hold_waiting_call,
)
from service.api.errors import ApiError, validation_error
from service.api.submit import Submitter, result_pngs, served_models, sync_timeout, wait_done
from service.config import Settings
from service.images import ImageError, decode_resizable, encoded, png_text
from service.loras import available_loras
from service.queue import Job, JobQueue
from service.schemas import GenerationRequest, Task

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], dependencies=[Depends(get_principal)],
                   responses=AUTH_RESPONSES)
internal = APIRouter(prefix="/internal", tags=["automatic1111"], dependencies=[Depends(get_principal)],
                     responses=AUTH_RESPONSES)


def _session(request: Request, principal: PrincipalDep) -> A1111Session:
    return A1111Session(request.app.state.queue, principal)


SessionDep = Annotated[A1111Session, Depends(_session)]


def _renamed(exc: ValidationError) -> ApiError:
    """A 422 that names the A1111 fields the client sent, not ours."""
    errors = exc.errors(include_url=False)
    for e in errors:
        if e["loc"] and e["loc"][0] in a1111.A1111_NAMES:
            e["loc"] = (a1111.A1111_NAMES[str(e["loc"][0])], *e["loc"][1:])
    return validation_error(errors)


def _checkpoint(name: Any) -> str:
    """A model name from an A1111 checkpoint title ("name [hash]", "name.safetensors")."""
    return a1111.checkpoint_name(name)


async def _model(body: A1111Body, session: A1111Session) -> str | None:
    """The request's model: override_settings' checkpoint, else the caller's options', else the default."""
    chosen = (body.override_settings or {}).get("sd_model_checkpoint") or \
        (await session.options()).get("sd_model_checkpoint")
    return _checkpoint(chosen) if chosen else None


async def _run(submitter: Submitter, session: A1111Session, request: Request, fields: dict[str, Any],
               webhook_url: str | None = None) -> Job | None:
    """Submit (with its webhook), make it the caller's current job, wait; None when it was interrupted."""
    try:
        hook = webhooks.checked(webhook_url, submitter.settings)
        job = await submitter.submit(GenerationRequest(**fields))
    except ValidationError as exc:
        raise _renamed(exc) from exc
    if hook is not None:
        await webhooks.register(submitter.queue, job.id, hook)
    await session.set_current(job.id)
    try:
        return await wait_done(submitter.queue, job, request, sync_timeout(submitter.settings, None))
    except ApiError as exc:
        if exc.code == "job_cancelled":
            return None
        raise


async def _answer(done: Job | None, queue: JobQueue, body: A1111Body, notes: dict[str, str],
                  extra_images: tuple[bytes, ...] = ()) -> A1111Image:
    parameters = body.model_dump(exclude={"init_images", "mask"})
    if done is None:
        return A1111Image(images=[], parameters=parameters, info='{"interrupted": true}')
    pngs = await result_pngs(queue, done) if body.send_images else []
    images = [base64.b64encode(png).decode() for png in [*pngs, *extra_images]]
    return A1111Image(images=images, parameters=parameters, info=a1111.info(done, notes))


@router.post("/txt2img", response_model=A1111Image, summary="txt2img (AUTOMATIC1111)", responses=QUOTA_RESPONSES,
             dependencies=[Depends(hold_waiting_call)])
async def txt2img(body: Txt2ImgBody, request: Request, submitter: SubmitterDep, session: SessionDep) -> A1111Image:
    """Generate; waits for the images. Interrupted (POST /sdapi/v1/interrupt): `images` empty."""
    notes = a1111.check_fields(body.model_extra or {}, "txt2img")
    try:
        fields = a1111.request_fields(body, await _model(body, session), submitter.settings.a1111_preview_every)
    except ValidationError as exc:
        raise _renamed(exc) from exc
    if body.enable_hr:
        return await _hires(body, fields, notes, request, submitter, session)
    done = await _run(submitter, session, request, {**fields, "task": Task.txt2img}, body.webhook_url)
    return await _answer(done, submitter.queue, body, notes)


def _hires_size(body: Txt2ImgBody, first: tuple[int, int], settings: Settings) -> tuple[int, int]:
    """The final size, within the limits (checked before the first pass when its size is known)."""
    size = a1111.hires_size(body, first, settings.size_multiple)
    for name, value, high in (("width", size[0], settings.max_width), ("height", size[1], settings.max_height)):
        if value > high:
            field = "hr_resize_x" if body.hr_resize_x or body.hr_resize_y else "hr_scale"
            raise validation_error([{"loc": ("body", field), "type": "too_large",
                                     "msg": f"the hires fix's final {name} {value} is over the limit of {high}"}])
    return size


def _resized(png: bytes, size: tuple[int, int], how: str) -> bytes:
    resample = Image.Resampling.NEAREST if how == "nearest" else Image.Resampling.LANCZOS
    return encoded(Image.open(io.BytesIO(png)).convert("RGB").resize(size, resample)).png


async def _second_passes(body: Txt2ImgBody, first: Job, second: dict[str, Any], how: str, request: Request,
                         submitter: Submitter, session: A1111Session) -> tuple[list[bytes], tuple[int, int]] | None:
    """Each first-pass image resized and img2img'd (one job per image: each has its own input); None when
    interrupted. Returns the final PNGs and their size."""
    finals, size = [], (0, 0)
    for png, seed in zip(await result_pngs(submitter.queue, first), first.request.seeds(), strict=True):
        size = _hires_size(body, Image.open(io.BytesIO(png)).size, submitter.settings)
        image = await run_in_threadpool(_resized, png, size, how)
        done = await _run(submitter, session, request, {**second, "image": image, "width": size[0],
                                                         "height": size[1], "seed": seed}, body.webhook_url)
        if done is None:
            return None
        finals += await result_pngs(submitter.queue, done)
    return finals, size


async def _hires(body: Txt2ImgBody, fields: dict[str, Any], notes: dict[str, str], request: Request,
                 submitter: Submitter, session: A1111Session) -> A1111Image:
    """The hires fix: txt2img at the first size, then `_second_passes` at the final size."""
    how, upscaler_note = a1111.hires_upscaler(body)
    if body.width and body.height:
        _hires_size(body, (body.width, body.height), submitter.settings)
    try:
        second = a1111.second_pass(body, fields)
    except ValidationError as exc:
        raise _renamed(exc) from exc
    if fields.get("refiner"):
        notes = notes | {"refiner_checkpoint": "the refiner finishes the first pass; the hires pass runs on the "
                         "model alone"}
    first = await _run(submitter, session, request, {**fields, "task": Task.txt2img})  # hooks: on the final jobs
    passes = await _second_passes(body, first, second, how, request, submitter, session) if first else None
    if first is None or passes is None:
        return await _answer(None, submitter.queue, body, notes)
    finals, (width, height) = passes
    extra = {"Hires upscale": body.hr_scale, "Hires steps": second["steps"], "Hires upscaler": body.hr_upscaler}
    info = a1111.info(first, notes | upscaler_note, width=width, height=height,
                      denoising_strength=second["strength"], extra_generation_params=extra)
    images = [base64.b64encode(png).decode() for png in finals] if body.send_images else []
    return A1111Image(images=images, parameters=body.model_dump(), info=info)


def _b64(value: str, field: str) -> bytes:
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(field, f"{field} is not valid base64: {exc}") from exc


def _fit(image: Image.Image, size: tuple[int, int], mode: int, resample: Image.Resampling) -> Image.Image:
    """A1111's resize modes: 0 and 3 just resize, 1 crops to the aspect ratio and resizes."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, resample) if mode == 1 else image.resize(size, resample)


def _check_target(body: Img2ImgBody, settings: Settings) -> None:
    """Refuse what cannot be resized to before resizing anything (admission checks the rest)."""
    if body.resize_mode == 2:
        raise validation_error([{"loc": ("body", "resize_mode"), "type": "unsupported",
                                 "msg": "resize_mode 2 (resize and fill) is not supported; use 0 or 1"}])
    for name, value, high in (("width", body.width, settings.max_width), ("height", body.height, settings.max_height)):
        if value is not None and value > high:
            raise validation_error([{"loc": ("body", name), "type": "too_large",
                                     "msg": f"{name} must be at most {high} pixels, got {value}"}])
    if len(body.init_images) != 1:
        raise validation_error([{"loc": ("body", "init_images"), "type": "one_image",
                                 "msg": f"init_images must hold one image, got {len(body.init_images)}"}])


def _inputs(body: Img2ImgBody, settings: Settings) -> dict[str, Any]:
    """The image (and mask) resized to the asked size as GenerationRequest fields. CPU work: run in a thread."""
    picture = decode_resizable(_b64(body.init_images[0], "init_images"), settings, field="init_images")
    size = (body.width or picture.width, body.height or picture.height)
    image = encoded(_fit(picture, size, body.resize_mode, Image.Resampling.LANCZOS))
    fields: dict[str, Any] = {"image": image.png, "width": size[0], "height": size[1], "task": Task.img2img}
    if body.mask is not None:
        mask = decode_resizable(_b64(body.mask, "mask"), settings, field="mask", mode="L")
        mask = _fit(mask, size, body.resize_mode, Image.Resampling.NEAREST)
        fields |= {"mask": encoded(ImageOps.invert(mask) if body.inpainting_mask_invert else mask).png,
                   "task": Task.inpaint}
    return fields


@router.post("/img2img", response_model=A1111Image, summary="img2img and inpainting (AUTOMATIC1111)",
             responses=QUOTA_RESPONSES, dependencies=[Depends(hold_waiting_call)])
async def img2img(body: Img2ImgBody, request: Request, submitter: SubmitterDep, session: SessionDep) -> A1111Image:
    """img2img; with `mask`, inpainting (pixels outside the mask are kept exactly). Waits for the images."""
    notes = a1111.check_fields(body.model_extra or {}, "img2img")
    _check_target(body, submitter.settings)
    try:
        fields = a1111.request_fields(body, await _model(body, session), submitter.settings.a1111_preview_every)
    except ValidationError as exc:
        raise _renamed(exc) from exc
    fields |= await run_in_threadpool(_inputs, body, submitter.settings)
    strength, fill_note = a1111.inpaint_strength(body) if body.mask is not None else (body.denoising_strength, {})
    done = await _run(submitter, session, request, {**fields, "strength": strength}, body.webhook_url)
    extra = (fields["image"],) if body.include_init_images else ()
    return await _answer(done, submitter.queue, body, notes | fill_note, extra)


# ------------------------------------------------------------------------------------------ progress, interrupt

class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class Progress(BaseModel):
    """GET /sdapi/v1/progress: of the caller's latest /sdapi job. `current_image`: the base64 PNG of its newest live
    preview when the job asked for previews (`preview_every`, or the server's LDM_A1111_PREVIEW_EVERY) and its worker
    made one (continuous batching); else null."""

    progress: float = 0.0
    eta_relative: float = 0.0
    state: ProgressState = ProgressState()
    current_image: str | None = None
    textinfo: str | None = None


async def _current(session: A1111Session, queue: JobQueue) -> Job | None:
    job_id = await session.current()
    job = await queue.get(job_id) if job_id else None
    return job if job is not None and session.principal.sees(job.owner) else None


@router.get("/progress", response_model=Progress, summary="Progress of the caller's current job")
async def progress(session: SessionDep, queue: QueueDep,
                   skip_current_image: Annotated[bool, Query()] = False) -> Progress:
    job = await _current(session, queue)
    if job is None or job.status.terminal:
        return Progress()
    done = job.step / job.total if job.total else 0.0
    elapsed = (datetime.now(UTC) - job.started_at).total_seconds() if job.started_at else 0.0
    state = ProgressState(interrupted=job.cancel_requested, job=job.id, job_count=1, sampling_step=job.step,
                          sampling_steps=job.total, job_timestamp=job.created_at.strftime("%Y%m%d%H%M%S"))
    every = job.request.preview_every
    image = await queue.latest_preview(job.id, every + 2) if every and not skip_current_image else None
    return Progress(progress=done, eta_relative=elapsed / done * (1 - done) if done else 0.0, state=state,
                    current_image=image, textinfo=f"job {job.id} {job.status.value}")


async def _cancel(session: A1111Session, queue: JobQueue) -> dict[str, Any]:
    job = await _current(session, queue)
    if job is not None and not job.status.terminal:
        await queue.cancel(job.id)
    return {}


@router.post("/interrupt", summary="Stop the caller's current job")
async def interrupt(session: SessionDep, queue: QueueDep) -> dict[str, Any]:
    """Its txt2img/img2img call then answers with no images."""
    return await _cancel(session, queue)


@router.post("/skip", summary="Skip the caller's current job (as interrupt)")
async def skip(session: SessionDep, queue: QueueDep) -> dict[str, Any]:
    """A1111 skips one iteration of n_iter; here all of a request's images are one batch, so skip stops it."""
    return await _cancel(session, queue)


# ------------------------------------------------------------------------------------------ models and options

@router.get("/sd-models", summary="Served models as A1111 checkpoints")
async def sd_models(queue: QueueDep, settings: SettingsDep) -> list[dict[str, Any]]:
    served = await served_models(queue, settings)
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
            for name in sorted(served)]


@router.get("/options", summary="The caller's options")
async def get_options(session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """`sd_model_checkpoint`: the caller's model (default: the server's); other options are kept and echoed."""
    return {"sd_model_checkpoint": settings.default_model, "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, **await session.options()}


@router.post("/options", summary="Set the caller's options")
async def set_options(options: Annotated[dict[str, Any], Body()], session: SessionDep, queue: QueueDep,
                      settings: SettingsDep) -> None:
    """`sd_model_checkpoint` must name a served model; other options are kept (and echoed) but change nothing."""
    if "sd_model_checkpoint" in options:
        name = _checkpoint(options["sd_model_checkpoint"])
        served = await served_models(queue, settings)
        if name not in served:
            raise validation_error([{"loc": ("body", "sd_model_checkpoint"), "type": "model_not_found",
                                     "msg": f"unknown model {name!r}; served: {', '.join(sorted(served))}"}])
        options = {**options, "sd_model_checkpoint": name}
    try:
        await session.set_options(options)
    except OptionsTooLarge as exc:
        raise ApiError(413, str(exc), code="options_too_large") from exc


@router.get("/samplers", summary="Samplers, by their A1111 names")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": list(a1111.SAMPLER_ALIASES[name]),
             "options": {"scheduler": "karras"} if karras else {}} for name, (_, karras) in a1111.SAMPLERS.items()]


@router.get("/schedulers", summary="Schedulers (sigma schedules)")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
             "need_inner_model": False} for name, label in a1111.SCHEDULERS.items()]


@router.get("/upscalers", summary="The hires fix's upscalers (resizing on pixels)")
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 1}
            for name in a1111.HR_UPSCALERS]


@router.get("/latent-upscale-modes", summary="\"Latent\" (done on pixels: see upscalers)")
async def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": "Latent"}]


class PngInfoBody(BaseModel):
    image: str


@router.post("/png-info", summary="The generation parameters in a PNG's text chunks")
async def png_info(body: PngInfoBody, settings: SettingsDep) -> dict[str, Any]:
    """`info`: A1111's parameters text (the PNG's own `parameters` chunk, else made from ours); `items`: every
    chunk."""
    text = await run_in_threadpool(png_text, _b64(body.image, "image"), settings)
    info = text.get("parameters") or (a1111.infotext(text) if "prompt" in text else "")
    return {"info": info, "items": text, "parameters": {k: v for k, v in text.items() if k != "parameters"}}


# ------------------------------------------------------------------------------------------ start-up probes

EMPTY_LISTS = ("sd-vae", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles",
               "script-info", "extensions", "sd-modules")


def _empty_list(path: str) -> None:
    @router.get(f"/{path}", summary=f"{path}: none here", response_model=list[dict[str, Any]])
    async def empty() -> list[dict[str, Any]]:
        return []


for _path in EMPTY_LISTS:
    _empty_list(_path)


@router.get("/loras", summary="The LoRA adapters of the server's LDM_LORA_DIR (use as <lora:name:weight>)")
async def loras(settings: SettingsDep) -> list[dict[str, Any]]:
    """A1111's shape: name, alias, path (the name: no server paths are shown), metadata."""
    return [{"name": name, "alias": name, "path": name, "metadata": {}} for name in available_loras(settings.lora_dir)]


@router.get("/scripts", summary="Scripts: none")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/embeddings", summary="Textual-inversion embeddings: none")
async def embeddings() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}


@router.get("/cmd-flags", summary="Command-line flags: none")
async def cmd_flags() -> dict[str, Any]:
    return {}


@router.post("/refresh-checkpoints", summary="No-op: served models are what live workers register")
async def refresh_checkpoints() -> None:
    return None


@router.post("/refresh-vae", summary="No-op")
async def refresh_vae() -> None:
    return None


@internal.get("/ping", summary="Alive (A1111 clients probe it at start-up)")
async def ping() -> dict[str, Any]:
    return {}
