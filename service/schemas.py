"""The job schema shared by the REST and gRPC front ends, the queue and the worker.

Two levels of checking:
- static, by pydantic when a `GenerationRequest` is built: types, choices, signs, ranges that never change;
- admission, by `admit(request, settings)` (which `JobQueue.submit` calls): the configured limits (sizes,
  steps, n, guidance, prompt and image bytes) and the rules between fields (an inpaint job needs an image
  and a mask, karras needs dpmpp_2m, ...). It raises one `pydantic.ValidationError` listing every problem
  with its field, the same shape FastAPI gives for a bad body, so the front ends answer 422 /
  INVALID_ARGUMENT with it as is. It also resolves the defaults that must be recorded: the model name and
  a random seed.

Input images travel as encoded bytes on the request (`image`, `mask`), are stored by the queue in their
own Redis keys with the job's TTL, and are never written into the job record or the stream: the fields
are excluded from every dump.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.config import Settings

Sampler = Literal["ddpm", "ddim", "plms", "dpmpp_2m", "euler_a"]  # the names of models.samplers.SamplerName
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # model names are part of Redis key names
MAX_SEED = 2**63 - 1  # fits protobuf int64
RANDOM_SEED_BOUND = 2**32  # random seeds are drawn below this, so they are easy to read back and retype


class Task(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    upscale = "upscale"


class JobStatus(StrEnum):
    """queued -> running -> succeeded | failed | cancelled (a reclaimed job goes back to queued)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


#: tasks that take an input image; inpainting also takes a mask
IMAGE_TASKS = frozenset({Task.img2img, Task.inpaint, Task.upscale})
#: default strength of the tasks that use one (the library's: SDEdit 0.75, inpainting by blending 1.0)
DEFAULT_STRENGTH = {Task.img2img: 0.75, Task.inpaint: 1.0}


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
    sampler: Sampler = "dpmpp_2m"
    karras: bool = Field(default=False, description="Karras sigmas (dpmpp_2m only)")
    guidance_scale: float = Field(default=7.5, ge=0, allow_inf_nan=False,
                                  description="classifier-free guidance; 1 = off")
    width: int | None = Field(default=None, ge=1, description="pixels; None = the model's default size")
    height: int | None = Field(default=None, ge=1, description="pixels; None = the model's default size")
    n: int = Field(default=1, ge=1, description="images for this prompt")
    strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                   description="img2img/inpaint: how much to change; None = the task's default")
    eta: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False, description="DDIM eta (ddim only)")
    image: bytes | None = Field(default=None, exclude=True, repr=False,
                                description="encoded input image (image tasks)")
    mask: bytes | None = Field(default=None, exclude=True, repr=False,
                               description="encoded inpainting mask, same size as the image; white = repaint")

    @property
    def effective_strength(self) -> float | None:
        """The strength the pipeline will use: the request's, or the task's default; None where unused."""
        if self.task not in DEFAULT_STRENGTH:
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH[self.task]

    def batch_key(self) -> BatchKey:
        """What must be equal for jobs to share a batch (model, task, size, sampler, steps, karras, eta,
        strength). Only meaningful after admission, when `model` is resolved."""
        if self.model is None:
            raise ValueError("batch_key() needs the model resolved: admit() the request first")
        return BatchKey(self.model, self.task, self.width, self.height, self.sampler, self.steps, self.karras,
                        self.eta, self.effective_strength)

    def fingerprint(self) -> str:
        """A digest of everything the client asked for (images included), to tell a true resubmission
        under an idempotency key from a different request reusing the key."""
        digest = hashlib.sha256(self.model_dump_json().encode())
        for blob in (self.image, self.mask):
            digest.update(b"\0" if blob is None else hashlib.sha256(blob).digest())
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
    if r.guidance_scale > s.max_guidance_scale:
        errors.append(("guidance_scale", f"guidance_scale must be between 0 and {s.max_guidance_scale}, "
                       f"got {r.guidance_scale}", r.guidance_scale))
    for name, text in (("prompt", r.prompt), ("negative_prompt", r.negative_prompt)):
        size = len(text.encode())
        if size > s.max_prompt_bytes:
            errors.append((name, f"{name} is {size} bytes long; the limit is {s.max_prompt_bytes} bytes (UTF-8)",
                           text[:32]))
    for name, blob in (("image", r.image), ("mask", r.mask)):
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
    if r.karras and r.sampler != "dpmpp_2m":
        errors.append(("karras", f"karras sigmas are supported by dpmpp_2m only, not {r.sampler}", r.karras))
    if r.eta != 0 and r.sampler != "ddim":
        errors.append(("eta", f"eta applies to ddim only, not {r.sampler}", r.eta))
    return errors


def admit(request: GenerationRequest, settings: Settings) -> GenerationRequest:
    """Check `request` against the configured limits and the rules between fields; resolve the model
    (default) and the seed (random). Raises `pydantic.ValidationError` naming every problem."""
    problems = _limit_errors(request, settings) + _rule_errors(request)
    if problems:
        details = [InitErrorDetails(type=PydanticCustomError("request_invalid", message), loc=(field,), input=value)
                   for field, message, value in problems]
        raise ValidationError.from_exception_data("GenerationRequest", details)
    update: dict[str, Any] = {}
    if request.model is None:
        update["model"] = settings.default_model
    if request.seed is None:
        update["seed"] = secrets.randbelow(RANDOM_SEED_BOUND)
    return request.model_copy(update=update) if update else request


class Job(BaseModel):
    """A job's record as stored in `ldm:job:<id>` and answered by GET /v1/jobs/{id} (images excluded)."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    status: JobStatus
    request: GenerationRequest
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = Field(default=0, description="sampler steps done in the current attempt")
    total: int = Field(default=0, description="sampler steps of the job (0 before it starts)")
    attempts: int = Field(default=0, description="deliveries to a worker so far")
    error: str | None = None
    results: int = Field(default=0, description="result images stored (n once succeeded)")
    cancel_requested: bool = False
    worker: str | None = Field(default=None, description="the worker holding the job, if any")
    deadline_s: float | None = Field(
        default=None, description="seconds after submission by which the job must start, else it fails (deadline "
        "exceeded) without running")


EventType = Literal["queued", "started", "progress", "requeued", "cancel_requested", "succeeded", "failed",
                    "cancelled"]
TERMINAL_EVENTS: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class JobEvent(BaseModel):
    """One entry of `ldm:events:<id>`; `id` is the stream entry id, usable as SSE `Last-Event-ID`."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    status: JobStatus
    step: int = 0
    total: int = 0
    results: int = 0
    error: str | None = None
    at: float = Field(description="Unix time of the event")

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


class WorkerInfo(BaseModel):
    """What a worker says about itself in its heartbeat."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9._:@-]{1,128}$")
    models: list[str]
    tasks: list[Task] = Field(default_factory=list,
                              description="tasks its model can do (empty = not said: assume any)")
    host: str = ""
    pid: int = 0
    device: str = ""
    started_at: float = 0.0
    busy: bool = False
    last_seen: float = 0.0


class QueueStats(BaseModel):
    """One model's queue, for metrics and Retry-After."""

    model: str
    depth: int = Field(description="accepted, unfinished jobs (waiting + claimed)")
    pending: int = Field(description="jobs claimed by a worker and not yet acknowledged")
    waiting: int = Field(description="jobs no worker has claimed yet")
    oldest_waiting_age_s: float = Field(description="age of the oldest job no worker has claimed; 0 if none")
