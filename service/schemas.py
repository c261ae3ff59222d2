"""The request schema shared by the REST and gRPC front ends, the queue and the worker (the queue's own records,
`Job`, `JobStatus`, `JobEvent`, `WorkerInfo`, are in service/queue/records.py).

Two levels of checking:
- static, by pydantic when a `GenerationRequest` is built: types, choices, signs, ranges that never change;
- admission, by `admit(request, settings)` (which `JobQueue.submit` calls): the configured limits (sizes,
  steps, n, guidance, prompt and image bytes) and the rules between fields (an inpaint job needs an image
  and a mask, karras needs dpmpp_2m, ...). It raises one `pydantic.ValidationError` listing every problem
  with its field, the same shape FastAPI gives for a bad body, so the front ends answer 422 /
  INVALID_ARGUMENT with it as is. It also resolves the defaults that must be recorded: the model name and
  a random seed.

Input images travel as encoded bytes on the request (`image`, `mask`, and a semantic job's `label_map`), are
stored by the queue in their own Redis keys with the job's TTL, and are never written into the job record or the
stream: the fields are excluded from every dump.

The paper's other conditionings are tasks too: `class` (a `class_label`), `layout` (boxes with labels), `semantic`
(a label-map PNG) and `unconditional`. Their conditions are checked in three places, each as far as it can see:
statically here (shapes, coordinates inside the image, box counts under a hard cap), at the front end against the
label set the model's workers register (`LabelSet`, `label_errors`: names, ids, the model's box limit, the label
map's values), and by the worker against the model itself (models/conditioning.py), which fails the job as
`invalid_input` if anything got past the first two.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.config import Settings
from service.loras import LORA_NAME_PATTERN, LoraNameError, lora_path, split_lora_tags

Sampler = Literal["ddpm", "ddim", "plms", "dpmpp_2m", "euler_a"]  # a torch-free copy of models.names.SamplerName
#: the sampler a job gets when it names none and its model's workers register no default of their own (and when it
#: asks for Karras sigmas): a copy of models.names.DEFAULT_SAMPLER
DEFAULT_SAMPLER: Sampler = "dpmpp_2m"
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")  # highest first: the order workers take them in
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # model names are part of Redis key names
MAX_SEED = 2**63 - 1  # fits protobuf int64
RANDOM_SEED_BOUND = 2**32  # random seeds are drawn below this, so they are easy to read back and retype


class Task(StrEnum):
    """What a job makes: a torch-free copy of models.names.Task (tests/unit/test_architecture.py keeps them equal).
    `class` is a Python keyword, so that member is `Task.class_` (its value is "class")."""

    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    upscale = "upscale"
    class_ = "class"
    unconditional = "unconditional"
    semantic = "semantic"
    layout = "layout"


#: tasks that take an input image; inpainting also takes a mask
IMAGE_TASKS = frozenset({Task.img2img, Task.inpaint, Task.upscale})
#: default strength of the tasks that use one (the library's: SDEdit 0.75, inpainting by blending 1.0)
DEFAULT_STRENGTH = {Task.img2img: 0.75, Task.inpaint: 1.0}
#: tasks conditioned on something other than a prompt, and what (they take no prompt)
CONDITION_TASKS: dict[Task, str] = {Task.class_: "its class_label", Task.layout: "its layout",
                                    Task.semantic: "its label_map", Task.unconditional: "nothing"}
#: the guidance_scale a job gets when it gives none: a copy of models.names.DEFAULT_GUIDANCE (which says where the
#: figures come from; a test keeps the two tables equal). The front ends cannot import the model library (torch),
#: hence the copy.
DEFAULT_GUIDANCE: dict[Task, float] = {Task.txt2img: 7.5, Task.img2img: 7.5, Task.inpaint: 7.5, Task.upscale: 7.5,
                                       Task.class_: 5.0, Task.layout: 3.0, Task.semantic: 2.0,
                                       Task.unconditional: 1.0}
#: most boxes a layout may hold whatever the model (each layout model has its own, smaller limit: `LabelSet`)
MAX_LAYOUT_BOXES = 64
MAX_CLASS_NAME_CHARS = 64


def _class_label(value: Any) -> Any:
    """A class label is an id (an int >= 0; not a bool) or a name of 1..64 characters (a decimal string is an id)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError("class_label_type", "a class label is a class name (such as 'red circle') or a "
                                  "class id (an integer >= 0), got {value}", {"value": repr(value)[:40]})
    if isinstance(value, int) and value < 0:
        raise PydanticCustomError("class_label_range", "a class id is an integer >= 0, got {value}", {"value": value})
    if isinstance(value, str) and not 0 < len(value.strip()) <= MAX_CLASS_NAME_CHARS:
        raise PydanticCustomError("class_label_length", "a class name has 1 to {limit} characters",
                                  {"limit": MAX_CLASS_NAME_CHARS})
    return value


