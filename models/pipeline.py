"""Pipelines: txt2img, img2img, inpainting (two ways) and super-resolution on a LatentDiffusion model, and the
paper's other conditionings: class2img, layout2img, semantic2img and unconditional sampling.

One batch shares its sampler, steps, size and (for img2img) strength; prompts, negative prompts,
seeds and guidance scales vary per item. Every item has its own CPU generator seeded with its seed,
drawn first for the initial latents and then for ancestral noise, so an item's image is the same
alone or in any batch, and the same as diffusers' StableDiffusionPipeline with that seed.

The other conditionings take one condition per item beside the specs (as img2img takes one image per
item); their classifier-free guidance steers away from the model's null condition (the null class, the
empty layout, the all-unknown label map), with each item's `guidance_scale` (1 = off). Inputs are
checked by models/conditioning.py, whose `ConditionError` (a ValueError) names what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.class_conditioner import ClassConditioner
from models.compvis.boxes import BoxTokenConditioner
from models.compvis.rescaler import SpatialRescaler
from models.conditioning import (
    Box,
    ConditionError,
    LayoutEncoder,
    SemanticEncoder,
    label_map_tensor,
    resolve_label,
)
from models.config import ModelConfig
from models.cpu_inference import optimize_for_cpu_inference
from models.diffusion import NoiseSchedule, q_sample
from models.gpu_inference import optimize_for_gpu_inference
from models.guidance import Conditioning
from models.images import mask_to_tensor, to_pil, to_tensor
from models.ldm import LatentDiffusion
from models.lora import AdapterSet, adapters_applied
from models.names import GpuMode, SamplerName, WinogradPolicy
from models.noise import generators_from_seeds, randn_per_item
from models.prompt_weighting import PROMPT_SYNTAXES, PromptSyntax, encode_prompt, encode_sdxl_prompt
from models.samplers import SamplingPlan, init_state, sampling_plan
from models.step_batch import AfterStep, Denoiser, StepBatch, StepSample, guided_denoiser
from models.text.clip import CLIPTextConditioner
from models.text.sdxl import Micro, SDXLTextConditioner, added_vector
from models.textual_inversion import SINGLE, EmbeddingDB

#: progress(step, total) after every sampler step; raising from it aborts the run (cancellation)
Progress = Callable[[int, int], None]
#: watch(advanced): the samples one step just advanced, before `progress` hears of that step: their states hold
#: each one's current x0 estimate (`state.denoised`), what a live preview shows
Watch = Callable[[Sequence[StepSample]], None]
MAX_STEPS = 1000
#: one label map per item: a single-channel PIL image (mode L or P) or an integer array [H, W]
LabelMap = Image.Image | np.ndarray | torch.Tensor
C = TypeVar("C", ClassConditioner, LayoutEncoder, SemanticEncoder)


@dataclass(frozen=True)
class SampleSpec:
    """What varies per item in a batch."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    guidance_scale: float = 7.5
    #: LoRA adapters and their weights (models/lora.py), applied to this item only
    adapters: AdapterSet = ()
    #: SDXL's micro-conditioning (ignored by other families): original and target size (height, width) in
    #: pixels, None = the image's size; the crop's top-left corner; the refiner's aesthetic scores
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class RunSettings:
    """What one batch shares. width/height None = the model's default size."""

    sampler: SamplerName = "dpmpp_2m"
    steps: int = 20
    width: int | None = None
    height: int | None = None
    karras: bool = False
    eta: float = 0.0
    strength: float = 0.75  # img2img (and blended inpainting): 1.0 = start from pure noise
    #: txt2img with the pipeline's refiner: the fraction of the schedule the base model denoises before the
    #: refiner takes over (diffusers' denoising_end on the base = denoising_start on the refiner); None = no refiner
    refiner_switch: float | None = None
    #: upscale with the SD x4 upscaler: how much noise its low-resolution input gets (0..the model's
    #: max_noise_level; None = its default, 20). More noise: more detail invented, less fidelity to the input.
    noise_level: int | None = None


@dataclass(frozen=True)
class Started:
    """A batch ready to sample: one `StepSample` per item (key = its index), the caller's warnings, and
    `finish(k, latent)`, item k's image from its final latent [1, C, h, w] (decoded; inpainting pastes the
    known pixels back). `Pipeline.run` samples it alone; a `StepBatch` may run its samples among others."""

    samples: list[StepSample]
    warnings: list[str]
    finish: Callable[[int, torch.Tensor], Image.Image]
    #: the second model's share of the run (SDXL's refiner): final latents of the first part -> final latents
    then: Callable[[torch.Tensor, Progress | None], torch.Tensor] | None = None
    #: the whole run's steps when `then` takes a share of them (progress counts against it)
    total_steps: int | None = None

    def progress_of_first_part(self, progress: Progress | None) -> Progress | None:
        """`progress` with the whole run's step count as total, for the first model's share of the steps."""
        total = self.total_steps
        if progress is None or total is None:
            return progress
        return lambda i, _: progress(i, total)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    #: things the caller should tell the user (e.g. a prompt truncated to the encoder's limit)
    warnings: list[str] = field(default_factory=list)


