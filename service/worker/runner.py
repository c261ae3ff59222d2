"""The runner: the only code of the worker that touches the device.

It holds the model and its `Pipeline`, loaded once (CPU: fp32 with prepacked convolutions and channels_last,
`models.cpu_inference`; CUDA: fp16 by default, bf16 or fp32 on request), decodes a job's input image and mask,
runs one batch of samples for one task and encodes every image as a PNG whose text chunks carry the parameters
that made it (task, model, prompt, negative_prompt, seed, steps, sampler, karras, eta, guidance_scale, width,
height, and strength for img2img and inpaint), so the same parameters give the same bytes.

Failures a job should report are `JobFailure`s with a reason (the label of `ldm_job_failures_total`):
`unsupported` (the model cannot do the task), `invalid_input` (an image that cannot be decoded or does not fit),
`out_of_memory` (even one sample does not fit). When CUDA runs out of memory the batch is split in halves and
each half retried, down to single samples; each sample has its own generator, so the images do not change.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError

from models.cpu_inference import optimize_for_cpu_inference
from models.images import encode_png
from models.ldm import LatentDiffusion
from models.pipeline import GenerationResult, Pipeline, Progress, RunSettings, SampleSpec, UnsupportedTask
from service.generate import pick_device, resolve_model
from service.schemas import DEFAULT_STRENGTH, MODEL_NAME_PATTERN, BatchKey, GenerationRequest, Task

log = logging.getLogger(__name__)

FailureReason = Literal["unsupported", "invalid_input", "out_of_memory", "internal"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: the tasks a model can do, by what its UNet's extra input channels hold (ModelConfig.concat_input)
TASKS_BY_CONCAT_INPUT: dict[str, frozenset[Task]] = {
    "none": frozenset({Task.txt2img, Task.img2img, Task.inpaint}),  # inpainting by latent blending
    "inpaint": frozenset({Task.inpaint}),
    "lowres": frozenset({Task.upscale}),
}
_KIND = {"none": "a text-to-image model", "inpaint": "an inpainting model", "lowres": "a super-resolution model"}

#: step(step, total, samples): after every sampler step of the samples (indices into the batch) now running;
#: raising `Cancelled` from it stops those samples between steps
StepCallback = Callable[[int, int, Sequence[int]], None]


class JobFailure(Exception):
    """A job cannot be done; `str()` ("reason: message") is what the client reads as the job's error."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class Cancelled(Exception):
    """Raised by a step callback: every job of the samples running was cancelled (or taken over)."""


@dataclass(frozen=True)
class SampleInput:
    """One image to make: its job's request (prompts, guidance), its own seed, decoded inputs."""

    request: GenerationRequest
    seed: int
    image: Image.Image | None = None
    mask: Image.Image | None = None


def served_name(spec: str) -> str:
    """The model name a worker serves for a model spec: the spec itself when it is a valid model name (a shipped
    name, `random:<config>`), else the file or folder name without its suffix (`/ckpt/sd15.safetensors` ->
    `sd15`), with characters outside the name pattern replaced by `-`."""
    if re.match(MODEL_NAME_PATTERN, spec):
        return spec
    stem = Path(spec.rstrip("/")).stem or "model"
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", stem).lstrip("._:-")[:128]
    return name or "model"


