"""The runner: the only code of the worker that touches the device.

It holds the model and its `Pipeline`, loaded once (CPU: fp32 with prepacked convolutions and channels_last,
`models.cpu_inference`; CUDA: fp16 by default, bf16 or fp32 on request), decodes a job's input image and mask (or
label map), runs one batch of samples for one task and encodes every image as a PNG whose text chunks carry the
parameters that made it (task, model, seed, steps, sampler, karras, eta, guidance_scale, width, height; prompt and
negative_prompt for the prompted tasks; strength for img2img and inpaint; `class` and `class_id`, `layout` (JSON)
or `label_map_sha256` for the other conditionings; SDXL's micro-conditioning, `refiner` and `refiner_switch`, and
`noise_level` where a job sets them), so the same parameters give the same bytes. An SDXL base's runner may hold a
refiner beside it (LDM_WORKER_REFINER), which finishes the txt2img jobs that name it.

What a model can do is what its config declares (`ModelConfig.tasks`, from its kind: models/names.py); each task
reaches the pipeline through its entry of `PIPELINE_CALLS`. A class label, layout or label map the model does not
take fails its job alone, before any batch, as `invalid_input` (`check`, `inputs`: models/conditioning.py says what
is wrong).

Failures a job should report are `JobFailure`s with a reason (the label of `ldm_job_failures_total`):
`unsupported` (the model cannot do the task), `invalid_input` (an image, label map, class or layout that cannot be
decoded or does not fit the model), `out_of_memory` (even one sample does not fit). When CUDA runs out of memory
the batch is split in halves and each half retried, down to single samples; each sample has its own generator, so
the images do not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from PIL import Image

from models.conditioning import Box, ConditionError, label_map_array, layout_to_json, parse_layout, resolve_label
from models.cpu_inference import optimize_for_cpu_inference
from models.images import encode_png
from models.ldm import LatentDiffusion
from models.lora import AdapterSet, LoraCache, LoraError
from models.names import (
    KIND_DESCRIPTIONS,
    MISSING_NULL,
    DTypeName,
    GpuMode,
    SamplerName,
    WinogradPolicy,
    default_guidance,
    default_sampler,
)
from models.pipeline import (
    GenerationResult,
    Pipeline,
    Progress,
    RunSettings,
    SampleSpec,
    Started,
    UnsupportedTask,
    Watch,
    check_refiner,
)
from models.preview import Previewer
from models.prompt_weighting import PromptSyntax
from models.resolve import pick_device, pick_dtype, resolve_model
from models.step_batch import StepSample
from models.textual_inversion import load_embeddings_dir
from service.images import ImageError, decode_queued_image, decode_queued_label_map
from service.loras import LoraNameError, lora_path
from service.schemas import (
    CONDITION_TASKS,
    DEFAULT_STRENGTH,
    IMAGE_TASKS,
    MICRO_FIELDS,
    MODEL_NAME_PATTERN,
    MODEL_OPTIONS,
    BatchKey,
    GenerationRequest,
    LabelSet,
    Task,
    option_message,
    refiner_message,
    unguided_message,
)

log = logging.getLogger(__name__)

FailureReason = Literal["unsupported", "invalid_input", "out_of_memory", "internal"]
#: the worker's dtype setting: auto = fp16 on cuda, fp32 elsewhere (`models.resolve.pick_dtype`)
DType = Literal["auto", DTypeName]

#: step(step, total, samples, x0): after every sampler step of the samples (indices into the batch) now running, with
#: the current x0 estimate [1, C, h, w] of each sample that step advanced, by index (what a live preview shows);
#: raising `Cancelled` from it stops those samples between steps
StepCallback = Callable[[int, int, Sequence[int], Mapping[int, torch.Tensor]], None]


class JobFailure(Exception):
    """A job cannot be done; `str()` ("reason: message") is what the client reads as the job's error."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message

    @classmethod
    def internal(cls) -> tuple[JobFailure, str]:
        """A fault of ours or of the device, and its incident id: the client reads a short text with the id, the
        worker's log line (which carries the exception) the same id; never the exception's text, which may name
        paths, hosts or another job's data."""
        incident = secrets.token_hex(4)
        return cls("internal", f"the worker could not run the job (incident {incident}, in the worker log)"), incident


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
    `sd15`; a CompVis zoo `celeba256/model.ckpt` beside its config.yaml -> `celeba256`), with characters outside
    the name pattern replaced by `-`."""
    if re.match(MODEL_NAME_PATTERN, spec):
        return spec
    path = Path(spec.rstrip("/"))
    zoo = path.stem in ("model", "last") and (path.parent / "config.yaml").is_file()  # the CompVis zoo's layout
    stem = (path.parent.name if zoo else path.stem) or "model"
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", stem).lstrip("._:-")[:128]
    return name or "model"


def decode_label_map(data: bytes, max_pixels: int, n_classes: int) -> Image.Image:
    """A semantic job's label-map bytes -> a mode-L image of labels 0..n_classes (service/images.py decodes it:
    PNG only, pixel count checked first); palette indices are the labels, never their colours
    (`label_map_array`)."""
    try:
        labels = label_map_array(decode_queued_label_map(data, max_pixels), n_classes)
    except ImageError as exc:
        raise JobFailure("invalid_input", exc.message) from exc
    except ConditionError as exc:
        raise JobFailure("invalid_input", f"label_map: {exc}") from exc
    return Image.fromarray(labels.astype(np.uint8) if labels.max() <= 255 else labels.astype(np.int32))


def decode_image(data: bytes, what: Literal["image", "mask"], max_pixels: int) -> Image.Image:
    """Input bytes -> an RGB image (a mask: luminance), decoded by service/images.py: only the formats the front
    ends accept are opened, and the pixel count is checked before any pixel is decoded."""
    try:
        return decode_queued_image(data, what, max_pixels)
    except ImageError as exc:
        raise JobFailure("invalid_input", exc.message) from exc


@dataclass(frozen=True)
class TextOptions:
    """What the worker's settings say about prompts and adapters (LDM_PROMPT_SYNTAX, LDM_EMBEDDINGS_DIR,
    LDM_LORA_DIR, LDM_LORA_CACHE_MB)."""

    prompt_syntax: PromptSyntax = "a1111"
    embeddings_dir: Path | None = None
    lora_dir: Path | None = None
    lora_cache_bytes: int = 1024 * 2**20


#: threads that encode a batch's PNGs at once (zlib releases the GIL): one per core, at most this many
PNG_THREADS = 8


def png_threads() -> int:
    """How many PNG threads a runner uses on this machine."""
    return min(PNG_THREADS, os.cpu_count() or 1)


class Runner:
    """A loaded model and its pipeline; `run` makes one batch of images. Not thread-safe: one batch at a time."""

    def __init__(self, model: LatentDiffusion, name: str, *, on_oom: Callable[[], None] | None = None,
                 text: TextOptions | None = None, refiner: LatentDiffusion | None = None,
                 refiner_name: str | None = None, gpu: GpuMode = "graphs") -> None:
        """`gpu`: how a model on a GPU runs its UNet (models.names.GPU_MODES)."""
        self.model = model
        self.name = name
        self.text = text or TextOptions()
        embeddings = (load_embeddings_dir(self.text.embeddings_dir, model)
                      if self.text.embeddings_dir is not None else None)
        if refiner is not None:
            check_refiner(model, refiner)
        #: the SDXL refiner held beside the model (LDM_WORKER_REFINER) and the name requests give it (`refiner`)
        self.refiner_name = (refiner_name or refiner.config.name) if refiner is not None else None
        self.pipeline = Pipeline(model, gpu=gpu, prompt_syntax=self.text.prompt_syntax, embeddings=embeddings,
                                 refiner=refiner)
        self.previewer = Previewer(model)
        self.on_oom = on_oom
        self._loras: LoraCache | None = None
        self._png_pool: ThreadPoolExecutor | None = None
        self.on_lora_load: Callable[[], None] | None = None  # a LoRA file was read (metrics)

    @classmethod
    def load(cls, spec: str, *, name: str | None = None, device: str | None = None, dtype: DType = "auto",
             winograd: WinogradPolicy = "balanced", gpu: GpuMode = "graphs",
             tokenizer_dir: Path | None = None, tokenizer_2_dir: Path | None = None,
             text: TextOptions | None = None, refiner: str | None = None) -> Runner:
        """Load the model of `spec` (shipped name, checkpoint path, diffusers folder, `random:<config>`) once, and
        the SDXL refiner of the spec `refiner` beside it (requests name it by `served_name(refiner)`).
        device None = cuda when present, else cpu; dtype auto = fp16 on cuda, fp32 on cpu; `winograd`: which UNet
        and VAE convolutions the CPU path computes by Winograd (models.names.WINOGRAD_POLICIES); `gpu`: how a model on a
        GPU runs its UNet (models.names.GPU_MODES)."""
        dev = pick_device(device)
        dt = pick_dtype(dev, None if dtype == "auto" else dtype)
        models = []
        for one in (spec, refiner) if refiner is not None else (spec,):
            model = resolve_model(one, tokenizer=tokenizer_dir, tokenizer_2=tokenizer_2_dir, device=dev, dtype=dt)
            if dev.type == "cpu" and dt in (torch.float32, torch.bfloat16):
                optimize_for_cpu_inference(model, winograd)
            models.append(model)
        return cls(models[0], name or served_name(spec), text=text, refiner=models[1] if refiner else None,
                   refiner_name=served_name(refiner) if refiner else None, gpu=gpu)

    @property
    def lora_cache(self) -> LoraCache:
        """The adapters loaded so far, bounded in bytes (made at the first request with adapters)."""
        if self._loras is None:
            self._loras = LoraCache(self.model, self.text.lora_cache_bytes)
        return self._loras

    def lora_stats(self) -> tuple[int, int]:
        """(bytes held, adapters held) of the LoRA cache; zeros before the first adapter."""
        cache = self._loras
        return (0, 0) if cache is None else (cache.nbytes, len(cache))

    def adapters(self, request: GenerationRequest) -> AdapterSet:
        """The request's LoRA adapters, loaded (or found in the cache), with their weights. JobFailure
        invalid_input naming the adapter when its name or file is not usable."""
        adapters = []
        for ref in request.loras:
            misses = self.lora_cache.misses
            try:
                adapters.append((self.lora_cache.get(lora_path(self.text.lora_dir, ref.name)), ref.weight))
            except (LoraNameError, LoraError) as exc:
                raise JobFailure("invalid_input", str(exc)) from exc
            finally:
                if self.lora_cache.misses > misses and self.on_lora_load is not None:
                    self.on_lora_load()
        return tuple(adapters)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def tasks(self) -> frozenset[Task]:
        """The tasks this model can do (its config declares them)."""
        return frozenset(Task(task) for task in self.model.config.tasks)

    @property
    def labels(self) -> LabelSet | None:
        """The labels a class, layout or semantic model takes (registered, so the front ends can check them)."""
        c = self.model.config.conditioner
        if c is None or self.model.config.kind not in ("class", "layout", "semantic", "semantic_map", "box_layout",
                                                       "class_only"):
            return None
        return LabelSet(n_classes=c.n_classes, class_names=c.class_names, max_boxes=c.max_boxes)

    @property
    def default_guidance(self) -> dict[Task, float]:
        """The guidance scale each of its tasks gets when a request gives none (registered, so the front ends record
        the scale actually used): the model's own (its config's default_guidance), else the task's default, or 1
        for a model without a null condition."""
        config = self.model.config
        return {Task(task): default_guidance(task, config.kind, config.default_guidance) for task in config.tasks}

    @property
    def sampler_guidance(self) -> dict[SamplerName, dict[Task, float]]:
        """For each sampler with a scale of its own (its config's sampler_guidance), the guidance scale each task
        gets with it when a request gives none (registered beside default_guidance)."""
        config = self.model.config
        return {g.sampler: {Task(task): config.guidance_for(task, g.sampler) for task in config.tasks}
                for g in config.sampler_guidance}

    @property
    def default_sampler(self) -> SamplerName:
        """The sampler a job that names none runs with (registered, so the front ends record the sampler used): the
        model's own (its config's default_sampler), else DPM-Solver++(2M)."""
        return default_sampler(self.model.config.default_sampler)

    def sampler(self, request: GenerationRequest) -> SamplerName:
        """The sampler a job runs with: its own, or this model's default (the front ends fill it in from the
        registration; a request queued without one gets the model's, or DPM-Solver++(2M) with Karras sigmas)."""
        if request.sampler is not None:
            return request.sampler
        return default_sampler(self.model.config.default_sampler, karras=request.karras)

    @property
    def missing_null(self) -> str | None:
        """The null condition this model lacks ("null class"; registered), which classifier-free guidance needs: it
        is sampled unguided, guidance_scale 1 only. None: it has one (or needs none)."""
        return MISSING_NULL.get(self.model.config.kind)

    @property
    def options(self) -> list[str]:
        """The request fields only some models take that this one takes (registered, so the front ends refuse the
        others by name): SDXL's micro-conditioning (the refiner has no target size), the x4 upscaler's noise_level."""
        config = self.model.config
        taken: list[str] = []
        if config.conditioner is not None and config.conditioner.kind == "sdxl":
            micro = config.conditioner.sdxl.micro
            taken += [name for name in MICRO_FIELDS if micro == "size" or name != "target_size"]
        if config.lowres_noise is not None:
            taken.append("noise_level")
        return taken

    def guidance(self, request: GenerationRequest) -> float:
        """The scale a job runs at: its own, or this model's default for its task (the front ends fill it in from
        the registration; a request queued without one gets the model's, not the task's)."""
        if request.guidance_scale is not None:
            return request.guidance_scale
        if request.task not in self.tasks:
            return request.effective_guidance
        return self.model.config.guidance_for(request.task.value, self.sampler(request))

    # ------------------------------------------------------------------------------------- per job, before a batch

    def check(self, request: GenerationRequest) -> None:
        """Raise JobFailure: "unsupported" when the model cannot do the request's task, "invalid_input" when its
        class label or layout is not one the model takes."""
        if request.task not in self.tasks:
            can = ", ".join(sorted(t.value for t in self.tasks))
            raise JobFailure("unsupported", f"model {self.name!r} is {KIND_DESCRIPTIONS[self.model.config.kind]} and "
                             f"cannot do {request.task.value} (it can do: {can})")
        missing, scale = self.missing_null, self.guidance(request)
        if missing is not None and scale != 1.0:
            raise JobFailure("invalid_input", unguided_message(self.name, missing, scale))
        if request.task == Task.class_:
            self._class_id(request)
        elif request.task == Task.layout:
            self._layout(request)
        for name in MODEL_OPTIONS:
            if getattr(request, name) is not None and name not in self.options:
                raise JobFailure("unsupported", option_message(name, self.name))
        top = self.model.config.max_noise_level
        if request.noise_level is not None and request.noise_level > top:
            raise JobFailure("invalid_input", f"noise_level must be within 0..{top} for model {self.name!r}, got "
                             f"{request.noise_level}")
        if request.refiner is not None and request.refiner != self.refiner_name:
            raise JobFailure("unsupported", refiner_message(self.name, request.refiner,
                                                            [self.refiner_name] if self.refiner_name else []))
        self.adapters(request)  # a LoRA that cannot be applied fails its own job, not its batch

    def _class_id(self, request: GenerationRequest) -> int:
        c = self.model.config.conditioner
        if request.class_label is None or c is None:
            raise JobFailure("invalid_input", "this class job has no class_label")
        try:
            return resolve_label(request.class_label, c.class_names, c.n_classes, "class_label")
        except ConditionError as exc:
            raise JobFailure("invalid_input", str(exc)) from exc

    def _layout(self, request: GenerationRequest) -> list[Box]:
        c = self.model.config.conditioner
        if request.layout is None or c is None or c.max_boxes is None:
            raise JobFailure("invalid_input", "this layout job has no layout")
        data = [{"label": b.label, "box": list(b.box)} for b in request.layout]
        try:
            return parse_layout(data, c.class_names, c.n_classes, c.max_boxes)
        except ConditionError as exc:
            raise JobFailure("invalid_input", str(exc)) from exc

    def inputs(self, request: GenerationRequest, image: bytes | None, mask: bytes | None, *,
               max_pixels: int) -> tuple[Image.Image | None, Image.Image | None]:
        """Decode and check a job's input image and mask, or a semantic job's label map (as its image: `image` holds
        the map's bytes, `JobQueue.inputs`); None where the task takes none."""
        if request.task == Task.semantic:
            return self._label_map(request, image, max_pixels), None
        if request.task not in IMAGE_TASKS:
            return None, None
        if image is None:
            raise JobFailure("invalid_input", f"the input image of this {request.task.value} job is missing "
                             "(expired or never stored)")
        picture = decode_image(image, "image", max_pixels)
        self._check_size(request, picture, "the image", "")
        if request.task != Task.inpaint:
            return picture, None
        if mask is None:
            raise JobFailure("invalid_input", "the mask of this inpaint job is missing (expired or never stored)")
        stencil = decode_image(mask, "mask", max_pixels)
        if stencil.size != picture.size:
            raise JobFailure("invalid_input", f"the mask is {stencil.width}x{stencil.height}, the image "
                             f"{picture.width}x{picture.height}: they must be the same size")
        return picture, stencil

    def _label_map(self, request: GenerationRequest, data: bytes | None, max_pixels: int) -> Image.Image:
        c = self.model.config.conditioner
        if data is None or c is None:
            raise JobFailure("invalid_input", "the label map of this semantic job is missing (expired or never stored)")
        labels = decode_label_map(data, max_pixels, c.n_classes)
        self._check_size(request, labels, "the label map", ": the map sets the image's size")
        return labels

    def _check_size(self, request: GenerationRequest, picture: Image.Image, what: str, why: str) -> None:
        """An input image (or label map) that sets the output size: the request's size if it gives one, and a
        multiple of the model's downsampling factor."""
        expected = (request.width or picture.width, request.height or picture.height)
        if picture.size != expected:
            raise JobFailure("invalid_input", f"{what} is {picture.width}x{picture.height}, the request says "
                             f"{expected[0]}x{expected[1]}{why}")
        f = self.model.config.downsample_factor
        if picture.width % f or picture.height % f:
            raise JobFailure("invalid_input", f"{what}'s size {picture.width}x{picture.height} is not a multiple "
                             f"of {f}, this model's downsampling factor")

    def batch_key(self, request: GenerationRequest, image: Image.Image | None) -> BatchKey:
        """The request's batch key with the size made explicit: the input image's, or the model's default, so
        that jobs which will make images of one size share batches whether or not they spelled the size out."""
        default = self.model.config.default_size
        width, height = image.size if image is not None else (request.width or default, request.height or default)
        return request.batch_key()._replace(width=width, height=height, sampler=self.sampler(request))

    # ------------------------------------------------------------------------------------------------ a batch

    def run(self, key: BatchKey, samples: Sequence[SampleInput],
            on_step: StepCallback | None = None) -> list[bytes | None]:
        """Make the images of one batch (every sample shares `key`): a PNG per sample, None for samples stopped
        by `Cancelled` from `on_step`. Raises JobFailure for a failure of the whole batch."""
        return [png.result() if png is not None else None for png in self.submit(key, samples, on_step)]

    def submit(self, key: BatchKey, samples: Sequence[SampleInput],
               on_step: StepCallback | None = None) -> list[Future[bytes] | None]:
        """`run`, returning once the batch is sampled and decoded: its PNGs are still encoding on the PNG threads
        (the worker's finisher waits for them while the next batch runs)."""
        if not samples:
            return []
        return self._run(key, samples, list(range(len(samples))), on_step)

    def _run(self, key: BatchKey, samples: Sequence[SampleInput], indices: list[int],
             on_step: StepCallback | None) -> list[Future[bytes] | None]:
        try:
            return self._run_once(key, samples, indices, on_step)
        except Cancelled:
            return [None] * len(indices)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler, so the traceback's frames free their tensors first
        self.free_cached_memory()
        if len(indices) == 1:
            raise self.out_of_memory(key)
        log.warning("out of memory: retrying a batch of %d as two halves", len(indices))
        if self.on_oom is not None:
            self.on_oom()
        half = (len(indices) + 1) // 2
        return (self._run(key, samples, indices[:half], on_step)
                + self._run(key, samples, indices[half:], on_step))

    def _run_once(self, key: BatchKey, samples: Sequence[SampleInput], indices: list[int],
                  on_step: StepCallback | None) -> list[Future[bytes] | None]:
        chosen = [samples[i] for i in indices]
        specs, settings = self._specs(key, chosen)
        x0: dict[int, torch.Tensor] = {}  # the last step's x0 estimates, by index into `samples`

        def watch(advanced: Sequence[StepSample]) -> None:
            x0.clear()
            x0.update({indices[cast(int, s.key)]: s.state.denoised for s in advanced if s.state.denoised is not None})

        def progress(step: int, total: int) -> None:
            if on_step is not None:
                on_step(step, total, indices, x0)

        with _as_job_failures():
            result = self._call(key.task, specs, settings, chosen, progress, watch if on_step is not None else None)
        for warning in result.warnings:
            log.warning("%s", warning)
        pngs: list[Future[bytes] | None] = [self.submit_png(key, s, image)
                                            for s, image in zip(chosen, result.images, strict=True)]
        return pngs

    def _specs(self, key: BatchKey, samples: Sequence[SampleInput]) -> tuple[list[SampleSpec], RunSettings]:
        adapters = {id(s.request): self.adapters(s.request) for s in samples}
        specs = [SampleSpec(s.request.prompt, s.request.negative_prompt, s.seed, self.guidance(s.request),
                            adapters=adapters[id(s.request)],
                            **s.request.micro_conditioning)  # type: ignore[arg-type]  # SDXL's, by name
                 for s in samples]
        settings = RunSettings(sampler=key.sampler, steps=key.steps, width=key.width, height=key.height,
                               karras=key.karras, eta=key.eta,
                               strength=key.strength if key.strength is not None else DEFAULT_STRENGTH[Task.img2img],
                               refiner_switch=key.refiner_switch if key.refiner is not None else None,
                               noise_level=key.noise_level)
        return specs, settings

    def _call(self, task: Task, specs: list[SampleSpec], settings: RunSettings, samples: Sequence[SampleInput],
              progress: Progress, watch: Watch | None = None) -> GenerationResult:
        """The pipeline call of `task` (the one place a test may inject a fault); `watch` sees every step's x0
        estimates (live previews). Conditions are per sample: one class, layout or label map each (a job's `n`
        samples share its own)."""
        method, conditions = self._task_call(task, samples)
        result: GenerationResult = getattr(self.pipeline, method)(specs, settings, *conditions, progress=progress,
                                                                  watch=watch)
        return result

    def _task_call(self, task: Task, samples: Sequence[SampleInput]) -> tuple[str, tuple[object, ...]]:
        """The pipeline method of `task` and its per-sample conditions beside specs and settings."""
        method, conditions = PIPELINE_CALLS[task]
        return method, conditions(self, samples)

    # ------------------------------------------------------------------------------------------ step by step

    def start(self, key: BatchKey, samples: Sequence[SampleInput]) -> Started:
        """The samples of one job (or any that share `key`), started for a step batch (models/step_batch.py):
        conditions encoded and noise drawn, nothing sampled; one `StepSample` per sample (keys 0..n-1), whose
        `finish` gives its image. Sampled in any step batch, an image is the one `run` makes (same PNG bytes).
        Raises JobFailure as `run` does."""
        specs, settings = self._specs(key, samples)
        method, conditions = self._task_call(key.task, samples)
        with _as_job_failures():
            started: Started = getattr(self.pipeline, f"start_{method}")(specs, settings, *conditions)
        for warning in started.warnings:
            log.warning("%s", warning)
        return started

    def preview(self, latent: torch.Tensor, key: BatchKey) -> bytes:
        """A small PNG of an x0 estimate [1, C, h, w] of an image of `key`'s size (models/preview.py; the map is
        fitted on the first preview)."""
        return self.previewer.png(latent, key.height or 0, key.width or 0)

    def submit_png(self, key: BatchKey, sample: SampleInput, image: Image.Image) -> Future[bytes]:
        """`png` on one of the runner's PNG threads. zlib releases the GIL, so a batch's images encode in parallel:
        at PIL's level 6 a 512x512 image takes ~0.1 s of one core, and a batch of 32 one by one would take about
        as long as its whole generation on an H200 (docs/benchmarks.md)."""
        if self._png_pool is None:
            self._png_pool = ThreadPoolExecutor(png_threads(), thread_name_prefix="png")
        return self._png_pool.submit(self.png, key, sample, image)

    def png(self, key: BatchKey, sample: SampleInput, image: Image.Image) -> bytes:
        """The PNG of one sample's image, its text chunks carrying the parameters that made it."""
        r = sample.request
        parameters: dict[str, object] = {"task": key.task.value, "model": self.name}
        if key.task not in CONDITION_TASKS:
            parameters |= {"prompt": r.prompt, "negative_prompt": r.negative_prompt}
        parameters |= {
            "seed": sample.seed, "steps": key.steps, "sampler": key.sampler, "karras": key.karras, "eta": key.eta,
            "guidance_scale": self.guidance(r), "width": image.width, "height": image.height,
        }
        if key.strength is not None:
            parameters["strength"] = key.strength
        if r.loras:
            parameters["loras"] = json.dumps([ref.model_dump() for ref in r.loras])
        parameters |= {name: json.dumps(value) for name, value in r.micro_conditioning.items()}
        if key.refiner is not None:
            parameters |= {"refiner": key.refiner, "refiner_switch": key.refiner_switch}
        if key.noise_level is not None:
            parameters["noise_level"] = key.noise_level
        return encode_png(image, parameters | self._condition_parameters(key.task, sample))

    def _condition_parameters(self, task: Task, sample: SampleInput) -> dict[str, object]:
        """The condition of a class, layout or semantic image, for its PNG: the class by name (where the model has
        names) and id, the layout as JSON with names, and the sha256 of the label map's pixels (mode L: one byte
        per pixel, row by row; the map itself is too big for a text chunk)."""
        names = self.model.config.conditioner.class_names if self.model.config.conditioner is not None else ()
        if task == Task.class_:
            class_id = self._class_id(sample.request)
            return {"class": names[class_id] if names else class_id, "class_id": class_id}
        if task == Task.layout:
            return {"layout": json.dumps(layout_to_json(self._layout(sample.request), names))}
        if task == Task.semantic and sample.image is not None:
            return {"label_map_sha256": hashlib.sha256(sample.image.tobytes()).hexdigest()}
        return {}

    def out_of_memory(self, key: BatchKey) -> JobFailure:
        """The failure of a job whose single image does not fit in the device's memory (no split is left to try)."""
        return JobFailure("out_of_memory", f"one {key.width}x{key.height} image does not fit in the memory of "
                          f"{self.device}")

    def free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _as_job_failures() -> Iterator[None]:
    """What a pipeline refuses, as the job's failure: a task the model cannot do, or an input it cannot use."""
    try:
        yield
    except UnsupportedTask as exc:
        raise JobFailure("unsupported", str(exc)) from exc
    except ValueError as exc:
        raise JobFailure("invalid_input", str(exc)) from exc


