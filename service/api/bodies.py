"""Request and response shapes of the REST API (the OpenAPI schema at /docs is built from these).

Native API: a job is a `GenerationRequest` as JSON, with the input image, mask and label map as base64 strings
(`JobBody`); one JSON shape for every task keeps clients, docs and idempotency fingerprints simple, and the
33% base64 overhead is small beside generation time. The OpenAI-compatible API takes its own shapes: JSON for
generations, multipart for edits.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from service.queue import Job
from service.queue.records import JobInfo
from service.schemas import MAX_SEED, MICRO_FIELDS, GenerationRequest, LabelSet, LoraRef, Priority, Sampler, Task


def _from_base64(value: Any) -> Any:
    """JSON strings are base64 (a data: URL prefix and line breaks allowed); bytes pass as they are."""
    if not isinstance(value, str):
        return value
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PydanticCustomError("base64_invalid", "not valid base64: {reason}", {"reason": str(exc)}) from exc


def _base64_field(what: str) -> Any:
    return Field(default=None, exclude=True, repr=False, description=f"{what}, base64 (PNG, JPEG or WebP)")


Base64Image = Annotated[
    bytes | None, BeforeValidator(_from_base64),
    WithJsonSchema({"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}]}),
]


def _deadline_field() -> Any:
    return Field(default=None, gt=0, allow_inf_nan=False,
                 description="the most seconds the job may wait in the queue: a job not started by then fails "
                 "('deadline exceeded') instead of running late. At most, and by default, the server's "
                 "job_deadline_s. Not part of the idempotency fingerprint.")


class JobBody(GenerationRequest):
    """POST /v1/jobs: a generation request; `image`, `mask` (white = repaint) and `label_map` are base64 strings.
    For image tasks and semantic leave `width` and `height` out: they are the image's (the map's) size."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "a red circle on the left", "steps": 20, "seed": 7, "width": 64, "height": 64},
        {"task": "class", "class_label": "red circle", "steps": 20, "seed": 7},
        {"task": "layout", "layout": [{"label": "red circle", "box": [0.1, 0.2, 0.4, 0.5]},
                                      {"label": "blue square", "box": [0.55, 0.5, 0.9, 0.85]}]},
        {"task": "semantic", "label_map": "<base64 PNG, mode L or P: pixel value = label, 0 = background>"},
        {"task": "unconditional", "n": 4}]})

    image: Base64Image = _base64_field("input image (img2img, inpaint, upscale)")
    mask: Base64Image = _base64_field("inpainting mask, the image's size; white = repaint")
    label_map: Base64Image = Field(default=None, exclude=True, repr=False, description=(
        "task semantic: the label map, base64 PNG of mode L or P (pixel value or palette index = label: 0 = "
        "background, k = class k - 1); its size is the image's"))
    deadline_s: float | None = _deadline_field()
    webhook_url: str | None = Field(default=None, max_length=2048, description=(
        "POST the job's terminal event here, signed (Standard Webhooks), retried until a 2xx; the host must be in the "
        "server's LDM_WEBHOOK_ALLOWED_HOSTS (service/webhooks.py)"))

    def to_request(self, **update: Any) -> GenerationRequest:
        """The plain request the queue takes, with `update` (decoded images, sizes) applied."""
        fields = {name: getattr(self, name) for name in GenerationRequest.model_fields}
        return GenerationRequest.model_validate({**fields, **update})


class OneTaskBody(JobBody):
    """A body of an endpoint that runs one task: its subclass fixes `task` (a Literal with that default), and a
    body naming another task is refused, pointing to POST /v1/jobs."""

    @field_validator("task", mode="before")
    @classmethod
    def _only(cls, value: Any) -> Any:
        task: Task = cls.model_fields["task"].default
        if value != task.value:
            raise PydanticCustomError("task_fixed", "this endpoint runs {task} only; submit {value} jobs to POST "
                                      "/v1/jobs", {"task": task.value, "value": str(value)[:32]})
        return value


class Txt2ImgBody(OneTaskBody):
    """POST /v1/txt2img: a txt2img job (task may be left out)."""

    task: Literal[Task.txt2img] = Task.txt2img


