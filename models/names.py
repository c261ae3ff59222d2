"""The library's names for what it can do: tasks, model kinds and the tasks of each, sampler names, default guidance
scales, dtype names, class-name matching. Defined once here and imported by every part of the library.

This module imports nothing heavy (no torch, no other models module at run time), so command-line parsers can
import it and keep `ldm --help` fast. The service's front ends may not import the model library at all (they must
not load torch), so they hold torch-free copies (`service.schemas.Task`, `Sampler`, `DEFAULT_GUIDANCE`,
`normalise_name`, `service.config`'s dtype names); tests/unit/test_architecture.py checks each copy equal to its
original here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from models.conditioners import ConditionerConfig
    from models.config import ModelConfig

#: what a job or a command makes: from a prompt (txt2img, and img2img, inpaint, upscale with an input image), or
#: from the paper's other conditionings (a class label, a layout, a semantic label map, nothing)
Task = Literal["txt2img", "img2img", "inpaint", "upscale", "class", "unconditional", "semantic", "layout"]
TASKS: tuple[Task, ...] = get_args(Task)
#: the tasks conditioned on something other than a prompt (they take no prompt)
ConditionTask = Literal["class", "unconditional", "semantic", "layout"]
CONDITION_TASKS: tuple[ConditionTask, ...] = get_args(ConditionTask)

#: what a model is trained on and sampled with: a text encoder's output, a class, a layout, a label map, nothing
ConditionKind = Literal["text", "class", "layout", "semantic", "none"]
#: what a model is conditioned on, which decides its tasks: a condition kind, or an inpainting or low-resolution
#: concat input (`models.config.ModelConfig.kind`)
ModelKind = Literal[ConditionKind, "inpaint", "lowres", "semantic_map", "box_layout", "class_only"]
#: the tasks a model can do, by its kind. A text model samples unconditionally through txt2img (an empty prompt at
#: guidance 1), so it does not also offer `unconditional`.
TASKS_BY_KIND: dict[ModelKind, frozenset[Task]] = {
    "text": frozenset({"txt2img", "img2img", "inpaint"}),  # inpainting by latent blending
    "inpaint": frozenset({"inpaint"}),
    "lowres": frozenset({"upscale"}),
    "class": frozenset({"class", "unconditional"}),  # unconditional: the null class
    "layout": frozenset({"layout", "unconditional"}),  # the empty layout
    "semantic": frozenset({"semantic", "unconditional"}),  # the all-unknown map
    "semantic_map": frozenset({"semantic"}),  # the CompVis zoo's SpatialRescaler models: no null map
    "box_layout": frozenset({"layout"}),  # the CompVis zoo's layout2img box tokens: no null layout
    "class_only": frozenset({"class"}),  # the CompVis zoo's cin256: no null class
    "none": frozenset({"unconditional"}),
}
#: a model of each kind, in words (for messages such as "model 'x' is a layout-to-image model")
KIND_DESCRIPTIONS: dict[ModelKind, str] = {
    "text": "a text-to-image model", "inpaint": "an inpainting model", "lowres": "a super-resolution model",
    "class": "a class-conditional model", "layout": "a layout-to-image model", "semantic": "a semantic-synthesis model",
    "semantic_map": "a semantic-synthesis model", "box_layout": "a layout-to-image model",
    "class_only": "a class-conditional model", "none": "an unconditional model"}

#: a task's default classifier-free guidance scale (1 = no guidance). Class: the best of 3, 5 and 7.5 measured on
#: shapes-class; layout: of 2, 3 and 5 on shapes-layout, 3 for its FD at 0.4 points less accuracy than 5; semantic
#: untuned; SD's 7.5 for the prompted tasks. Unconditional sampling is unguided.
DEFAULT_GUIDANCE: dict[Task, float] = {"txt2img": 7.5, "img2img": 7.5, "inpaint": 7.5, "upscale": 7.5,
                                       "class": 5.0, "layout": 3.0, "semantic": 2.0, "unconditional": 1.0}

#: the kinds that have no unconditional input (the CompVis zoo's semantic maps, box layouts, cin256), with the null
#: condition each lacks (for messages): sampled without classifier-free guidance, so their only scale is 1
MISSING_NULL: dict[ModelKind, str] = {"semantic_map": "null label map", "box_layout": "null layout",
                                      "class_only": "null class"}
UNGUIDED_KINDS: frozenset[ModelKind] = frozenset(MISSING_NULL)


def default_guidance(task: Task, kind: ModelKind, own: float | None = None, sampler_own: float | None = None) -> float:
    """The guidance scale a task gets when none is given, for a model of `kind` whose config's `default_guidance`
    is `own` (a model's measured best, which replaces the task's default for its guided tasks) and whose config sets
    `sampler_own` for the request's sampler (`sampler_guidance`: PLMS needs a lower scale on some models), which
    replaces both."""
    if kind in UNGUIDED_KINDS or task == "unconditional":
        return 1.0
    if sampler_own is not None:
        return sampler_own
    return DEFAULT_GUIDANCE[task] if own is None else own


#: the samplers of models/samplers.py
SamplerName = Literal["ddpm", "ddim", "plms", "dpmpp_2m", "euler_a"]
SAMPLERS: tuple[SamplerName, ...] = get_args(SamplerName)
#: the sampler a request gets when it names none and its model's config sets no `default_sampler`: the fastest to
#: converge of the five (20 steps; docs/generate.md)
DEFAULT_SAMPLER: SamplerName = "dpmpp_2m"


def default_sampler(own: SamplerName | None = None, *, karras: bool = False) -> SamplerName:
    """The sampler a request gets when it names none, for a model whose config's `default_sampler` is `own`. Karras
    sigmas exist for DPM-Solver++(2M) only, so a request for them that names no sampler gets that one."""
    if karras:
        return "dpmpp_2m"
    return DEFAULT_SAMPLER if own is None else own

#: the floating-point formats a model runs in, by their short names (`models.resolve.pick_dtype`)
DTypeName = Literal["fp32", "fp16", "bf16"]
DTYPES: tuple[DTypeName, ...] = get_args(DTypeName)

#: which 3x3 convolutions the CPU path computes by Winograd's F(2x2, 3x3) (models/cpu_inference.py): the UNet's of
#: 256 to 640 channels and the autoencoder's of at least 256 (`balanced`, the default; the autoencoder's make their
#: filters on each call, at no memory cost), every UNet one of at least 256 too (`all`: faster, filters 16/9 the size:
#: +1.4 GB of filters for SD-1.5, +1.5 GB at the peak), or none (`off`: oneDNN's direct kernel only, bit-identical
#: to PyTorch's eager one)
WinogradPolicy = Literal["balanced", "all", "off"]
WINOGRAD_POLICIES: tuple[WinogradPolicy, ...] = get_args(WinogradPolicy)

#: how a model on a GPU runs its UNet (models/gpu_inference.py): `graphs` (the default) replays one CUDA graph per
#: (batch, latent size, conditioning shape) bucket, so a step costs one launch instead of ~1,000; `compile` goes
#: through `torch.compile` (Inductor's fused kernels; each new bucket compiles once, cached on disk across restarts
#: in TORCHINDUCTOR_CACHE_DIR); `eager` runs the modules as they are
GpuMode = Literal["graphs", "compile", "eager"]
GPU_MODES: tuple[GpuMode, ...] = get_args(GpuMode)


def normalise_name(name: str) -> str:
    """Class names match whatever their case and spacing ("Red  Circle" is "red circle")."""
    return " ".join(name.lower().split())


def condition_kind(conditioner: ConditionerConfig | None) -> ConditionKind:
    """What a model with this conditioner is trained on and sampled with: every text encoder is "text"."""
    if conditioner is None:
        return "none"
    kind = conditioner.kind
    return kind if kind in ("class", "layout", "semantic") else "text"


def model_kind(config: ModelConfig) -> ModelKind:
    """What a model is conditioned on: an inpainting or low-resolution concat input where it has one, else its
    conditioner's kind where the UNet takes it (cross-attention or concat), "none" otherwise."""
    if config.concat_input in ("inpaint", "masked_image"):  # SD inpainting, the CompVis zoo's inpainting_big
        return "inpaint"
    if config.concat_input == "lowres":
        return "lowres"
    if config.concat_input == "rescaled_map":  # the CompVis zoo's semantic synthesis (SpatialRescaler)
        return "semantic_map"
    if config.conditioning not in ("crossattn", "hybrid", "concat"):
        return "none"
    if config.conditioner is not None and config.conditioner.kind == "box_tokens":  # the zoo's layout2img
        return "box_layout"
    if config.conditioner is not None and config.conditioner.kind == "class" and not config.conditioner.class_null:
        return "class_only"  # the zoo's cin256
    return condition_kind(config.conditioner)