def _images(samples: Sequence[SampleInput]) -> list[Image.Image]:
    """The samples' decoded input images (a semantic job's: its label map)."""
    return [s.image for s in samples if s.image is not None]


#: what a task takes beside specs and settings, from its samples: (runner, samples) -> the pipeline's arguments
TaskConditions = Callable[[Runner, Sequence[SampleInput]], tuple[object, ...]]
#: every task's pipeline method (`Pipeline.<name>`, and `Pipeline.start_<name>` for step batches) and conditions
#: (tests/unit/test_architecture.py: one per task of models.names.TASKS)
PIPELINE_CALLS: dict[Task, tuple[str, TaskConditions]] = {
    Task.txt2img: ("txt2img", lambda runner, samples: ()),
    Task.img2img: ("img2img", lambda runner, samples: (_images(samples),)),
    Task.inpaint: ("inpaint", lambda runner, samples: (_images(samples),
                                                       [s.mask for s in samples if s.mask is not None])),
    Task.upscale: ("upscale", lambda runner, samples: (_images(samples),)),
    Task.class_: ("class2img", lambda runner, samples: ([runner._class_id(s.request) for s in samples],)),
    Task.layout: ("layout2img", lambda runner, samples: ([runner._layout(s.request) for s in samples],)),
    Task.semantic: ("semantic2img", lambda runner, samples: (_images(samples),)),
    Task.unconditional: ("unconditional", lambda runner, samples: ()),
}