class InpaintBody(OneTaskBody):
    """POST /v1/inpaint: an inpainting job: base64 `image` and `mask` (white = repaint) of one size."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "a blue square", "image": "<base64 PNG>", "mask": "<base64 PNG>", "steps": 20, "seed": 7}]})

    task: Literal[Task.inpaint] = Task.inpaint


class Class2ImgBody(OneTaskBody):
    """POST /v1/class2img: a class-conditional job: `class_label`, a class name ('red circle') or id."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"class_label": "red circle", "steps": 20, "seed": 7}]})

    task: Literal[Task.class_] = Task.class_


class Layout2ImgBody(OneTaskBody):
    """POST /v1/layout2img: a layout-to-image job: `layout`, boxes with labels, coordinates in [0, 1]."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"layout": [{"label": "red circle", "box": [0.1, 0.2, 0.4, 0.5]}], "steps": 20, "seed": 7}]})

    task: Literal[Task.layout] = Task.layout


class Semantic2ImgBody(OneTaskBody):
    """POST /v1/semantic2img: a semantic-synthesis job: `label_map`, a base64 PNG of labels (mode L or P)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"label_map": "<base64 PNG>", "steps": 20, "seed": 7}]})

    task: Literal[Task.semantic] = Task.semantic


class UnconditionalBody(OneTaskBody):
    """POST /v1/unconditional: samples of the model's own distribution (no condition, no guidance)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"steps": 20, "seed": 7}]})

    task: Literal[Task.unconditional] = Task.unconditional


class JobLinks(BaseModel):
    self: str
    events: str = Field(description="server-sent progress events")
    images: list[str] = Field(description="the result PNGs, once the job has succeeded")


class JobView(JobInfo):
    """A job as the API answers it: what a client may see of its record (no owner, no worker host) plus links."""

    links: JobLinks

    @classmethod
    def of(cls, job: Job) -> JobView:
        base = f"/v1/jobs/{job.id}"
        links = JobLinks(self=base, events=f"{base}/events", images=[f"{base}/images/{i}" for i in range(job.results)])
        return cls(**{name: getattr(job, name) for name in JobInfo.model_fields}, links=links)


# ------------------------------------------------------------------------------------ OpenAI-compatible shapes

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None or 'auto' -> (None, None): the model's default size."""
    if size is None or size == "auto":
        return None, None
    match = SIZE.match(size)
    if not match:
        raise PydanticCustomError("size_invalid", "size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size}",
                                  {"size": size[:32]})
    return int(match[1]), int(match[2])