ClassLabel = Annotated[int | str, BeforeValidator(_class_label)]


def _four_numbers(value: Any) -> Any:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise PydanticCustomError("box_shape", "box must be 4 numbers [x0, y0, x1, y1] in [0, 1], got {value}",
                                  {"value": repr(value)[:60]})
    return value


class LayoutBox(BaseModel):
    """One object of a layout: its class and its bounding box as fractions of the image's width and height
    (x to the right, y down)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: ClassLabel = Field(description="the object's class: a name ('red circle') or an id")
    box: Annotated[tuple[float, float, float, float], BeforeValidator(_four_numbers)] = Field(
        description="[x0, y0, x1, y1]: left, top, right, bottom, each in [0, 1], with x0 < x1 and y0 < y1")

    @field_validator("box")
    @classmethod
    def _inside(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        shown = {"box": [round(v, 6) if math.isfinite(v) else v for v in box]}
        if not all(math.isfinite(v) for v in box):
            raise PydanticCustomError("box_invalid", "box coordinates must be finite numbers, got {box}", shown)
        if not all(0.0 <= v <= 1.0 for v in box):
            raise PydanticCustomError("box_outside", "box {box} is not inside the image: coordinates are fractions "
                                      "of its width and height, in [0, 1]", shown)
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise PydanticCustomError("box_inverted", "box {box} is empty or inverted: need x0 < x1 and y0 < y1",
                                      shown)
        return box


class LoraRef(BaseModel):
    """One LoRA adapter a request asks for: a name in the server's LoRA folder (LDM_LORA_DIR; never a path) and its
    weight (the multiplier of its low-rank term; 1 = as trained, negative weights invert it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=LORA_NAME_PATTERN, description="the adapter's file stem in the server's LoRA folder")
    weight: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False, description="its multiplier; 1 = as trained")


class BatchKey(NamedTuple):
    """Jobs with equal keys can run as one batch: they share everything but prompts, seeds and guidance."""

    model: str
    task: Task
    width: int | None
    height: int | None
    sampler: Sampler
    steps: int
    karras: bool
    eta: float
    strength: float | None
    #: the SDXL refiner that finishes the batch and where it takes over (RunSettings.refiner_switch); None = none
    refiner: str | None = None
    refiner_switch: float | None = None
    #: the SD x4 upscaler's noise level of the low-resolution input (RunSettings.noise_level); None = the model's
    noise_level: int | None = None


#: SDXL's per-sample micro-conditioning fields of a request (models.pipeline.SampleSpec has the same names)
MICRO_FIELDS = ("original_size", "crops_coords_top_left", "target_size")
#: request fields only some models take; a worker registers those its model takes (`WorkerInfo.options`)
MODEL_OPTIONS = (*MICRO_FIELDS, "noise_level")
#: the fields added after the first release: left out of a request's fingerprint while unset, so the fingerprints
#: of requests without them stay what they were
LATER_FIELDS = (*MODEL_OPTIONS, "refiner", "refiner_switch")
#: where the refiner takes over when a request names one and gives no switch (A1111's and diffusers' examples' 0.8)
DEFAULT_REFINER_SWITCH = 0.8