class Pipeline:
    """Runs a loaded model; holds no per-request state, so one instance serves every request."""

    def __init__(self, model: LatentDiffusion, *, optimize: bool = True, winograd: WinogradPolicy = "balanced",
                 gpu: GpuMode = "graphs", prompt_syntax: PromptSyntax = "plain",
                 embeddings: EmbeddingDB | Sequence[EmbeddingDB] | None = None,
                 refiner: LatentDiffusion | None = None) -> None:
        """`optimize` (on the CPU): prepack conv weights and use channels_last, in place (see
        models/cpu_inference.py). It is faster, and its convolutions round the same for every batch
        size, which with models/layers.py makes an image bit-identical alone or in any batch. The
        model is then inference-only: save it before. `winograd`: which UNet and VAE convolutions the CPU path
        computes by Winograd's F(2x2, 3x3) (models.names.WINOGRAD_POLICIES; docs/benchmarks.md has each one's speed
        and memory).
        On a GPU, `optimize` runs channels_last and the UNet by `gpu` (models.names.GPU_MODES: CUDA graphs per
        input bucket by default, models/gpu_inference.py).

        `prompt_syntax`: how a CLIP text encoder reads prompts (models/prompt_weighting.py): `plain` as
        diffusers, `a1111` AUTOMATIC1111's emphasis, BREAK and 75-token chunks; other encoders read them as
        they are. `embeddings`: textual-inversion embeddings prompts may name (models/textual_inversion.py), one
        EmbeddingDB per CLIP text encoder (`load_embeddings_dir`): each encoder takes the one of its key (SINGLE;
        SDXL's `clip_l` / `clip_g`), so the base's pair serves its refiner too (`clip_g`)."""
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES}, got {prompt_syntax!r}")
        if optimize and model.device.type == "cpu":
            optimize_for_cpu_inference(model, winograd)
        elif optimize and model.device.type == "cuda":
            optimize_for_gpu_inference(model, gpu)
        self.model = model
        self.prompt_syntax = prompt_syntax
        dbs = () if embeddings is None else (embeddings,) if isinstance(embeddings, EmbeddingDB) else tuple(embeddings)
        self.embeddings: tuple[EmbeddingDB, ...] = dbs
        self._encoder_embeddings = _embeddings_by_encoder(model, dbs)
        #: SDXL's refiner, which finishes txt2img runs whose settings give a `refiner_switch`
        self.refiner = (Pipeline(refiner, optimize=optimize, winograd=winograd, gpu=gpu,
                                 prompt_syntax=prompt_syntax, embeddings=dbs) if refiner is not None else None)

    # ------------------------------------------------------------------ public tasks

    def txt2img(self, specs: Sequence[SampleSpec], settings: RunSettings,
                progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_txt2img(specs, settings), progress, watch=watch)

    def img2img(self, specs: Sequence[SampleSpec], settings: RunSettings, images: Sequence[Image.Image],
                progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_img2img(specs, settings, images), progress, watch=watch)

    def inpaint(self, specs: Sequence[SampleSpec], settings: RunSettings, images: Sequence[Image.Image],
                masks: Sequence[Image.Image], progress: Progress | None = None,
                watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_inpaint(specs, settings, images, masks), progress, watch=watch)

    def upscale(self, specs: Sequence[SampleSpec], settings: RunSettings, images: Sequence[Image.Image],
                progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_upscale(specs, settings, images), progress, watch=watch)

    def class2img(self, specs: Sequence[SampleSpec], settings: RunSettings, labels: Sequence[int | str],
                  progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_class2img(specs, settings, labels), progress, watch=watch)

    def layout2img(self, specs: Sequence[SampleSpec], settings: RunSettings, layouts: Sequence[Sequence[Box]],
                   progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_layout2img(specs, settings, layouts), progress, watch=watch)

    def semantic2img(self, specs: Sequence[SampleSpec], settings: RunSettings, maps: Sequence[LabelMap],
                     progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_semantic2img(specs, settings, maps), progress, watch=watch)

    def unconditional(self, specs: Sequence[SampleSpec], settings: RunSettings,
                      progress: Progress | None = None, watch: Watch | None = None) -> GenerationResult:
        return self.run(self.start_unconditional(specs, settings), progress, watch=watch)

    def run(self, started: Started, progress: Progress | None = None, *,
            watch: Watch | None = None) -> GenerationResult:
        """Sample a started batch to its end (one `StepBatch` with no one joining) and make its images."""
        latents = self.run_samples(started.samples, started.progress_of_first_part(progress),
                                   watch=watch)
        if started.then is not None:
            latents = started.then(latents, progress)
        return GenerationResult([started.finish(k, latents[k : k + 1]) for k in range(len(latents))],
                                started.warnings)

    def run_samples(self, samples: Sequence[StepSample], progress: Progress | None = None, *,
                    watch: Watch | None = None) -> torch.Tensor:
        """The final latents [N, C, h, w] of samples that share one plan length, stepped together. `watch` sees
        each step's advanced samples (it only reads them: the images are the same with or without it)."""
        final = {s.key: s.latent for s in samples if s.state.done}  # an empty img2img plan: the input
        groups: dict[tuple[object, ...], list[StepSample]] = {}
        for s in samples:
            if not s.state.done:  # samples whose contexts differ in length (A1111 prompt chunks) run apart
                groups.setdefault(s.signature, []).append(s)
        for group in groups.values():
            batch = StepBatch(self.denoiser, max_items=len(group), around=self.adapters_for)
            for s in group:
                batch.admit(s)
            while len(batch):
                advanced = batch.step()
                final |= {s.key: s.latent for s in advanced if s.state.done}
                if advanced and watch is not None:
                    watch(advanced)
                if advanced and progress is not None:
                    progress(advanced[0].state.i, advanced[0].state.plan.steps)
        return torch.cat([final[s.key] for s in samples])

    def adapters_for(self, samples: Sequence[StepSample]) -> AbstractContextManager[None]:
        """Each sample's LoRA adapters on its own rows for one denoiser call (what `StepBatch` wraps it in)."""
        return adapters_applied(self.model, [s.adapters for s in samples])

    @property
    def denoiser(self) -> Denoiser:
        """The model's guided eps over one step's rows (what a `StepBatch` of this model calls)."""
        return guided_denoiser(self.model.unet, self.model.schedule)

    # ------------------------------------------------------------------ tasks, started (not yet sampled)

    def start_txt2img(self, specs: Sequence[SampleSpec], settings: RunSettings) -> Started:
        return self._start(specs, settings, self.size(settings))

    def start_img2img(self, specs: Sequence[SampleSpec], settings: RunSettings,
                      images: Sequence[Image.Image]) -> Started:
        """SDEdit: noise the encoded image to `strength` and denoise it with the prompt."""
        pixels = self._pixels(images, len(specs))
        return self._start(specs, settings, pixels.shape[-2:], init=self._encode(pixels))

    def start_inpaint(self, specs: Sequence[SampleSpec], settings: RunSettings, images: Sequence[Image.Image],
                      masks: Sequence[Image.Image]) -> Started:
        """Repaint the white part of each mask; pixels outside it are returned exactly.

        Inpainting checkpoints (9-channel UNet: SD 1/2 and SDXL inpainting) get the mask and the masked image's
        latent as concat inputs and start from pure noise, as diffusers' inpainting pipelines at strength 1: each
        item's generator draws its initial noise, then its masked image's latent, a sample of the VAE's posterior
        (diffusers' `prepare_latents`, then `prepare_mask_latents`). Any other text-to-image model is used by
        blending: after every step the known region is replaced by the image's latent noised to the current
        level; `settings.strength` < 1 starts from the image noised to that strength, 1.0 (diffusers' default
        for inpainting) from pure noise.
        """
        pixels = self._pixels(images, len(specs))
        mask = mask_to_tensor(masks)
        if mask.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from image size {tuple(pixels.shape[-2:])}")
        latent_size = tuple(s // self.model.config.downsample_factor for s in pixels.shape[-2:])
        mask_latent = F.interpolate(mask, size=latent_size)  # nearest, as the original and diffusers
        device, dtype = self.model.device, self.model.dtype
        if self.model.config.concat_input == "masked_image":
            concat = self._masked_image_concat(pixels, mask, latent_size)
            started = self._start(specs, settings, pixels.shape[-2:], concat=concat)
        elif self.model.config.concat_input == "inpaint":
            generators = generators_from_seeds([s.seed for s in specs])
            noise = self._initial_noise(len(specs), pixels.shape[-2:], generators)
            masked = self._encode(pixels * (mask < 0.5), generators)
            concat = torch.cat([mask_latent.to(device, dtype), masked], dim=1)
            started = self._start(specs, settings, pixels.shape[-2:], concat=concat, generators=generators,
                                  noise=noise)
        else:
            started = self._start(specs, settings, pixels.shape[-2:], init=self._encode(pixels),
                                  blend_mask=mask_latent.to(device, dtype))
        decode = started.finish

        def pasted(k: int, latents: torch.Tensor) -> Image.Image:
            m = mask[k : k + 1]
            return to_pil(pixels[k : k + 1] * (1 - m) + to_tensor([decode(k, latents)]) * m)[0]

        return replace(started, finish=pasted)

    def _masked_image_concat(self, pixels: torch.Tensor, mask: torch.Tensor,
                             latent_size: tuple[int, ...]) -> torch.Tensor:
        """The CompVis zoo's inpainting input (scripts/inpaint.py): masked = (1 - m) image in [0, 1], then every
        input mapped x -> 2x - 1 (the hole is -1, the mask +-1); c = [first-stage encoding of the masked image
        (quant_conv output: not quantised, not scaled), the mask resized to the latent (nearest)]."""
        device, dtype = self.model.device, self.model.dtype
        masked = (1 - mask) * (pixels + 1) - 1  # 2 ((1 - m) (x + 1) / 2) - 1
        with torch.inference_mode():
            encoded = self.model.autoencoder.encode(masked.to(device, dtype))
            if not isinstance(encoded, torch.Tensor):
                encoded = encoded.mode()
        mask_pm = F.interpolate(mask * 2 - 1, size=latent_size)
        return torch.cat([encoded, mask_pm.to(device, dtype)], dim=1)

    def start_upscale(self, specs: Sequence[SampleSpec], settings: RunSettings,
                      images: Sequence[Image.Image]) -> Started:
        """Super-resolution: the low-res image [-1, 1] is a concat input at latent size. LDM-SR (CompVis) takes it as
        it is; the SD x4 upscaler takes it noised to `settings.noise_level` by its low-resolution schedule, with the
        level as the UNet's class label (diffusers' StableDiffusionUpscalePipeline: each item's generator draws
        that noise first, then the initial latents)."""
        config = self.model.config
        if config.concat_input != "lowres":
            raise UnsupportedTask(f"model {config.name!r} is not a super-resolution model")
        low = self._pixels(images, len(specs)).to(self.model.device, self.model.dtype)
        f = config.downsample_factor
        size = (low.shape[-2] * f, low.shape[-1] * f)
        if config.lowres_noise is None:
            if settings.noise_level is not None:
                raise ValueError(f"noise_level applies to the SD x4 upscaler only; model {config.name!r} takes its "
                                 "low-resolution input without noise")
            return self._start(specs, settings, size, concat=low)
        level = config.default_noise_level if settings.noise_level is None else settings.noise_level
        if not 0 <= level <= config.max_noise_level:
            raise ValueError(f"noise_level must be within 0..{config.max_noise_level} for model {config.name!r}, "
                             f"got {level}")
        generators = generators_from_seeds([s.seed for s in specs])
        noise = randn_per_item(low.shape, generators, device=low.device, dtype=low.dtype)
        levels = torch.full((len(specs),), level, dtype=torch.long)
        concat = q_sample(NoiseSchedule.from_config(config.lowres_noise), low, levels, noise)
        started = self._start(specs, settings, size, concat=concat, generators=generators)
        label = levels[:1].to(self.model.device)
        samples = [replace(s, cond=replace(s.cond, class_labels=label), uncond=replace(s.uncond, class_labels=label))
                   for s in started.samples]
        return replace(started, samples=samples)

    def start_class2img(self, specs: Sequence[SampleSpec], settings: RunSettings,
                        labels: Sequence[int | str]) -> Started:
        """Class-conditional synthesis: one class per item, an id or a name ("red circle"); prompts are unused."""
        conditioner = self._conditioner(ClassConditioner, "class-conditional", "class2img")
        self._one_each(labels, specs, "class label")
        ids = [resolve_label(label, conditioner.class_names, conditioner.n_classes, f"class label {i}")
               for i, label in enumerate(labels)]
        if conditioner.null_class is None:
            _refuse_guidance(specs, f"model {self.model.config.name!r} has no null class (its class embedding has "
                             f"{conditioner.n_classes} rows, every one a class), which classifier-free guidance "
                             "needs")
        with torch.inference_mode():
            cond = conditioner.encode(ids).context
            uncond = (cond if conditioner.null_class is None
                      else conditioner.encode([conditioner.null_class] * len(ids)).context)
        return self._start(specs, settings, self.size(settings),
                           conditions=(self._placed(cond), self._placed(uncond)))

    def start_layout2img(self, specs: Sequence[SampleSpec], settings: RunSettings,
                         layouts: Sequence[Sequence[Box]]) -> Started:
        """Layout-to-image: one list of boxes per item (`models.conditioning.parse_layout` reads JSON)."""
        if isinstance(self.model.conditioner, BoxTokenConditioner):
            return self._box_layout2img(specs, settings, layouts, self.model.conditioner)
        encoder = self._conditioner(LayoutEncoder, "layout-to-image", "layout2img")
        self._one_each(layouts, specs, "layout")
        size = self.size(settings)
        with torch.inference_mode():
            cond = encoder.encode_layouts(layouts, size)
            uncond = encoder.encode_layouts([[] for _ in layouts], size)
        return self._start(specs, settings, size, conditions=(self._placed(*cond), self._placed(*uncond)))

    def _box_layout2img(self, specs: Sequence[SampleSpec], settings: RunSettings, layouts: Sequence[Sequence[Box]],
                        conditioner: BoxTokenConditioner) -> Started:
        """The CompVis zoo's layout2img: boxes -> taming's box tokens -> BERTEmbedder context; unguided (the
        model has no null layout)."""
        self._one_each(layouts, specs, "layout")
        _refuse_guidance(specs, f"model {self.model.config.name!r} has no null layout (the original samples it "
                         "conditionally only), which classifier-free guidance needs")
        with torch.inference_mode():
            context = self._placed(conditioner.encode_layouts(layouts))
        return self._start(specs, settings, self.size(settings), conditions=(context, context))

    def start_semantic2img(self, specs: Sequence[SampleSpec], settings: RunSettings,
                           maps: Sequence[LabelMap]) -> Started:
        """Semantic synthesis: one label map per item (0 = background, 1..K = classes), all of one size, which
        is the output size (width/height in `settings`, when given, must equal it)."""
        if isinstance(self.model.conditioner, SpatialRescaler):
            return self._rescaled_map2img(specs, settings, maps, self.model.conditioner)
        encoder = self._conditioner(SemanticEncoder, "semantic-synthesis", "semantic2img")
        self._one_each(maps, specs, "label map")
        labels = label_map_tensor(maps, encoder.n_classes)  # [N, H, W]
        height, width = labels.shape[-2:]
        asked = (height if settings.height is None else settings.height,
                 width if settings.width is None else settings.width)
        if asked != (height, width):
            raise ConditionError(f"the label map is {width}x{height}, but {asked[1]}x{asked[0]} was asked for: the "
                                 "map sets the image size")
        f = self.model.config.downsample_factor
        if height % f or width % f:
            raise ConditionError(f"label map size {width}x{height} is not a multiple of {f}")
        with torch.inference_mode():
            cond = encoder(labels.to(self.model.device))
            uncond = encoder.null(len(specs), height, width)
        pair = (Conditioning(concat=cond), Conditioning(concat=uncond))
        return self._start(specs, settings, (height, width), conditions=pair)

    def _rescaled_map2img(self, specs: Sequence[SampleSpec], settings: RunSettings, maps: Sequence[LabelMap],
                          rescaler: SpatialRescaler) -> Started:
        """The CompVis zoo's semantic synthesis: mode-L maps (pixel = label) -> one-hot -> SpatialRescaler,
        concatenated to the latent; unguided (the original has no null map): a scale but 1 is refused. The map sets
        the size."""
        self._one_each(maps, specs, "label map")
        one_hot = rescaler.one_hot(maps)  # [N, K, H, W]
        height, width = one_hot.shape[-2:]
        f = self.model.config.downsample_factor
        if height % f or width % f:
            raise ConditionError(f"label map size {width}x{height} is not a multiple of {f}")
        with torch.inference_mode():
            concat = rescaler(one_hot.to(self.model.device, self.model.dtype))
        asked = (settings.height or height, settings.width or width)
        if asked != (height, width):
            raise ConditionError(f"the label map sets the image size {width}x{height}, but {asked[1]}x{asked[0]} "
                                 "was asked for")
        _refuse_guidance(specs, f"model {self.model.config.name!r} has no null label map (the original samples it "
                                "unguided)")
        return self._start(specs, settings, (height, width), concat=concat)

    def start_unconditional(self, specs: Sequence[SampleSpec], settings: RunSettings) -> Started:
        """Samples of the model's own distribution, unguided (guidance scales are ignored): an unconditional
        model, or a conditional one on its null condition (null class, empty layout, unknown map, "" prompt)."""
        specs = [replace(s, prompt="", negative_prompt="", guidance_scale=1.0) for s in specs]
        conditioner, size = self.model.conditioner, self.size(settings)
        if conditioner is None or self.model.config.conditioning not in ("crossattn", "hybrid", "concat"):
            return self._start(specs, settings, size)
        null_class = conditioner.null_class if isinstance(conditioner, ClassConditioner) else None
        if isinstance(conditioner, BoxTokenConditioner) or (isinstance(conditioner, ClassConditioner)
                                                            and null_class is None):
            raise UnsupportedTask(f"model {self.model.config.name!r} has no null condition (no null class or empty "
                                  "layout): it cannot sample unconditionally")
        if isinstance(conditioner, ClassConditioner) and null_class is not None:
            with torch.inference_mode():
                null = conditioner.encode([null_class] * len(specs)).context
            return self._start(specs, settings, size, conditions=(self._placed(null),) * 2)
        if isinstance(conditioner, LayoutEncoder):
            with torch.inference_mode():
                empty = conditioner.encode_layouts([[] for _ in specs], size)
            return self._start(specs, settings, size, conditions=(self._placed(*empty),) * 2)
        if isinstance(conditioner, SemanticEncoder):
            with torch.inference_mode():
                plain = Conditioning(concat=conditioner.null(len(specs), *size))
            return self._start(specs, settings, size, conditions=(plain, plain))
        return self.start_txt2img(specs, settings)

    def _conditioner(self, cls: type[C], what: str, method: str) -> C:
        conditioner = self.model.conditioner
        if not isinstance(conditioner, cls):
            kind = self.model.config.conditioner.kind if self.model.config.conditioner else "unconditional"
            raise UnsupportedTask(f"model {self.model.config.name!r} is not a {what} model ({method} needs one); "
                                  f"it is conditioned on: {kind}")
        return conditioner

    @staticmethod
    def _one_each(conditions: Sequence[object], specs: Sequence[SampleSpec], what: str) -> None:
        if len(conditions) != len(specs):
            raise ValueError(f"need one {what} per item: {len(specs)} items, {len(conditions)} {what}s")

    def _placed(self, context: torch.Tensor | None = None, concat: torch.Tensor | None = None) -> Conditioning:
        """A conditioning with its tensors on the model's device, in its dtype."""
        device, dtype = self.model.device, self.model.dtype
        return Conditioning(context=None if context is None else context.to(device, dtype),
                            concat=None if concat is None else concat.to(device, dtype))

    # ------------------------------------------------------------------ the shared core

    def sample_latents(self, specs: Sequence[SampleSpec], settings: RunSettings, size: Sequence[int], *,
                       init: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                       blend_mask: torch.Tensor | None = None,
                       conditions: tuple[Conditioning, Conditioning] | None = None,
                       progress: Progress | None = None) -> tuple[torch.Tensor, list[str]]:
        """Final latents [N, C, h, w] of a batch and the caller's warnings (arguments as `_start`'s)."""
        started = self._start(specs, settings, size, init=init, concat=concat, blend_mask=blend_mask,
                              conditions=conditions)
        latents = self.run_samples(started.samples, started.progress_of_first_part(progress))
        return (latents if started.then is None else started.then(latents, progress)), started.warnings

    @torch.inference_mode()
    def _start(self, specs: Sequence[SampleSpec], settings: RunSettings, size: Sequence[int], *,
               init: torch.Tensor | None = None, concat: torch.Tensor | None = None,
               blend_mask: torch.Tensor | None = None,
               conditions: tuple[Conditioning, Conditioning] | None = None,
               generators: Sequence[torch.Generator] | None = None, noise: torch.Tensor | None = None) -> Started:
        """What every task's sampling starts from: one `StepSample` per item (key = its index).

        `size` is in pixels; `init` holds scaled latents of input images (img2img, blended inpainting),
        `concat` the UNet's extra input channels, `blend_mask` (1 = repaint) the latent-size mask;
        `conditions` (conditional, unconditional) replaces the prompts' encoding (class, layout, semantic).
        Each item's LoRA adapters act on its own text encoding and UNet rows only (`StepSample.adapters`).
        `generators`: the items' generators when the caller drew from them first (the x4 upscaler's input noise);
        None: fresh ones seeded with the items' seeds. `noise`: the initial noise, when the caller drew it from
        `generators` before drawing something else (`_initial_noise`; inpainting models' posterior samples).
        """
        if not specs:
            raise ValueError("a batch needs at least one item")
        if not 1 <= settings.steps <= MAX_STEPS:
            raise ValueError(f"steps must be within 1..{MAX_STEPS}, got {settings.steps}")
        model, config = self.model, self.model.config
        if not isinstance(model.conditioner, SDXLTextConditioner):
            _refuse_micro_conditioning(specs, config.name)
        _require_concat(config, concat if conditions is None else conditions[0].concat)
        generators = list(generators) if generators is not None else generators_from_seeds([s.seed for s in specs])
        if noise is None:
            noise = self._initial_noise(len(specs), size, generators)
        plan = sampling_plan(settings.sampler, model.schedule, settings.steps, karras=settings.karras)
        if init is not None:
            plan = plan.from_strength(settings.strength)
        then: Callable[[torch.Tensor, Progress | None], torch.Tensor] | None = None
        finish: Callable[[int, torch.Tensor], Image.Image] = self._decode
        if settings.refiner_switch is not None:
            if init is not None or concat is not None or conditions is not None:
                raise UnsupportedTask("a refiner continues txt2img runs only")
            plan, then, finish = self._refined(specs, settings, size, plan, generators)
            default = SampleSpec()  # the aesthetic scores are the refiner's; the base is conditioned on sizes
            specs = [replace(s, aesthetic_score=default.aesthetic_score,
                             negative_aesthetic_score=default.negative_aesthetic_score) for s in specs]
        if conditions is None:
            conds, unconds, warnings = self._item_conditionings(specs, concat, size)
        else:
            n = len(specs)
            conds = [conditions[0].rows(slice(k, k + 1)) for k in range(n)]
            unconds = [conditions[1].rows(slice(k, k + 1)) for k in range(n)]
            warnings = []
        # img2img starts from the image noised to the first kept level (diffusers' rule, strength 1.0
        # included; an empty plan returns the image); blended inpainting at strength 1.0 and the concat
        # tasks start from pure noise.
        from_image = init is not None and (blend_mask is None or settings.strength < 1.0)
        x = noise
        if from_image and init is not None:
            x = plan.noise(0, init, noise) if plan.steps else init
        # guidance needs a prompt to steer by: without one, cond == uncond and doubling the batch is waste
        text = model.conditioner is not None and config.conditioning in ("crossattn", "hybrid")
        guided = text or conditions is not None
        samples = []
        for k, spec in enumerate(specs):
            one = slice(k, k + 1)
            blend = None
            if blend_mask is not None and init is not None:
                blend = _blender(plan, init[one], noise[one], blend_mask[one])
            state = init_state(plan, x[one], generators=[generators[k]], eta=settings.eta)
            samples.append(StepSample(k, state, conds[k], unconds[k],
                                      spec.guidance_scale if guided else 1.0, blend, spec.adapters))
        return Started(samples, warnings, finish, then, None if then is None else settings.steps)

    def _refined(self, specs: Sequence[SampleSpec], settings: RunSettings, size: Sequence[int],
                 plan: SamplingPlan, generators: Sequence[torch.Generator],
                 ) -> tuple[SamplingPlan, Callable[[torch.Tensor, Progress | None], torch.Tensor],
                            Callable[[int, torch.Tensor], Image.Image]]:
        """The base's share of `plan`, the refiner's run on the rest, and the refiner's decoder (diffusers'
        base(denoising_end=f) then refiner(denoising_start=f) on the latents, no noise added). The refiner gets
        the items' prompts and guidance, its own micro-conditioning (aesthetic scores), no LoRA adapters, and
        the items' generators where the base left them; its sampler state starts afresh, as diffusers' does."""
        refiner = self.refiner
        if refiner is None:
            raise UnsupportedTask("refiner_switch needs a pipeline with a refiner model")
        assert settings.refiner_switch is not None
        if refiner.model.config.schedule != self.model.config.schedule:
            raise UnsupportedTask(f"the refiner's noise schedule {refiner.model.config.schedule} is not the base's "
                                  f"{self.model.config.schedule}: one run cannot hand over between them")
        switch = plan.switch_index(settings.refiner_switch, self.model.schedule.num_train_timesteps)
        rest = plan.between(switch, plan.steps)
        plain = [replace(s, adapters=(), target_size=None) for s in specs]  # the refiner has no target size

        def then(latents: torch.Tensor, progress: Progress | None) -> torch.Tensor:
            x = latents.to(refiner.model.device, refiner.model.dtype)
            with torch.inference_mode():
                conds, unconds, _ = refiner._item_conditionings(plain, None, size)
                samples = [StepSample(k, init_state(rest, x[k : k + 1], generators=[generators[k]], eta=settings.eta),
                                      conds[k], unconds[k], s.guidance_scale)
                           for k, s in enumerate(plain)]

            def shifted(i: int, total: int) -> None:
                if progress is not None:
                    progress(switch + i, plan.steps)

            return refiner.run_samples(samples, shifted)

        return plan.between(0, switch), then, refiner._decode

    def _decode(self, k: int, latents: torch.Tensor) -> Image.Image:
        """One item's image from its final latent [1, C, h, w] (one at a time: less memory, as diffusers'
        VAE slicing; the same pixels)."""
        with torch.inference_mode():
            return to_pil(self.model.decode_latents(latents))[0]

    def _item_conditionings(self, specs: Sequence[SampleSpec], concat: torch.Tensor | None,
                            size: Sequence[int]) -> tuple[list[Conditioning], list[Conditioning], list[str]]:
        """Each item's conditioning on its prompt and on its negative prompt: CLIP prompts in A1111's syntax or
        naming embeddings one by one (their lengths are their chunk counts'), others as one batch."""
        conditioner = self.model.conditioner
        one_by_one = self.prompt_syntax == "a1111" or any(self._encoder_embeddings)
        if isinstance(conditioner, SDXLTextConditioner) and one_by_one:
            return self._sdxl_one_by_one(conditioner, specs, concat, size)
        if (isinstance(conditioner, CLIPTextConditioner) and self.model.config.conditioning in ("crossattn", "hybrid")
                and one_by_one):
            return self._encoded_one_by_one(conditioner, specs, concat)
        cond, uncond, warnings = self._conditioning(specs, concat, size)
        rows = [slice(k, k + 1) for k in range(len(specs))]
        return [cond.rows(r) for r in rows], [uncond.rows(r) for r in rows], warnings

    def _conditioning(self, specs: Sequence[SampleSpec], concat: torch.Tensor | None,
                      size: Sequence[int]) -> tuple[Conditioning, Conditioning, list[str]]:
        """Cross-attention context for the prompts and for the negative prompts ("" = unconditional), as one
        batch (each item's LoRA adapters on its own text-encoder rows)."""
        conditioner = self.model.conditioner
        if isinstance(conditioner, SDXLTextConditioner):
            return self._sdxl_conditioning(conditioner, specs, concat, size)
        if conditioner is None or self.model.config.conditioning not in ("crossattn", "hybrid"):
            plain = Conditioning(concat=concat)
            return plain, plain, []
        if isinstance(conditioner, LayoutEncoder | BoxTokenConditioner):
            raise UnsupportedTask(f"model {self.model.config.name!r} is a layout-to-image model: use layout2img")
        with adapters_applied(self.model, [s.adapters for s in specs]):
            # two calls, as diffusers encodes them, so that a warning's "prompt i" is item i of its list
            positive = conditioner.encode([s.prompt for s in specs])
            negative = conditioner.encode([s.negative_prompt for s in specs])
        warnings = [*positive.warnings, *(f"negative {w}" for w in negative.warnings)]
        device, dtype = self.model.device, self.model.dtype
        cond = Conditioning(context=positive.context.to(device, dtype), concat=concat)
        return cond, Conditioning(context=negative.context.to(device, dtype), concat=concat), warnings

    def _encoded_one_by_one(self, conditioner: CLIPTextConditioner, specs: Sequence[SampleSpec],
                            concat: torch.Tensor | None) -> tuple[list[Conditioning], list[Conditioning], list[str]]:
        """Prompts in A1111's syntax or naming embeddings: each on its own (its context's length is its chunk
        count's), with its own adapters."""
        device, dtype = self.model.device, self.model.dtype
        conds, unconds, warnings = [], [], []
        for k, spec in enumerate(specs):
            extra = None if concat is None else concat[k : k + 1]
            with adapters_applied(self.model, [spec.adapters]):
                pair = [encode_prompt(conditioner, text, syntax=self.prompt_syntax,
                                      embeddings=self._encoder_embeddings[0])
                        for text in (spec.prompt, spec.negative_prompt)]
            (cond, cond_warnings), (uncond, uncond_warnings) = pair
            warnings += [f"prompt {k}: {w}" for w in cond_warnings] + [f"negative prompt {k}: {w}"
                                                                       for w in uncond_warnings]
            conds.append(Conditioning(context=cond.to(device, dtype), concat=extra))
            unconds.append(Conditioning(context=uncond.to(device, dtype), concat=extra))
        return conds, unconds, warnings

    def _sdxl_conditioning(self, conditioner: SDXLTextConditioner, specs: Sequence[SampleSpec],
                           concat: torch.Tensor | None,
                           size: Sequence[int]) -> tuple[Conditioning, Conditioning, list[str]]:
        """SDXL: context and added vector (pooled text + micro-conditioning) for prompts and negative prompts.
        An empty negative prompt is zeros (context and pooled) when the model's config says
        `force_zeros_for_empty_prompt`, as diffusers does for a missing one; its micro-conditioning is the
        prompt's, but for the refiner's negative aesthetic score."""
        self._check_micro(conditioner, specs)
        with adapters_applied(self.model, [s.adapters for s in specs]):  # each item's on its own rows, both encoders
            positive = conditioner.encode([s.prompt for s in specs])
            negative = conditioner.encode([s.negative_prompt for s in specs])
        warnings = [*positive.warnings, *(f"negative {w}" for w in negative.warnings)]
        assert positive.pooled is not None and negative.pooled is not None
        cond, uncond = self._sdxl_pair(conditioner, specs, concat, size, (positive.context, positive.pooled),
                                       (negative.context, negative.pooled))
        return cond, uncond, warnings

    def _check_micro(self, conditioner: SDXLTextConditioner, specs: Sequence[SampleSpec]) -> None:
        """The micro-conditioning this SDXL model does not take (the base: aesthetic scores; the refiner: target
        size), refused by name when an item sets it."""
        default, model = SampleSpec(), self.model.config.name
        unused = ("aesthetic_score", "negative_aesthetic_score") if conditioner.config.micro == "size" else (
            "target_size",)
        for name in unused:
            if any(getattr(s, name) != getattr(default, name) for s in specs):
                raise UnsupportedTask(f"model {model!r} ({self.model.config.family}) is not conditioned on {name}")

    def _sdxl_pair(self, conditioner: SDXLTextConditioner, specs: Sequence[SampleSpec], concat: torch.Tensor | None,
                   size: Sequence[int], positive: tuple[torch.Tensor, torch.Tensor],
                   negative: tuple[torch.Tensor, torch.Tensor]) -> tuple[Conditioning, Conditioning]:
        """The items' conditionings from their encoded prompts and negative prompts ((context, pooled) each): the
        empty negative prompts zeroed under `force_zeros_for_empty_prompt`, the added vectors made."""
        text = conditioner.config
        (context, pooled), (neg_context, neg_pooled) = positive, negative
        if text.force_zeros_for_empty_prompt:
            keep = torch.tensor([s.negative_prompt != "" for s in specs], device=neg_context.device)
            neg_context = neg_context * keep[:, None, None].to(neg_context.dtype)
            neg_pooled = neg_pooled * keep[:, None].to(neg_pooled.dtype)
        micro = [_micro(s, size, text.micro) for s in specs]
        device, dtype = self.model.device, self.model.dtype
        pos_micro = torch.tensor([m for m, _ in micro], dtype=torch.float32, device=device)
        neg_micro = torch.tensor([m for _, m in micro], dtype=torch.float32, device=device)
        cond = Conditioning(context=context.to(device, dtype), concat=concat,
                            vector=added_vector(pooled, pos_micro, text.time_embed_dim).to(device, dtype))
        uncond = Conditioning(context=neg_context.to(device, dtype), concat=concat,
                              vector=added_vector(neg_pooled, neg_micro, text.time_embed_dim).to(device, dtype))
        return cond, uncond

    def _sdxl_one_by_one(self, conditioner: SDXLTextConditioner, specs: Sequence[SampleSpec],
                         concat: torch.Tensor | None,
                         size: Sequence[int]) -> tuple[list[Conditioning], list[Conditioning], list[str]]:
        """SDXL prompts in A1111's syntax or naming embeddings, each on its own with its own adapters
        (`encode_sdxl_prompt`: both encoders get the same weighted chunks, the pooled vector is the first
        chunk's)."""
        self._check_micro(conditioner, specs)
        conds, unconds, warnings = [], [], []
        for k, spec in enumerate(specs):
            extra = None if concat is None else concat[k : k + 1]
            with adapters_applied(self.model, [spec.adapters]):
                positive, negative = [encode_sdxl_prompt(conditioner, text, syntax=self.prompt_syntax,
                                                         embeddings=self._encoder_embeddings)
                                      for text in (spec.prompt, spec.negative_prompt)]
            warnings += [f"prompt {k}: {w}" for w in positive[2]] + [f"negative prompt {k}: {w}" for w in negative[2]]
            cond, uncond = self._sdxl_pair(conditioner, [spec], extra, size, positive[:2], negative[:2])
            conds.append(cond)
            unconds.append(uncond)
        return conds, unconds, warnings

    # ------------------------------------------------------------------ helpers

    def size(self, settings: RunSettings) -> tuple[int, int]:
        """(height, width) in pixels for a txt2img batch, checked against the model's factor."""
        default = self.model.config.default_size
        width = default if settings.width is None else settings.width  # 0 is an error, not "the default"
        height = default if settings.height is None else settings.height
        f = self.model.config.downsample_factor
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % f:
                raise ValueError(f"{name} must be a positive multiple of {f} for this model, got {value}")
        return height, width

    def _pixels(self, images: Sequence[Image.Image], n: int) -> torch.Tensor:
        if len(images) != n:
            raise ValueError(f"need one image per item: {n} items, {len(images)} images")
        pixels = to_tensor(images)
        f = self.model.config.downsample_factor
        if pixels.shape[-1] % f or pixels.shape[-2] % f:
            raise ValueError(f"image size {pixels.shape[-1]}x{pixels.shape[-2]} is not a multiple of {f}")
        return pixels

    def _initial_noise(self, n: int, size: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """x_T [n, C, h, w] for images of `size` pixels, item i from `generators[i]`."""
        config = self.model.config
        f = config.downsample_factor
        shape = (n, config.latent_channels, size[0] // f, size[1] // f)
        return randn_per_item(shape, generators, device=self.model.device, dtype=self.model.dtype)

    def _encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1], one at a time: the posterior mean, or with `generators` (one per
        image) a sample of it, as diffusers' pipelines encode."""
        with torch.inference_mode():
            pixels = pixels.to(self.model.device, self.model.dtype)
            return torch.cat([self.model.encode_images(pixels[i : i + 1],
                                                       None if generators is None else [generators[i]])
                              for i in range(len(pixels))])


def _refuse_guidance(specs: Sequence[SampleSpec], why: str) -> None:
    """A model without an unconditional input samples unguided: any scale but 1 is an error naming `why`."""
    guided = sorted({s.guidance_scale for s in specs if s.guidance_scale != 1.0})
    if guided:
        raise ConditionError(f"guidance scale {guided[0]:g} needs an unconditional input, but {why}: sample it with "
                             "guidance 1 (no classifier-free guidance)")


class UnsupportedTask(ValueError):
    """The model cannot do the task asked (e.g. upscaling with a text-to-image model)."""


def check_refiner(model: LatentDiffusion, refiner: LatentDiffusion) -> None:
    """A refiner finishes an SDXL base's txt2img runs on its latents: both SDXL (the refiner model, or another
    base), with the base's noise schedule and latent space. ValueError naming what does not fit."""
    if model.config.family != "sdxl":
        raise ValueError(f"a refiner finishes an SDXL base model's images; model {model.config.name!r} is "
                         f"{model.config.family}")
    if refiner.config.family not in ("sdxl", "sdxl_refiner"):
        raise ValueError(f"refiner {refiner.config.name!r} is {refiner.config.family}, not an SDXL refiner (or base)")
    if (refiner.config.schedule, refiner.config.latent_channels) != (model.config.schedule,
                                                                     model.config.latent_channels):
        raise ValueError(f"refiner {refiner.config.name!r} has another noise schedule or latent space than "
                         f"{model.config.name!r}: one run cannot hand over between them")


def _require_concat(config: ModelConfig, concat: torch.Tensor | None) -> None:
    """A model with extra UNet inputs run without them: the task to use, named (else a cryptic conv channel-count
    error)."""
    if config.concat_input != "none" and concat is None:
        task = {"inpaint": "an inpainting model: use inpaint", "lowres": "a super-resolution model: use upscale",
                "semantic": "a semantic-synthesis model: use semantic2img",
                "layout": "a layout-to-image model: use layout2img",
                "masked_image": "an inpainting model: use inpaint",
                "rescaled_map": "a semantic-synthesis model: use semantic2img"}
        raise UnsupportedTask(f"model {config.name!r} is {task[config.concat_input]}")


def _refuse_micro_conditioning(specs: Sequence[SampleSpec], model: str) -> None:
    """SDXL's micro-conditioning asked of a model that has none: refused by name, never ignored."""
    default = SampleSpec()
    for name in ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                 "negative_aesthetic_score"):
        if any(getattr(s, name) != getattr(default, name) for s in specs):
            raise UnsupportedTask(f"{name} is SDXL micro-conditioning; model {model!r} is not an SDXL model")


def _micro(spec: SampleSpec, size: Sequence[int], micro: Micro) -> tuple[list[float], list[float]]:
    """An SDXL item's micro-conditioning numbers (prompt's, negative prompt's): original size (h, w), crop
    (top, left), then target size (h, w) for the base or the aesthetic score for the refiner."""
    image = (int(size[0]), int(size[1]))
    head = [*(spec.original_size or image), *spec.crops_coords_top_left]
    if micro == "aesthetic":
        return [float(v) for v in (*head, spec.aesthetic_score)], [float(v) for v in (*head,
                                                                                       spec.negative_aesthetic_score)]
    both = [float(v) for v in (*head, *(spec.target_size or image))]
    return both, list(both)


def _embeddings_by_encoder(model: LatentDiffusion, dbs: Sequence[EmbeddingDB]) -> list[EmbeddingDB | None]:
    """The embeddings of each of the model's CLIP text encoders, picked by key (SD 1/2: SINGLE, SDXL: `clip_l` /
    `clip_g`; None where none was given); ValueError when one is for another width. Empty for other encoders."""
    conditioner = model.conditioner
    if isinstance(conditioner, SDXLTextConditioner):
        keys, widths = conditioner.embedding_keys, [c.hidden_size for c in conditioner.config.encoders]
    elif isinstance(conditioner, CLIPTextConditioner):
        keys, widths = (SINGLE,), [conditioner.context_dim]
    else:
        return []
    by_key = {db.key: db for db in dbs}
    for key, width in zip(keys, widths, strict=True):
        if key in by_key and by_key[key].width != width:
            raise ValueError(f"embeddings {key or 'for one text encoder'!r} are {by_key[key].width} wide; model "
                             f"{model.config.name!r} takes {width}")
    return [by_key.get(key) for key in keys]


def _blender(plan: SamplingPlan, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> AfterStep:
    """Blended inpainting's after-step hook for one item: outside the mask (1 = repaint), the image's latent
    noised to the level just reached (the image itself after the last step)."""

    def blend(i: int, x_next: torch.Tensor) -> torch.Tensor:
        known = init if i + 1 == plan.steps else plan.noise(i + 1, init, noise)
        return known * (1 - mask) + x_next * mask

    return blend
