"""Conversions between the ldm.v1 proto messages and the shared schemas; pure functions, no I/O.

Unset proto fields are left to the schema's defaults (`to_request`); a job's parameters go back out with every
default resolved (`to_parameters`). The idempotency key may come as a request field or as `idempotency-key`
metadata (`idempotency_key`).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Any

from service.api.grpc.errors import BadRequest
from service.api.grpc.stubs import pb
from service.queue import IDEMPOTENCY_KEY, Job, JobEvent, JobStatus
from service.schemas import GenerationRequest, Task

IDEMPOTENCY_METADATA = "idempotency-key"
_OPTIONAL_FIELDS = ("seed", "steps", "guidance_scale", "width", "height", "n", "strength", "eta",
                   "preview_every", "refiner_switch", "noise_level")
#: SDXL micro-conditioning: (field, the message's two fields in the schema's order)
_PAIRS = (("original_size", ("height", "width")), ("crops_coords_top_left", ("top", "left")),
          ("target_size", ("height", "width")))


def to_request(params: pb.GenerationParameters, task: Task, *, image: bytes | None = None,
               mask: bytes | None = None, label_map: bytes | None = None,
               size: tuple[int, int] | None = None) -> GenerationRequest:
    """The schema request; unset proto fields are left to the schema's defaults. Raises ValidationError.
    `size` is the input image's (or label map's) (width, height), which the parameters must not contradict."""
    fields: dict[str, Any] = {"prompt": params.prompt, "negative_prompt": params.negative_prompt,
                              "karras": params.karras}
    if params.model:
        fields["model"] = params.model
    if params.sampler:
        fields["sampler"] = params.sampler
    if params.priority:
        fields["priority"] = params.priority
    if params.refiner:
        fields["refiner"] = params.refiner
    fields |= _micro_conditioning(params)
    if params.class_label:
        fields["class_label"] = params.class_label
    if params.layout:
        fields["layout"] = [{"label": b.label, "box": [b.x0, b.y0, b.x1, b.y1]} for b in params.layout]
    if params.loras:
        fields["loras"] = [{"name": lora.name, "weight": lora.weight if lora.HasField("weight") else 1.0}
                           for lora in params.loras]
    fields |= {name: getattr(params, name) for name in _OPTIONAL_FIELDS if params.HasField(name)}
    if size is not None:
        what = "label map" if label_map is not None else "image"
        for name, value in zip(("width", "height"), size, strict=True):
            if fields.setdefault(name, value) != value:
                raise BadRequest(f"parameters.{name}", f"{name} is {fields[name]} but the {what}'s is {value}; "
                                 f"leave it unset (the {what} sets the size)")
    return GenerationRequest(task=task, image=image, mask=mask, label_map=label_map, **fields)


def _micro_conditioning(params: pb.GenerationParameters) -> dict[str, tuple[int, int]]:
    """The SDXL micro-conditioning pairs the parameters set, in the schema's (height, width) / (top, left) order."""
    fields = {}
    for name, (first, second) in _PAIRS:
        if params.HasField(name):
            pair = getattr(params, name)
            fields[name] = (getattr(pair, first), getattr(pair, second))
    return fields


def to_parameters(request: GenerationRequest) -> pb.GenerationParameters:
    """The parameters a job ran with (after admission every default is resolved, except a None size: the
    model's default, which the images' own sizes then show)."""
    layout = [pb.LayoutBox(label=str(b.label), x0=b.box[0], y0=b.box[1], x1=b.box[2], y1=b.box[3])
              for b in request.layout or ()]
    return pb.GenerationParameters(
        prompt=request.prompt, negative_prompt=request.negative_prompt, model=request.model or "",
        seed=request.seed, steps=request.steps, sampler=request.effective_sampler, karras=request.karras,
        guidance_scale=request.effective_guidance, width=request.width, height=request.height, n=request.n,
        strength=request.effective_strength, eta=request.eta, preview_every=request.preview_every,
        priority=request.priority, refiner=request.refiner or "", refiner_switch=request.refiner_switch,
        noise_level=request.noise_level, **_pairs(request),
        class_label="" if request.class_label is None else str(request.class_label), layout=layout,
        loras=[pb.Lora(name=ref.name, weight=ref.weight) for ref in request.loras])


def _pairs(request: GenerationRequest) -> dict[str, Any]:
    """The request's SDXL micro-conditioning as proto messages (unset ones left out)."""
    kinds = {"original_size": pb.PixelSize, "crops_coords_top_left": pb.CropCorner, "target_size": pb.PixelSize}
    return {name: kinds[name](**dict(zip(names, value, strict=True)))
            for name, names in _PAIRS if (value := getattr(request, name)) is not None}


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; (0, 0) if it is not a PNG."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return 0, 0
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def to_image(png: bytes, index: int, seed: int) -> pb.Image:
    width, height = png_size(png)
    return pb.Image(index=index, seed=seed, width=width, height=height, png=png)


def to_status(status: JobStatus) -> str:
    """The proto enum value's name (message constructors take names)."""
    return f"JOB_STATUS_{status.name.upper()}"


def to_progress(event: JobEvent) -> pb.Progress:
    return pb.Progress(type=f"EVENT_TYPE_{event.type.upper()}", status=to_status(event.status), step=event.step,
                       total=event.total, error=event.error or "", event_id=event.id,
                       preview=base64.b64decode(event.preview) if event.preview else b"",
                       queue_position=event.queue_position, eta_s=event.eta_s)


def to_task(task: Task) -> str:
    """The proto enum value's name: TASK_ and the task's value (`Task.class_` is "class": TASK_CLASS)."""
    return f"TASK_{task.value.upper()}"


def to_job(job: Job, images: Sequence[pb.Image] = ()) -> pb.Job:
    return pb.Job(
        id=job.id, model=job.model, task=to_task(job.request.task), status=to_status(job.status),
        parameters=to_parameters(job.request), created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, step=job.step, total=job.total, attempts=job.attempts, error=job.error or "",
        results=job.results, cancel_requested=job.cancel_requested, images=images,
        queue_position=job.queue_position, eta_s=job.eta_s)


def idempotency_key(field_value: str, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key from the request field or the `idempotency-key` metadata (equal if both); None if neither."""
    from_metadata = next((str(v) for k, v in metadata or () if k.lower() == IDEMPOTENCY_METADATA), "")
    if field_value and from_metadata and field_value != from_metadata:
        raise BadRequest("idempotency_key", "the field and the idempotency-key metadata differ; send one")
    key = field_value or from_metadata
    if key and not IDEMPOTENCY_KEY.match(key):
        raise BadRequest("idempotency_key", "an idempotency key is 1-255 printable ASCII characters")
    return key or None