class GenerationRequest(BaseModel):
    """One generation job as submitted. `seed` None = random and `model` None = the default, both resolved
    at admission so the job records what ran. With `n` > 1 image i gets seed `seed + i`.

    `width`/`height` None = the model's default size (the worker resolves it, as `RunSettings` does). For the
    image tasks they are the input image's size (the front end fills them in from the decoded image); an
    upscale's output is that size times the model's factor.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64")

    model: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN, description="model name; None = the default")
    task: Task = Task.txt2img
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="None = random (recorded in the job)")
    steps: int = Field(default=20, ge=1)
    sampler: Sampler | None = Field(
        default=None, description="None = the model's default, resolved at submission: the one its workers register "
        "(GET /v1/models: default_sampler; the shapes-class, -layout, -semantic and -uncond models: euler_a), else "
        "dpmpp_2m; with karras, dpmpp_2m")
    karras: bool = Field(default=False, description="Karras sigmas (dpmpp_2m only)")
    guidance_scale: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="classifier-free guidance; 1 = off; None = the model's default for the task, resolved at "
        "submission: the task's (txt2img, img2img, inpaint 7.5; class 5; layout 3; semantic 2; unconditional "
        "sampling is unguided: 1), or 1 for a model without a null condition (the CompVis zoo's cin256, "
        "layout2img and semantic-map models), which takes no other scale")
    width: int | None = Field(default=None, ge=1, description="pixels; None = the model's default size")
    height: int | None = Field(default=None, ge=1, description="pixels; None = the model's default size")
    n: int = Field(default=1, ge=1, description="images for this prompt")
    strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                   description="img2img/inpaint: how much to change; None = the task's default")
    eta: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False, description="DDIM eta (ddim only)")
    loras: tuple[LoraRef, ...] = Field(
        default=(), description='LoRA adapters for this job, [{"name": "style", "weight": 0.8}, ...], by name in the '
        "server's LoRA folder (LDM_LORA_DIR); jobs with different adapters still share batches (applied per sample). "
        "With the A1111 prompt syntax, <lora:name:weight> tags in the prompt are moved here at admission")
    preview_every: int = Field(
        default=0, ge=0, le=1000, description="live previews: every this many sampler steps a progress event carries "
        "`preview`, a small PNG of the current denoised estimate (base64 over SSE); 0 = none. Made by every "
        "worker, static or continuous batching; the images are the same with or without previews")
    priority: Priority = Field(
        default="normal", description="high jobs are taken before normal ones, normal before low; a job's effective "
        "priority rises one level per LDM_PRIORITY_AGING_S waited, so low work cannot starve. An API key may be "
        "limited (`max_priority=` in the key file): a request above its limit is refused (403)")
    image: bytes | None = Field(default=None, exclude=True, repr=False,
                                description="encoded input image (image tasks)")
    mask: bytes | None = Field(default=None, exclude=True, repr=False,
                               description="encoded inpainting mask, same size as the image; white = repaint")
    class_label: ClassLabel | None = Field(default=None, description="task class: the class to draw, a name "
                                           "('red circle') or an id")
    layout: tuple[LayoutBox, ...] | None = Field(
        default=None, max_length=MAX_LAYOUT_BOXES,
        description='task layout: the objects to draw, [{"label": "red circle", "box": [x0, y0, x1, y1]}, ...]')
    label_map: bytes | None = Field(
        default=None, exclude=True, repr=False,
        description="task semantic: a single-channel PNG (mode L or P) whose pixel values are labels (0 = background, "
        "k = class k - 1); its size is the image's")

    original_size: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None, description="SDXL micro-conditioning: the (height, width) in pixels the image is to look taken "
        "at; None = the output size. Refused by other models")
    crops_coords_top_left: tuple[NonNegativeInt, NonNegativeInt] | None = Field(
        default=None, description="SDXL micro-conditioning: the (top, left) corner of the crop the image is to look "
        "cut at; None = (0, 0), uncropped. Refused by other models")
    target_size: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None, description="SDXL micro-conditioning: the (height, width) the image is to look made for; None = "
        "the output size. Refused by other models")
    refiner: str | None = Field(
        default=None, pattern=MODEL_NAME_PATTERN,
        description="txt2img with an SDXL base model: the refiner that finishes the image, by the name the model's "
        "workers serve it under (they hold it beside the base: LDM_WORKER_REFINER; GET /v1/models lists it in "
        "`refiners`); None = the base alone")
    refiner_switch: float | None = Field(
        default=None, gt=0, lt=1, allow_inf_nan=False,
        description="with `refiner`: the fraction of the steps the base does before the refiner takes over "
        "(diffusers' denoising_end / denoising_start, A1111's refiner_switch_at); None = 0.8")
    noise_level: int | None = Field(
        default=None, ge=0,
        description="task upscale with the SD x4 upscaler: the noise added to the low-resolution input before it "
        "conditions the UNet (0 to the model's max_noise_level, 350); more invents more detail, follows the input "
        "less; None = the model's default (20). Refused by other tasks and models")

    @property
    def micro_conditioning(self) -> dict[str, tuple[int, int]]:
        """The SDXL micro-conditioning fields the request sets (per sample: jobs with different ones share a batch)."""
        return {name: value for name in MICRO_FIELDS if (value := getattr(self, name)) is not None}

    @property
    def effective_guidance(self) -> float:
        """The guidance scale the pipeline will use: the request's, or the task's default."""
        return self.guidance_scale if self.guidance_scale is not None else DEFAULT_GUIDANCE[self.task]

    @property
    def effective_sampler(self) -> Sampler:
        """The sampler the job runs with: its own, else the default (a job queued without one, past the front ends
        that fill in its model's, gets its model's from the worker: `service.worker.runner`)."""
        if self.sampler is not None:
            return self.sampler
        return DEFAULT_SAMPLER

    @property
    def stored_image(self) -> bytes | None:
        """What the queue stores in the job's image key: the input image, or a semantic job's label map (a job has
        at most one of them; admission sees to it)."""
        return self.image if self.image is not None else self.label_map

    @property
    def effective_strength(self) -> float | None:
        """The strength the pipeline will use: the request's, or the task's default; None where unused."""
        if self.task not in DEFAULT_STRENGTH:
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH[self.task]

    def batch_key(self) -> BatchKey:
        """What must be equal for jobs to share a batch (model, task, size, sampler, steps, karras, eta,
        strength, refiner and its switch, noise level). Only meaningful after admission, when `model` is resolved."""
        if self.model is None:
            raise ValueError("batch_key() needs the model resolved: admit() the request first")
        return BatchKey(self.model, self.task, self.width, self.height, self.effective_sampler, self.steps, self.karras,
                        self.eta, self.effective_strength, self.refiner, self.refiner_switch, self.noise_level)

    def fingerprint(self) -> str:
        """A digest of everything the client asked for (images included), to tell a true resubmission
        under an idempotency key from a different request reusing the key."""
        # unset later fields stay out, so the fingerprints of requests without them stay what they were
        unset = {name for name in LATER_FIELDS if getattr(self, name) is None}
        digest = hashlib.sha256(self.model_dump_json(exclude=unset).encode())
        for blob in (self.image, self.mask):
            digest.update(b"\0" if blob is None else hashlib.sha256(blob).digest())
        if self.label_map is not None:  # only then: the fingerprints of the other tasks stay what they were
            digest.update(b"label_map" + hashlib.sha256(self.label_map).digest())
        return digest.hexdigest()

    def seeds(self) -> list[int]:
        """The seed of each of the `n` images (after admission)."""
        if self.seed is None:
            raise ValueError("seeds() needs the seed resolved: admit() the request first")
        return [self.seed + i for i in range(self.n)]


def _size_errors(r: GenerationRequest, s: Settings) -> list[tuple[str, str, Any]]:
    errors: list[tuple[str, str, Any]] = []
    for name, value, low, high in (("width", r.width, s.min_width, s.max_width),
                                   ("height", r.height, s.min_height, s.max_height)):
        if value is not None and value % s.size_multiple:
            errors.append((name, f"{name} must be a multiple of {s.size_multiple}, got {value}", value))
        elif value is not None and not low <= value <= high:
            errors.append((name, f"{name} must be between {low} and {high} pixels, got {value}", value))
    return errors


def _limit_errors(r: GenerationRequest, s: Settings) -> list[tuple[str, str, Any]]:
    """(field, message, value) for every configured limit the request breaks."""
    errors = _size_errors(r, s)
    if r.steps > s.max_steps:
        errors.append(("steps", f"steps must be between 1 and {s.max_steps}, got {r.steps}", r.steps))
    if r.n > s.max_n:
        errors.append(("n", f"n must be between 1 and {s.max_n}, got {r.n}", r.n))
    if r.guidance_scale is not None and r.guidance_scale > s.max_guidance_scale:
        errors.append(("guidance_scale", f"guidance_scale must be between 0 and {s.max_guidance_scale}, "
                       f"got {r.guidance_scale}", r.guidance_scale))
    for name, text in (("prompt", r.prompt), ("negative_prompt", r.negative_prompt)):
        size = len(text.encode())
        if size > s.max_prompt_bytes:
            errors.append((name, f"{name} is {size} bytes long; the limit is {s.max_prompt_bytes} bytes (UTF-8)",
                           text[:32]))
    for name, blob in (("image", r.image), ("mask", r.mask), ("label_map", r.label_map)):
        if blob is not None and len(blob) > s.max_image_bytes:
            errors.append((name, f"{name} is {len(blob)} bytes; the limit is {s.max_image_bytes} bytes", len(blob)))
    if r.seed is not None and r.seed + r.n - 1 > MAX_SEED:
        errors.append(("seed", f"seed + n - 1 must not exceed {MAX_SEED}", r.seed))
    return errors


def _rule_errors(r: GenerationRequest) -> list[tuple[str, str, Any]]:
    """(field, message, value) for every rule between fields the request breaks."""
    errors: list[tuple[str, str, Any]] = []
    task = r.task.value
    if r.task in IMAGE_TASKS and not r.image:
        errors.append(("image", f"task {task} needs an input image", None))
    if r.task not in IMAGE_TASKS and r.image is not None:
        errors.append(("image", f"task {task} takes no input image", "<bytes>"))
    if r.task == Task.inpaint and not r.mask:
        errors.append(("mask", "task inpaint needs a mask (white = repaint)", None))
    if r.task != Task.inpaint and r.mask is not None:
        errors.append(("mask", f"task {task} takes no mask", "<bytes>"))
    if r.strength is not None and r.task not in DEFAULT_STRENGTH:
        errors.append(("strength", f"strength applies to img2img and inpaint only, not {task}", r.strength))
    if r.karras and r.sampler not in (None, "dpmpp_2m"):  # None: karras picks dpmpp_2m
        errors.append(("karras", f"karras sigmas are supported by dpmpp_2m only, not {r.sampler}", r.karras))
    if r.eta != 0 and r.sampler != "ddim":
        named = "no sampler (name ddim)" if r.sampler is None else r.sampler
        errors.append(("eta", f"eta applies to ddim only, not {named}", r.eta))
    return errors + _model_option_errors(r) + _condition_rule_errors(r)


def _model_option_errors(r: GenerationRequest) -> list[tuple[str, str, Any]]:
    """The refiner finishes txt2img jobs only and its switch needs it; noise_level is the upscale task's."""
    errors: list[tuple[str, str, Any]] = []
    task = r.task.value
    if r.refiner is not None and r.task != Task.txt2img:
        errors.append(("refiner", f"a refiner finishes txt2img jobs only, not {task}", r.refiner))
    if r.refiner_switch is not None and r.refiner is None:
        errors.append(("refiner_switch", "refiner_switch needs a refiner: name it in `refiner`", r.refiner_switch))
    if r.noise_level is not None and r.task != Task.upscale:
        errors.append(("noise_level", f"noise_level applies to task upscale only (the SD x4 upscaler), not {task}",
                       r.noise_level))
    return errors