def decode_image(data: bytes, what: Literal["image", "mask"], max_pixels: int) -> Image.Image:
    """Input bytes -> an RGB image (a mask: luminance), checking the pixel count before decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise JobFailure("invalid_input", f"the {what} has {image.width}x{image.height} pixels; "
                                 f"the limit is {max_pixels} pixels")
            image.load()
            return image.convert("L" if what == "mask" else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise JobFailure("invalid_input", f"the {what} cannot be decoded: {exc}") from exc


class Runner:
    """A loaded model and its pipeline; `run` makes one batch of images. Not thread-safe: one batch at a time."""

    def __init__(self, model: LatentDiffusion, name: str, *, on_oom: Callable[[], None] | None = None) -> None:
        self.model = model
        self.name = name
        self.pipeline = Pipeline(model)
        self.on_oom = on_oom

    @classmethod
    def load(cls, spec: str, *, name: str | None = None, device: str | None = None, dtype: DType = "auto",
             tokenizer_dir: Path | None = None) -> Runner:
        """Load the model of `spec` (shipped name, checkpoint path, diffusers folder, `random:<config>`) once.
        device None = cuda when present, else cpu; dtype auto = fp16 on cuda, fp32 on cpu."""
        dev, dt = pick_device(device, None if dtype == "auto" else _TORCH_DTYPES[dtype])
        model = resolve_model(spec, tokenizer=tokenizer_dir, device=dev, dtype=dt)
        if dev.type == "cpu" and dt in (torch.float32, torch.bfloat16):
            optimize_for_cpu_inference(model)
        return cls(model, name or served_name(spec))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def tasks(self) -> frozenset[Task]:
        """The tasks this model can do."""
        return TASKS_BY_CONCAT_INPUT[self.model.config.concat_input]

    # ------------------------------------------------------------------------------------- per job, before a batch

    def check(self, request: GenerationRequest) -> None:
        """Raise JobFailure("unsupported") when the model cannot do the request's task."""
        if request.task not in self.tasks:
            concat = self.model.config.concat_input
            can = ", ".join(sorted(t.value for t in self.tasks))
            raise JobFailure("unsupported", f"model {self.name!r} is {_KIND[concat]} and cannot do "
                             f"{request.task.value} (it can do: {can})")

    def inputs(self, request: GenerationRequest, image: bytes | None, mask: bytes | None, *,
               max_pixels: int) -> tuple[Image.Image | None, Image.Image | None]:
        """Decode and check a job's input image and mask (None where the task takes none)."""
        if request.task == Task.txt2img:
            return None, None
        if image is None:
            raise JobFailure("invalid_input", f"the input image of this {request.task.value} job is missing "
                             "(expired or never stored)")
        picture = decode_image(image, "image", max_pixels)
        expected = (request.width or picture.width, request.height or picture.height)
        if picture.size != expected:
            raise JobFailure("invalid_input", f"the image is {picture.width}x{picture.height}, the request says "
                             f"{expected[0]}x{expected[1]}")
        f = self.model.config.downsample_factor
        if picture.width % f or picture.height % f:
            raise JobFailure("invalid_input", f"the image size {picture.width}x{picture.height} is not a multiple "
                             f"of {f}, this model's downsampling factor")
        if request.task != Task.inpaint:
            return picture, None
        if mask is None:
            raise JobFailure("invalid_input", "the mask of this inpaint job is missing (expired or never stored)")
        stencil = decode_image(mask, "mask", max_pixels)
        if stencil.size != picture.size:
            raise JobFailure("invalid_input", f"the mask is {stencil.width}x{stencil.height}, the image "
                             f"{picture.width}x{picture.height}: they must be the same size")
        return picture, stencil

    def batch_key(self, request: GenerationRequest, image: Image.Image | None) -> BatchKey:
        """The request's batch key with the size made explicit: the input image's, or the model's default, so
        that jobs which will make images of one size share batches whether or not they spelled the size out."""
        default = self.model.config.default_size
        width, height = image.size if image is not None else (request.width or default, request.height or default)
        return request.batch_key()._replace(width=width, height=height)

    # ------------------------------------------------------------------------------------------------ a batch

    def run(self, key: BatchKey, samples: Sequence[SampleInput],
            on_step: StepCallback | None = None) -> list[bytes | None]:
        """Make the images of one batch (every sample shares `key`): a PNG per sample, None for samples stopped
        by `Cancelled` from `on_step`. Raises JobFailure for a failure of the whole batch."""
        if not samples:
            return []
        return self._run(key, samples, list(range(len(samples))), on_step)

    def _run(self, key: BatchKey, samples: Sequence[SampleInput], indices: list[int],
             on_step: StepCallback | None) -> list[bytes | None]:
        try:
            return self._run_once(key, samples, indices, on_step)
        except Cancelled:
            return [None] * len(indices)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler, so the traceback's frames free their tensors first
        self._free_cached_memory()
        if len(indices) == 1:
            raise JobFailure("out_of_memory", f"one {key.width}x{key.height} image does not fit in the memory "
                             f"of {self.device}")
        log.warning("out of memory: retrying a batch of %d as two halves", len(indices))
        if self.on_oom is not None:
            self.on_oom()
        half = (len(indices) + 1) // 2
        return (self._run(key, samples, indices[:half], on_step)
                + self._run(key, samples, indices[half:], on_step))

    def _run_once(self, key: BatchKey, samples: Sequence[SampleInput], indices: list[int],
                  on_step: StepCallback | None) -> list[bytes | None]:
        chosen = [samples[i] for i in indices]
        specs = [SampleSpec(s.request.prompt, s.request.negative_prompt, s.seed, s.request.guidance_scale)
                 for s in chosen]
        settings = RunSettings(sampler=key.sampler, steps=key.steps, width=key.width, height=key.height,
                               karras=key.karras, eta=key.eta,
                               strength=key.strength if key.strength is not None else DEFAULT_STRENGTH[Task.img2img])

        def progress(step: int, total: int) -> None:
            if on_step is not None:
                on_step(step, total, indices)

        try:
            result = self._call(key.task, specs, settings, chosen, progress)
        except UnsupportedTask as exc:
            raise JobFailure("unsupported", str(exc)) from exc
        except ValueError as exc:
            raise JobFailure("invalid_input", str(exc)) from exc
        for warning in result.warnings:
            log.warning("%s", warning)
        return [self._png(key, s, image) for s, image in zip(chosen, result.images, strict=True)]

    def _call(self, task: Task, specs: list[SampleSpec], settings: RunSettings, samples: Sequence[SampleInput],
              progress: Progress) -> GenerationResult:
        """The pipeline call of `task` (the one place a test may inject a fault)."""
        if task == Task.txt2img:
            return self.pipeline.txt2img(specs, settings, progress=progress)
        images = [s.image for s in samples if s.image is not None]
        if task == Task.img2img:
            return self.pipeline.img2img(specs, settings, images, progress=progress)
        if task == Task.inpaint:
            masks = [s.mask for s in samples if s.mask is not None]
            return self.pipeline.inpaint(specs, settings, images, masks, progress=progress)
        return self.pipeline.upscale(specs, settings, images, progress=progress)

    def _png(self, key: BatchKey, sample: SampleInput, image: Image.Image) -> bytes:
        r = sample.request
        parameters: dict[str, object] = {
            "task": key.task.value, "model": self.name, "prompt": r.prompt, "negative_prompt": r.negative_prompt,
            "seed": sample.seed, "steps": key.steps, "sampler": key.sampler, "karras": key.karras, "eta": key.eta,
            "guidance_scale": r.guidance_scale, "width": image.width, "height": image.height,
        }
        if key.strength is not None:
            parameters["strength"] = key.strength
        return encode_png(image, parameters)

    def _free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