class OpenAIImageParams(BaseModel):
    """Our parameters beyond OpenAI's, accepted on both endpoints (the openai client sends them via extra_body)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to draw")
    model: str | None = Field(default=None, description="one of GET /v1/models; default: the service's default")
    n: int = Field(default=1, ge=1, description="images to generate")
    size: str | None = Field(default=None, description="'WIDTHxHEIGHT' or 'auto' (the model's default size)")
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="b64_json: the PNG inline; url: a link to GET /v1/jobs/{id}/images/{i}")
    output_format: Literal["png"] = Field(default="png", description="only png")
    user: str | None = Field(default=None, description="accepted and ignored")
    quality: str | None = Field(default=None, description="accepted and ignored")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="None = random; image i gets seed + i")
    steps: int = Field(default=20, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                         description="None = the model's default for the task (7.5 for prompts)")
    sampler: Sampler | None = Field(default=None, description="None = the model's default (GET /v1/models: "
                                    "default_sampler; else dpmpp_2m)")
    negative_prompt: str = ""
    deadline_s: float | None = _deadline_field()
    webhook_url: str | None = Field(default=None, max_length=2048, description=(
        "ldm-serve's extension: POST the job's terminal event here, signed (Standard Webhooks), retried until a 2xx; "
        "the host must be in the server's LDM_WEBHOOK_ALLOWED_HOSTS (docs/webhooks.md)"))
    priority: Priority = Field(default="normal", description="high, normal or low (see POST /v1/jobs); above the API "
                               "key's max_priority: 403")
    original_size: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None, description="ldm-serve's extension, SDXL micro-conditioning: [height, width] the image is to "
        "look taken at (see POST /v1/jobs); other models: 422 naming it")
    crops_coords_top_left: tuple[NonNegativeInt, NonNegativeInt] | None = Field(
        default=None, description="ldm-serve's extension, SDXL micro-conditioning: [top, left] of the crop")
    target_size: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None, description="ldm-serve's extension, SDXL micro-conditioning: [height, width] it is made for")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        parse_size(value)
        return value

    def request(self, task: Task, **fields: Any) -> GenerationRequest:
        """The GenerationRequest these parameters ask for."""
        width, height = parse_size(self.size)
        values: dict[str, Any] = {
            "model": self.model, "task": task, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "seed": self.seed, "steps": self.steps, "sampler": self.sampler, "guidance_scale": self.guidance_scale,
            "n": self.n, "width": width, "height": height, "priority": self.priority,
            **{name: getattr(self, name) for name in MICRO_FIELDS}}
        return GenerationRequest(**{**values, **fields})


class OpenAIGenerationBody(OpenAIImageParams):
    """POST /v1/images/generations (JSON)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "a red circle on the left", "size": "64x64", "n": 1, "response_format": "b64_json", "seed": 7}]})

    style: str | None = Field(default=None, description="accepted and ignored")
    loras: tuple[LoraRef, ...] = Field(
        default=(), description='LoRA adapters by name in the LoRA folder: [{"name": "style", "weight": 0.8}]')
    refiner: str | None = Field(default=None, description="ldm-serve's extension: the SDXL refiner that finishes "
                                "the images, by the name the model's workers hold it under (GET /v1/models "
                                "`refiners`; see POST /v1/jobs)")
    refiner_switch: float | None = Field(default=None, description="with `refiner`: the fraction of the steps the "
                                         "base does, strictly between 0 and 1; default 0.8")

    def request(self, task: Task, **fields: Any) -> GenerationRequest:
        """The GenerationRequest these parameters ask for, with the adapters and the refiner."""
        return super().request(task, **{"loras": self.loras, "refiner": self.refiner,
                                        "refiner_switch": self.refiner_switch, **fields})


class OpenAIEditForm(OpenAIImageParams):
    """POST /v1/images/edits (multipart/form-data)."""

    image: UploadFile = Field(description="the image to edit: PNG, JPEG or WebP")
    mask: UploadFile | None = Field(default=None, description="PNG with an alpha channel, the image's size: "
                                    "transparent pixels mark the area to edit (default: the image's own transparency)")

    strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                   description="how much to change the masked area; default 1")


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int = Field(description="Unix time")
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str | None = Field(default=None, description="'WIDTHxHEIGHT' of the images")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ldm-serve"
    workers: int = Field(description="live workers serving it")
    tasks: list[Task] = Field(default_factory=list, description="what its live workers can do (empty: not said, or "
                              "no live worker)")
    labels: LabelSet | None = Field(default=None, description="the class labels it takes (class, layout and semantic "
                                    "models)")
    default_guidance: dict[Task, float] = Field(default_factory=dict, description="the guidance_scale each task gets "
                                                "when a request gives none (empty: not said)")
    default_sampler: Sampler | None = Field(default=None, description="the sampler a request gets when it names "
                                            "none (null: not said, dpmpp_2m)")
    sampler_guidance: dict[Sampler, dict[Task, float]] = Field(
        default_factory=dict, description="a sampler's own default guidance_scale per task, where it differs "
        "(shapes-class: PLMS at 2); replaces default_guidance for requests with that sampler")
    missing_null: str | None = Field(default=None, description="the null condition it lacks ('null class'): it "
                                     "takes guidance_scale 1 only")
    options: list[str] | None = Field(default=None, description="the request fields only some models take that it "
                                      "takes (original_size, crops_coords_top_left, target_size: SDXL; noise_level: "
                                      "the SD x4 upscaler); null: not said")
    refiners: list[str] = Field(default_factory=list, description="the SDXL refiners its workers hold, by the name a "
                                "request's `refiner` gives")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