def _condition_rule_errors(r: GenerationRequest) -> list[tuple[str, str, Any]]:
    """The conditions of the class, layout, semantic and unconditional tasks: present where needed, absent elsewhere;
    no prompts on the tasks that are not conditioned on one."""
    errors: list[tuple[str, str, Any]] = []
    task = r.task.value
    if r.task == Task.class_ and r.class_label is None:
        errors.append(("class_label", "task class needs a class_label: a class name (such as 'red circle') or id",
                       None))
    if r.task != Task.class_ and r.class_label is not None:
        errors.append(("class_label", f"class_label applies to task class only, not {task}", r.class_label))
    if r.task == Task.layout and not r.layout:
        errors.append(("layout", 'task layout needs a layout of at least one box: [{"label": "red circle", "box": '
                       '[x0, y0, x1, y1]}, ...] (for no condition at all, use task unconditional)', None))
    if r.task != Task.layout and r.layout is not None:
        errors.append(("layout", f"layout applies to task layout only, not {task}", None))
    if r.task == Task.semantic and not r.label_map:
        errors.append(("label_map", "task semantic needs a label_map: a PNG whose pixel values are labels "
                       "(0 = background)", None))
    if r.task != Task.semantic and r.label_map is not None:
        errors.append(("label_map", f"label_map applies to task semantic only, not {task}", "<bytes>"))
    if r.task in CONDITION_TASKS:
        for name, text in (("prompt", r.prompt), ("negative_prompt", r.negative_prompt)):
            if text:
                errors.append((name, f"task {task} takes no {name}: it is conditioned on {CONDITION_TASKS[r.task]}",
                               text[:32]))
    if r.task == Task.unconditional and r.guidance_scale not in (None, 1.0):
        errors.append(("guidance_scale", "unconditional sampling is unguided: leave guidance_scale out (or give 1)",
                       r.guidance_scale))
    return errors


