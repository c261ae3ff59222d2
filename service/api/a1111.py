"""AUTOMATIC1111's `/sdapi/v1` request fields, and how each becomes part of our `GenerationRequest`.

Clients of AUTOMATIC1111's web UI (the `webuiapi` package, Open WebUI, SillyTavern, Krita plugins, bots) send every
field of its processing objects, most at their neutral values. Each field they may send is in `FIELDS`, in one of
three kinds: `supported` (mapped onto our request), `ignored` (accepted; when it asks for something, the answer's
`info.ldm_ignored` says it was not done and why) and `refused` (accepted at its neutral value; anything else is
a 422 naming the field, since we cannot do what it asks). A field in none of them is a 422 too (an unknown field).
docs/a1111.md is the table of them all; a test keeps it equal to `FIELDS`.

Pure functions of the body and the settings; no Redis and no images decoded here (routes/sdapi.py does that).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.queue import Job
from service.schemas import MAX_SEED, GenerationRequest, Priority, Sampler, Task

Kind = Literal["supported", "ignored", "refused"]


@dataclass(frozen=True)
class Rule:
    """What becomes of one A1111 field. `neutral`: for a refused field, the values that ask for nothing (accepted);
    for an ignored one, the values that need no note in the answer."""

    kind: Kind
    note: str
    neutral: Callable[[Any], bool] = lambda v: True
    endpoints: tuple[str, ...] = ("txt2img", "img2img")


def _falsy(value: Any) -> bool:
    return not value


def _default(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in values


def _supported(note: str, *endpoints: str) -> Rule:
    return Rule("supported", note, endpoints=endpoints or ("txt2img", "img2img"))


def _ignored(note: str, neutral: Callable[[Any], bool] = _falsy, *endpoints: str) -> Rule:
    return Rule("ignored", note, neutral, endpoints or ("txt2img", "img2img"))


def _refused(note: str, neutral: Callable[[Any], bool] = _falsy, *endpoints: str) -> Rule:
    return Rule("refused", note, neutral, endpoints or ("txt2img", "img2img"))


TXT, IMG = "txt2img", "img2img"
FIELDS: dict[str, Rule] = {
    "prompt": _supported("the prompt"),
    "negative_prompt": _supported("the negative prompt"),
    "seed": _supported("-1 (or left out) = random; the seed used is in `info.seed`; image i gets seed + i"),
    "sampler_name": _supported("A1111 sampler names (GET /sdapi/v1/samplers) or ours; \"DPM++ 2M Karras\" sets "
                               "Karras sigmas; left out = the model's default (GET /v1/models: default_sampler; "
                               "else DPM++ 2M)"),
    "sampler_index": _supported("the older name of sampler_name (used when sampler_name is left out)"),
    "scheduler": _supported("\"automatic\" or \"karras\" (Karras sigmas, DPM++ 2M only); any other is refused"),
    "batch_size": _supported("images per request = batch_size x n_iter, all in one job (one batch)"),
    "n_iter": _supported("see batch_size"),
    "steps": _supported("sampler steps; left out = 20"),
    "cfg_scale": _supported("classifier-free guidance scale"),
    "width": _supported("pixels; left out = the model's default size (A1111: 512). img2img: the init image is "
                        "resized to it (resize_mode)"),
    "height": _supported("see width"),
    "denoising_strength": _supported("img2img and inpainting strength (A1111 default 0.75); txt2img: only with "
                                     "enable_hr, which is refused"),
    "eta": _supported("DDIM's eta with the DDIM sampler; ignored with the others (A1111 uses it for ancestral "
                      "samplers' noise too)"),
    "override_settings": _supported("only `sd_model_checkpoint` (the model for this request) is used; other keys "
                                    "are ignored", ),
    "send_images": _supported("false: the answer's `images` is empty"),
    "init_images": _supported("exactly one base64 image (a data: URL prefix is allowed)", IMG),
    "resize_mode": _supported("how the init image meets width x height: 0 just resize, 1 crop and resize, 3 "
                              "just resize (latent upscale: done on pixels); 2 (resize and fill) is refused", IMG),
    "mask": _supported("base64 mask, white = repaint; makes the job an inpainting job. Pixels outside it are kept "
                       "exactly", IMG),
    "inpainting_mask_invert": _supported("1: repaint the black part instead", IMG),
    "inpainting_fill": _supported("1 original (start from the image noised to denoising_strength), 2 latent noise "
                                  "(start from noise: strength 1); 0 fill and 3 latent nothing are done as 1 (noted "
                                  "in info.ldm_ignored)", IMG),
    "include_init_images": _supported("true: the init image is appended to `images`", IMG),
    "webhook_url": _supported("ldm-serve's extension: each job's terminal event is also POSTed there, signed "
                              "(docs/webhooks.md; the host must be in LDM_WEBHOOK_ALLOWED_HOSTS)"),
    "preview_every": _supported("ldm-serve's extension: a live preview every this many steps (0 to 1000), which GET "
                                "/sdapi/v1/progress answers as `current_image`; left out = the server's "
                                "LDM_A1111_PREVIEW_EVERY (default 0: none, `current_image` null). Made by "
                                "static and continuous-batching workers alike"),
    "priority": _supported("ldm-serve's extension: `high`, `normal` (default) or `low` (docs/continuous-batching.md; "
                           "above the API key's `max_priority`: 403)"),
    # accepted; a value that asks for something is noted in info.ldm_ignored
    "styles": _refused("prompt styles are not supported: put the style's words in the prompt"),
    "subseed": _ignored("variation seeds are not supported", _default(-1, 0)),
    "subseed_strength": _ignored("variation seeds are not supported", _default(0)),
    "seed_resize_from_h": _ignored("seed resizing is not supported", _default(-1, 0)),
    "seed_resize_from_w": _ignored("seed resizing is not supported", _default(-1, 0)),
    "do_not_save_samples": _ignored("the server keeps results in Redis for result_ttl_s, never on disk",
                                    lambda v: True),
    "do_not_save_grid": _ignored("no grids are made", lambda v: True),
    "save_images": _ignored("results are kept in Redis for result_ttl_s (GET /v1/jobs/{id}/images/{i}), never on "
                            "the server's disk", lambda v: True),
    "s_min_uncond": _ignored("sampler tuning of A1111's k-diffusion samplers", _default(0)),
    "s_churn": _ignored("sampler tuning of A1111's k-diffusion samplers", _default(0)),
    "s_tmax": _ignored("sampler tuning of A1111's k-diffusion samplers", lambda v: True),
    "s_tmin": _ignored("sampler tuning of A1111's k-diffusion samplers", _default(0)),
    "s_noise": _ignored("sampler tuning of A1111's k-diffusion samplers", _default(1)),
    "override_settings_restore_afterwards": _ignored("override_settings apply to their request only",
                                                     lambda v: True),
    "disable_extra_networks": _ignored("there are no extra networks in prompts", lambda v: True),
    "comments": _ignored("no infotext comments", lambda v: True),
    "force_task_id": _ignored("GET /sdapi/v1/progress follows the caller's latest request", lambda v: True),
    "infotext": _ignored("infotext is not parsed: send the fields", _falsy),
    "script_args": _ignored("there are no scripts (see script_name)", lambda v: True),
    "firstphase_width": _ignored("old hires-fix field", lambda v: True, TXT),
    "firstphase_height": _ignored("old hires-fix field", lambda v: True, TXT),
    "image_cfg_scale": _ignored("instruct-pix2pix only", lambda v: True, IMG),
    "mask_blur": _ignored("the mask is used as sent (hard edge: pixels outside it are kept exactly)", _default(0),
                          IMG),
    "mask_blur_x": _ignored("see mask_blur", _default(0), IMG),
    "mask_blur_y": _ignored("see mask_blur", _default(0), IMG),
    "mask_round": _ignored("masks are binarised at 0.5", lambda v: True, IMG),
    "inpaint_full_res": _ignored("the whole picture is inpainted at its size (\"only masked\" is not done); pixels "
                                 "outside the mask are kept exactly either way", _falsy, IMG),
    "inpaint_full_res_padding": _ignored("see inpaint_full_res", lambda v: True, IMG),
    "initial_noise_multiplier": _ignored("noise is not scaled", _default(1), IMG),
    "resize_to": _ignored("use width and height", lambda v: True, IMG),
    # refused unless neutral
    "restore_faces": _refused("there is no face restoration model"),
    "tiling": _refused("tileable images are not supported"),
    "script_name": _refused("scripts are not supported"),
    "alwayson_scripts": _refused("extensions (ControlNet, ADetailer, ...) are not supported"),
    "refiner_checkpoint": _supported("the SDXL refiner that finishes the images: the one the model's workers hold "
                                     "(LDM_WORKER_REFINER; its name, title or file name; `refiners` in GET "
                                     "/v1/models); any other is refused. \"\", \"None\" = none. With the hires fix it "
                                     "finishes the first pass; img2img: refused (a refiner finishes txt2img "
                                     "runs)"),
    "refiner_switch_at": _supported("with refiner_checkpoint: the fraction of the steps before the refiner takes "
                                    "over, strictly between 0 and 1; left out = 0.8; without a refiner it does "
                                    "nothing (as in A1111)"),
    "enable_hr": _supported("the hires fix: generate at width x height, upscale the images (on pixels), then "
                            "img2img them at denoising_strength (default 0.7); the limits apply to the final size",
                            TXT),
    "hr_scale": _supported("final size = width, height x hr_scale (rounded down to the size multiple), unless "
                           "hr_resize_x/y are given", TXT),
    "hr_resize_x": _supported("final width (0: from hr_scale; only one of x, y: the other keeps the aspect ratio)",
                              TXT),
    "hr_resize_y": _supported("final height (see hr_resize_x)", TXT),
    "hr_upscaler": _supported("\"Latent\" (and its variants), \"Lanczos\", \"None\": resized with Lanczos on pixels "
                              "(latent upscaling is noted in info.ldm_ignored); \"Nearest\": nearest neighbour; any "
                              "other (ESRGAN models, ...) is refused", TXT),
    "hr_second_pass_steps": _supported("steps of the second pass; 0 = steps", TXT),
    "hr_sampler_name": _supported("sampler of the second pass; empty = sampler_name", TXT),
    "hr_scheduler": _supported("scheduler of the second pass; empty = scheduler", TXT),
    "hr_prompt": _supported("prompt of the second pass; empty = prompt", TXT),
    "hr_negative_prompt": _supported("negative prompt of the second pass; empty = negative_prompt", TXT),
    "hr_checkpoint_name": _ignored("the second pass runs on the first pass's model",
                                   _default("", "Use same checkpoint"), TXT),
    "hr_additional_modules": _ignored("no additional modules", lambda v: True, TXT),
    "firstpass_image": _refused("the hires fix is not supported", _falsy, TXT),
    "latent_mask": _refused("a separate latent mask is not supported: send one mask", _falsy, IMG),
}

#: A1111 sampler name -> (ours, Karras sigmas), and the aliases A1111 lists for each
SAMPLERS: dict[str, tuple[Sampler, bool]] = {
    "DPM++ 2M": ("dpmpp_2m", False), "DPM++ 2M Karras": ("dpmpp_2m", True), "Euler a": ("euler_a", False),
    "DDIM": ("ddim", False), "PLMS": ("plms", False), "DDPM": ("ddpm", False)}
SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "DPM++ 2M": ("k_dpmpp_2m",), "DPM++ 2M Karras": ("k_dpmpp_2m_ka",), "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "DDIM": ("ddim",), "PLMS": ("plms",), "DDPM": ("ddpm",)}
SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}
#: our request's field -> the A1111 field a client sent it as (for the 422s admission answers)
A1111_NAMES = {"guidance_scale": "cfg_scale", "n": "batch_size", "sampler": "sampler_name", "karras": "scheduler",
               "strength": "denoising_strength", "image": "init_images", "model": "sd_model_checkpoint",
               "refiner": "refiner_checkpoint", "refiner_switch": "refiner_switch_at"}
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # "name [hash]", as A1111 titles checkpoints
NO_REFINER = ("", "None", "none")  # A1111's values of refiner_checkpoint that ask for no refiner


def checkpoint_name(title: Any) -> str:
    """A model name from an A1111 checkpoint title ("name [hash]", "name.safetensors")."""
    text = HASH_SUFFIX.sub("", str(title)).strip()
    return re.sub(r"\.(safetensors|ckpt)$", "", text)


class A1111Body(BaseModel):
    """The fields both generation routes map (the rest: `FIELDS`, checked by `check_fields`)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED, description="-1 = random")
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int = Field(default=20, ge=1)
    cfg_scale: float = Field(default=7.0, ge=0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    eta: float | None = Field(default=None, allow_inf_nan=False)
    denoising_strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    webhook_url: str | None = Field(default=None, max_length=2048)
    preview_every: int | None = Field(default=None, ge=0, le=1000, description="live previews (ldm-serve's "
                                      "extension); None = the server's a1111_preview_every")
    priority: Priority = Field(default="normal", description="ldm-serve's own field (not A1111's): high, normal or low")
    refiner_checkpoint: str | None = Field(default=None, description="the SDXL refiner (the one the model's workers "
                                           "hold); None, \"\" or \"None\" = none")
    refiner_switch_at: float | None = Field(default=None, allow_inf_nan=False, description="with refiner_checkpoint: "
                                            "where the refiner takes over (fraction of the steps); None = 0.8")


class Txt2ImgBody(A1111Body):
    """POST /sdapi/v1/txt2img; `enable_hr` adds the hires fix's second pass."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"prompt": "a red circle", "steps": 20, "seed": -1, "width": 64, "height": 64, "sampler_name": "DPM++ 2M"}]})

    enable_hr: bool = False
    hr_scale: float = Field(default=2.0, gt=0, le=16, allow_inf_nan=False)
    hr_resize_x: int = Field(default=0, ge=0)
    hr_resize_y: int = Field(default=0, ge=0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(default=0, ge=0)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(A1111Body):
    """POST /sdapi/v1/img2img: `mask` makes it inpainting."""

    init_images: list[str] = Field(default_factory=list, description="one base64 image")
    mask: str | None = Field(default=None, description="base64; white = repaint")
    resize_mode: int = Field(default=0, ge=0, le=3)
    inpainting_fill: int = Field(default=1, ge=0, le=3)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)
    include_init_images: bool = False


class A1111Image(BaseModel):
    """POST /sdapi/v1/txt2img and img2img answer: base64 PNGs, the request as received, and `info` as a JSON
    string (A1111's own shape)."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


def _problem(field: str, kind: str, message: str, value: Any = None) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=value)


def check_fields(extra: Mapping[str, Any], endpoint: str) -> dict[str, str]:
    """The notes for ignored fields that asked for something (field -> why not done); raises ValidationError naming
    every unknown field and every refused field that asks for what we cannot do."""
    problems, notes = [], {}
    for name, value in extra.items():
        rule = FIELDS.get(name)
        if rule is None or endpoint not in rule.endpoints:
            problems.append(_problem(name, "unknown_field", f"{name} is not an AUTOMATIC1111 {endpoint} field that "
                                     "ldm-serve knows (docs/a1111.md lists them)"))
        elif rule.kind == "refused" and not rule.neutral(value):
            problems.append(_problem(name, "unsupported", f"{name}: not supported by ldm-serve: {rule.note}", value))
        elif rule.kind == "ignored" and not rule.neutral(value):
            notes[name] = rule.note
    if problems:
        raise ValidationError.from_exception_data(endpoint, problems)
    return notes


def sampler(body: A1111Body) -> tuple[Sampler | None, bool]:
    """Our sampler and Karras flag for the A1111 sampler name (or alias, or our own name) and scheduler; no name:
    None, the model's default (its workers register it; with the Karras scheduler, dpmpp_2m)."""
    name = body.sampler_name or body.sampler_index
    ours: tuple[Sampler | None, bool] = (None, False)
    if name:
        found = next((v for k, v in SAMPLERS.items() if name.lower() in (k.lower(), *SAMPLER_ALIASES[k], v[0])), None)
        if found is None:
            raise ValidationError.from_exception_data("sampler", [_problem(
                "sampler_name", "unknown_sampler", f"sampler {name!r} is not served; ldm-serve has "
                f"{', '.join(SAMPLERS)} (GET /sdapi/v1/samplers)", name)])
        ours = found
    scheduler = (body.scheduler or "automatic").lower()
    if scheduler not in SCHEDULERS:
        raise ValidationError.from_exception_data("scheduler", [_problem(
            "scheduler", "unknown_scheduler", f"scheduler {body.scheduler!r} is not supported; ldm-serve has "
            f"{', '.join(SCHEDULERS.values())} (Karras: DPM++ 2M only)", body.scheduler)])
    return ours[0], ours[1] or scheduler == "karras"


def request_fields(body: A1111Body, model: str | None, preview_every: int = 0) -> dict[str, Any]:
    """The GenerationRequest fields every A1111 generation maps to (the image routes add theirs);
    `preview_every`: the server's default for a body that does not say (settings.a1111_preview_every)."""
    name, karras = sampler(body)
    return {"model": model, "prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "seed": None if body.seed == -1 else body.seed, "steps": body.steps, "sampler": name, "karras": karras,
            "guidance_scale": body.cfg_scale, "width": body.width, "height": body.height,
            "n": body.batch_size * body.n_iter, "eta": (body.eta or 0.0) if name == "ddim" else 0.0,
            "preview_every": preview_every if body.preview_every is None else body.preview_every,
            "priority": body.priority, **refiner_fields(body)}


def refiner_fields(body: A1111Body) -> dict[str, Any]:
    """`refiner` and `refiner_switch` from refiner_checkpoint and refiner_switch_at; none without a checkpoint (A1111
    then ignores the switch too)."""
    if body.refiner_checkpoint is None or body.refiner_checkpoint in NO_REFINER:
        return {}
    return {"refiner": checkpoint_name(body.refiner_checkpoint), "refiner_switch": body.refiner_switch_at}


HR_UPSCALERS = ("Latent", "Lanczos", "Nearest", "None")


def _invalid(field: str, kind: str, message: str, value: Any = None) -> ValidationError:
    return ValidationError.from_exception_data(field, [_problem(field, kind, message, value)])


def hires_size(body: Txt2ImgBody, first: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The hires fix's final size from the first pass's: hr_resize_x/y, else x hr_scale; down to `multiple`."""
    (w, h), x, y = first, body.hr_resize_x, body.hr_resize_y
    if x and y:
        size = (x, y)
    elif x or y:
        size = (x, round(h * x / w)) if x else (round(w * y / h), y)
    else:
        size = (int(w * body.hr_scale), int(h * body.hr_scale))
    final = (size[0] // multiple * multiple, size[1] // multiple * multiple)
    if min(final) < 1:
        raise _invalid("hr_scale", "too_small", f"the hires size {size[0]}x{size[1]} is below one {multiple}-pixel "
                       "step", body.hr_scale)
    return final


def hires_upscaler(body: Txt2ImgBody) -> tuple[Literal["lanczos", "nearest"], dict[str, str]]:
    """How the first pass's images are resized, and a note where that is not what was asked."""
    name = body.hr_upscaler or "Latent"
    if name.startswith("Latent"):
        return "lanczos", {"hr_upscaler": f"{name}: resized on pixels with Lanczos (there is no latent upscaling)"}
    if name not in HR_UPSCALERS:
        raise _invalid("hr_upscaler", "unknown_upscaler", f"upscaler {name!r} is not served; ldm-serve has "
                       f"{', '.join(HR_UPSCALERS)}", name)
    return ("nearest" if name == "Nearest" else "lanczos"), {}


def second_pass(body: Txt2ImgBody, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The hires fix's img2img request fields (image, size and seed are added per image)."""
    hr = body.model_copy(update={"sampler_name": body.hr_sampler_name or body.sampler_name,
                                 "sampler_index": None if body.hr_sampler_name else body.sampler_index,
                                 "scheduler": body.hr_scheduler or body.scheduler})
    name, karras = sampler(hr)
    return {**fields, "task": Task.img2img, "n": 1, "sampler": name, "karras": karras, "refiner": None,
            "refiner_switch": None,
            "steps": body.hr_second_pass_steps or body.steps, "prompt": body.hr_prompt or body.prompt,
            "negative_prompt": body.hr_negative_prompt or body.negative_prompt,
            "eta": (body.eta or 0.0) if name == "ddim" else 0.0,
            "strength": 0.7 if body.denoising_strength is None else body.denoising_strength}


def inpaint_strength(body: Img2ImgBody) -> tuple[float, dict[str, str]]:
    """The strength of an inpainting job from inpainting_fill, and a note where the fill is done another way."""
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    if body.inpainting_fill == 2:
        return 1.0, {}
    if body.inpainting_fill in (0, 3):
        fill = "fill" if body.inpainting_fill == 0 else "latent nothing"
        return strength, {"inpainting_fill": f"{body.inpainting_fill} ({fill}) is done as 1 (original): the masked "
                          "area starts from the image noised to denoising_strength"}
    return strength, {}


def a1111_sampler_name(request: GenerationRequest) -> str:
    """The A1111 name of a request's sampler."""
    return next(k for k, v in SAMPLERS.items() if v == (request.effective_sampler, request.karras))


def info(job: Job, notes: Mapping[str, str], **override: Any) -> str:
    """A1111's `info` (a JSON string) for a succeeded job, plus `ldm_ignored` and `ldm_job_id`; `override`: keys
    to set (the hires fix's final size)."""
    r = job.request
    seeds = r.seeds() if r.seed is not None else []
    text = infotext(r)
    return json.dumps({
        "prompt": r.prompt, "all_prompts": [r.prompt] * r.n, "negative_prompt": r.negative_prompt,
        "all_negative_prompts": [r.negative_prompt] * r.n, "seed": r.seed, "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * r.n, "subseed_strength": 0, "width": r.width, "height": r.height,
        "sampler_name": a1111_sampler_name(r), "cfg_scale": r.guidance_scale, "steps": r.steps,
        "batch_size": r.n, "restore_faces": False, "sd_model_name": job.model, "sd_model_hash": None,
        "denoising_strength": r.strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [text.replace(f"Seed: {r.seed}", f"Seed: {s}") for s in seeds], "styles": [],
        "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": r.task == Task.inpaint, "version": "ldm-serve",
        "ldm_job_id": job.id, "ldm_ignored": dict(notes), **override})


def infotext(r: GenerationRequest | Mapping[str, str]) -> str:
    """A1111's "parameters" text: prompt, negative prompt, then "Key: value" pairs (of a request or of our PNG
    text chunks)."""
    get = (lambda k: r.get(k)) if isinstance(r, Mapping) else (lambda k: getattr(r, k, None))
    if isinstance(r, Mapping):
        karras = str(r.get("karras", "")).lower() == "true"
        name = next((k for k, v in SAMPLERS.items() if v == (r.get("sampler"), karras)), r.get("sampler"))
    else:
        name = a1111_sampler_name(r)
    pairs = [("Steps", get("steps")), ("Sampler", name), ("CFG scale", get("guidance_scale")), ("Seed", get("seed")),
             ("Size", f"{get('width')}x{get('height')}" if get("width") else None), ("Model", get("model")),
             ("Denoising strength", get("strength")), ("Refiner", get("refiner")),
             ("Refiner switch at", get("refiner_switch"))]
    lines = [str(get("prompt") or "")]
    if get("negative_prompt"):
        lines.append(f"Negative prompt: {get('negative_prompt')}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v not in (None, "")))
    return "\n".join(lines)