def _invalid(problems: list[tuple[str | tuple[str | int, ...], str, Any]]) -> ValidationError:
    """One ValidationError of (field or location, message, value) problems, as FastAPI reports a bad body."""
    details = [InitErrorDetails(type=PydanticCustomError("request_invalid", message),
                                loc=field if isinstance(field, tuple) else (field,), input=value)
               for field, message, value in problems]
    return ValidationError.from_exception_data("GenerationRequest", details)


def _lora_errors(r: GenerationRequest, s: Settings) -> tuple[GenerationRequest, list[tuple[Any, str, Any]]]:
    """The request with A1111 `<lora:...>` prompt tags moved into `loras` (A1111 syntax only), and a problem for
    every adapter name the server's LoRA folder does not hold (service/loras.py)."""
    problems: list[tuple[Any, str, Any]] = []
    if s.prompt_syntax == "a1111" and "<" in r.prompt:
        try:
            prompt, tags = split_lora_tags(r.prompt)
        except ValueError as exc:
            return r, [("prompt", str(exc), r.prompt[:32])]
        if tags:
            try:
                extra = [LoraRef(name=name, weight=weight) for name, weight in tags]
            except ValidationError as exc:
                return r, [("prompt", f"prompt tag: {e['msg']}", e.get("input")) for e in exc.errors()]
            r = r.model_copy(update={"prompt": prompt, "loras": (*r.loras, *extra)})
    if r.loras and r.task in CONDITION_TASKS:
        problems.append(("loras", f"task {r.task.value} takes no LoRA adapters", len(r.loras)))
    if len(r.loras) > s.max_loras:
        problems.append(("loras", f"at most {s.max_loras} LoRA adapters per request, got {len(r.loras)}",
                         len(r.loras)))
    for i, ref in enumerate(r.loras):
        try:
            lora_path(s.lora_dir, ref.name)
        except LoraNameError as exc:
            problems.append((("loras", i, "name"), str(exc), ref.name))
    return r, problems


def admit(request: GenerationRequest, settings: Settings) -> GenerationRequest:
    """Check `request` against the configured limits and the rules between fields; move A1111 `<lora:...>` prompt
    tags into `loras` and check every adapter name; resolve the model (default), the seed (random), the guidance
    scale (the task's default) and a refiner's switch (0.8). Raises `pydantic.ValidationError` naming every problem."""
    request, lora_problems = _lora_errors(request, settings)
    problems: list[tuple[str | tuple[str | int, ...], str, Any]] = [
        *_limit_errors(request, settings), *_rule_errors(request), *lora_problems]
    if problems:
        raise _invalid(problems)
    update: dict[str, Any] = {}
    if request.model is None:
        update["model"] = settings.default_model
    if request.seed is None:
        update["seed"] = secrets.randbelow(RANDOM_SEED_BOUND)
    if request.guidance_scale is None:
        update["guidance_scale"] = DEFAULT_GUIDANCE[request.task]
    if request.refiner is not None and request.refiner_switch is None:
        update["refiner_switch"] = DEFAULT_REFINER_SWITCH
    return request.model_copy(update=update) if update else request


def unguided_message(model: str, missing: str, scale: float) -> str:
    """Why a model without a null condition (`missing`: "null class", models.names.MISSING_NULL) refuses a guidance
    scale other than 1: the API's and the worker's words."""
    return (f"model {model!r} has no {missing}, which classifier-free guidance needs, so it is sampled unguided: "
            f"give guidance_scale 1 (or leave it out), not {scale:g}")


def option_message(name: str, model: str) -> str:
    """Why a model refuses a request field only some models take (`MODEL_OPTIONS`): the API's and the worker's
    words, the library's (models/pipeline.py)."""
    if name == "noise_level":
        return f"noise_level applies to the SD x4 upscaler only; model {model!r} is not an SD x4 upscaler"
    if name == "target_size":  # the refiner has none: it takes an aesthetic score instead
        return f"target_size is SDXL base micro-conditioning; model {model!r} is not an SDXL base model"
    return f"{name} is SDXL micro-conditioning; model {model!r} is not an SDXL model"


def refiner_message(model: str, refiner: str, held: Iterable[str]) -> str:
    """Why a request's `refiner` cannot be used: the refiners the model's workers hold (LDM_WORKER_REFINER)."""
    names = sorted(set(held))
    holds = f"its workers hold {', '.join(repr(n) for n in names)}" if names else \
        "its workers hold none (a worker holds one with LDM_WORKER_REFINER)"
    return f"model {model!r} has no refiner {refiner!r}: {holds}"


def normalise_name(name: str) -> str:
    """Class names match whatever their case and spacing ("Red  Circle" is "red circle"): a torch-free copy of
    models.names.normalise_name (a test keeps them equal)."""
    return " ".join(name.lower().split())


class LabelSet(BaseModel):
    """The labels a class, layout or semantic model takes (its conditioner's), as its workers register them: the
    front ends check class names, ids, box counts and label-map values against it before a job is queued."""

    model_config = ConfigDict(frozen=True)

    n_classes: int = Field(ge=1, description="class ids 0..n_classes-1; label-map values 0 (background)..n_classes")
    class_names: tuple[str, ...] = Field(default=(), description="class id -> name, where the model has names")
    max_boxes: int | None = Field(default=None, ge=1, description="most boxes of a layout (layout models)")

    def resolve(self, label: int | str) -> int:
        """The class id of a name or id (a decimal string is an id); ValueError saying why not."""
        if isinstance(label, str):
            names = [normalise_name(n) for n in self.class_names]
            if normalise_name(label) in names:
                return names.index(normalise_name(label))
            if not label.strip().isdigit():
                known = (f"known: {', '.join(self.class_names)}" if self.class_names
                         else f"this model takes class ids 0..{self.n_classes - 1}")
                raise ValueError(f"unknown class {label!r}; {known}")
        if not 0 <= int(label) < self.n_classes:
            raise ValueError(f"class id {int(label)} is outside 0..{self.n_classes - 1}")
        return int(label)


def label_errors(request: GenerationRequest, labels: LabelSet,
                 map_labels: Iterable[int] = ()) -> list[tuple[str | tuple[str | int, ...], str, Any]]:
    """(location, message, value) for every class label, box count or label-map value (`map_labels`: the values a
    semantic job's map holds) that the model of `labels` does not take."""
    problems: list[tuple[str | tuple[str | int, ...], str, Any]] = []
    if request.class_label is not None:
        try:
            labels.resolve(request.class_label)
        except ValueError as exc:
            problems.append(("class_label", str(exc), request.class_label))
    for i, box in enumerate(request.layout or ()):
        try:
            labels.resolve(box.label)
        except ValueError as exc:
            problems.append((("layout", i, "label"), str(exc), box.label))
    if request.layout is not None and labels.max_boxes is not None and len(request.layout) > labels.max_boxes:
        problems.append(("layout", f"model {request.model!r} takes at most {labels.max_boxes} boxes in a layout, got "
                         f"{len(request.layout)}", len(request.layout)))
    unknown = sorted(v for v in set(map_labels) if not 0 <= v <= labels.n_classes)
    if unknown:
        problems.append(("label_map", f"label map values must be 0 (background) to {labels.n_classes}; found unknown "
                         f"label(s) {unknown[:8]}", None))
    return problems


def check_labels(request: GenerationRequest, labels: LabelSet, map_labels: Iterable[int] = ()) -> None:
    """Raise `pydantic.ValidationError` (as `admit` does) naming every label the model does not take."""
    problems = label_errors(request, labels, map_labels)
    if problems:
        raise _invalid(problems)
