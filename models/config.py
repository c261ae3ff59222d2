"""Model configs: YAML in, frozen dataclasses out, unknown keys are errors.

A `ModelConfig` names every part of a Latent Diffusion Model (autoencoder, UNet, conditioner,
noise schedule) and how they are wired (`conditioning`). Nothing here instantiates classes from
dotted paths: the YAML holds plain values and the dataclasses say what they mean.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from models.autoencoder import AutoencoderConfig
from models.conditioners import ConditionerConfig
from models.diffusion import ScheduleConfig
from models.names import SAMPLERS, TASKS_BY_KIND, ModelKind, SamplerName, Task, default_guidance, model_kind
from models.unet import UNetConfig

Family = Literal["sd_v1", "sd_v1_inpainting", "sd_v2", "sd_v2_inpainting", "sd_v2_upscaler", "sdxl", "sdxl_refiner",
                 "sdxl_inpainting", "ldm_sr", "ldm"]
#: How conditioning reaches the UNet (the original `conditioning_key`):
#: crossattn = context tokens; concat = spatial inputs stacked on the latent; hybrid = both;
#: adm = class vector added to the time embedding; none = unconditional.
Conditioning = Literal["crossattn", "concat", "hybrid", "adm", "none"]
#: What the extra UNet input channels hold when conditioning is concat or hybrid (semantic: the
#: conditioner's encoding of a label map, `conditioner.semantic.channels` of them; layout: the layout
#: encoder's box raster, `conditioner.layout.raster_channels` of them; masked_image: the CompVis zoo's
#: inpainting, the first stage's encoding of the masked image then the mask in {-1, 1}; rescaled_map: the zoo's
#: semantic synthesis, a one-hot label map through the SpatialRescaler, `conditioner.rescaler.channels` of them).
ConcatInput = Literal["none", "inpaint", "lowres", "semantic", "layout", "masked_image", "rescaled_map"]


@dataclass(frozen=True)
class SamplerGuidance:
    """A model's own default guidance scale with one sampler (`ModelConfig.sampler_guidance`)."""

    sampler: SamplerName
    scale: float


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Latent Diffusion Model and run it."""

    name: str
    family: Family
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    conditioner: ConditionerConfig | None = None
    conditioning: Conditioning = "crossattn"
    concat_input: ConcatInput = "none"
    #: latents are multiplied by this after encoding (1/std of the data's latents; SD v1: 0.18215)
    scale_factor: float = 0.18215
    #: default output size in pixels (SD v1: 512)
    default_size: int = 512
    description: str = ""
    #: noise augmentation of the low-resolution input (the SD x4 upscaler; diffusers' `low_res_scheduler`): the
    #: image is noised to a noise level by this schedule's forward process, and the level is the UNet's class
    #: label. None: the input is concatenated as it is (the CompVis LDM-SR models).
    lowres_noise: ScheduleConfig | None = None
    #: the highest noise level a request may ask for (the x4 upscaler's pipeline config: 350)
    max_noise_level: int = 350
    #: the noise level a request gets when it asks for none (diffusers' default: 20)
    default_noise_level: int = 20
    #: the classifier-free guidance scale this model's guided tasks get when a request gives none; None: the task's
    #: default (`models.names.DEFAULT_GUIDANCE`, SD's 7.5 for prompts). A shipped model sets its measured best
    #: (tiny-shapes: the scale at which every sampler draws its prompts right, models/zoo/tiny-shapes/MODEL_CARD.md)
    default_guidance: float | None = None
    #: the sampler a request gets when it names none; None: `models.names.DEFAULT_SAMPLER` (DPM-Solver++(2M)). A
    #: shipped model sets the one its evaluation found best (shapes-class: Euler ancestral, its card's sampler table)
    default_sampler: SamplerName | None = None
    #: a sampler's own default guidance scale, which replaces `default_guidance` for requests with that sampler
    #: (shapes-class and -layout: PLMS at 2, where it holds; at their scale for the other samplers it breaks down)
    sampler_guidance: tuple[SamplerGuidance, ...] = ()

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim

    @property
    def kind(self) -> ModelKind:
        """What the model is conditioned on (`models.names.model_kind`), which decides its tasks."""
        return model_kind(self)

    def guidance_for(self, task: Task, sampler: SamplerName) -> float:
        """The guidance scale a request for `task` with `sampler` gets when it gives none
        (`models.names.default_guidance`)."""
        own = next((g.scale for g in self.sampler_guidance if g.sampler == sampler), None)
        return default_guidance(task, self.kind, self.default_guidance, own)

    @property
    def tasks(self) -> frozenset[Task]:
        """The tasks this model can do (`models.names.TASKS_BY_KIND`)."""
        return TASKS_BY_KIND[self.kind]

    def __post_init__(self) -> None:
        if self.conditioning in ("crossattn", "hybrid") and self.conditioner is None:
            raise ValueError(f"{self.name}: conditioning {self.conditioning!r} needs a conditioner")
        if self.conditioning in ("concat", "hybrid") and self.concat_input == "none":
            raise ValueError(f"{self.name}: conditioning {self.conditioning!r} needs concat_input")
        self._check_conditioner()
        self._check_sdxl()
        if self.default_guidance is not None and not 1 <= self.default_guidance <= 100:
            raise ValueError(f"{self.name}: default_guidance must be in [1, 100] (1 = unguided), "
                             f"got {self.default_guidance}")
        named = [g.sampler for g in self.sampler_guidance]
        for g in self.sampler_guidance:
            if g.sampler not in SAMPLERS or not 1 <= g.scale <= 100 or named.count(g.sampler) > 1:
                raise ValueError(f"{self.name}: sampler_guidance: each entry needs one of {', '.join(SAMPLERS)}, "
                                 f"named once, and a scale in [1, 100]; got {g.sampler!r} at {g.scale}")
        if self.default_sampler is not None and self.default_sampler not in SAMPLERS:
            raise ValueError(f"{self.name}: default_sampler must be one of {', '.join(SAMPLERS)}, "
                             f"got {self.default_sampler!r}")
        if self.lowres_noise is not None:
            if self.concat_input != "lowres" or self.unet.num_classes is None:
                raise ValueError(f"{self.name}: lowres_noise needs concat_input 'lowres' and a UNet with num_classes "
                                 "(the noise level is its class label)")
            top = min(self.unet.num_classes, self.lowres_noise.num_train_timesteps) - 1
            if not 0 <= self.default_noise_level <= self.max_noise_level <= top:
                raise ValueError(f"{self.name}: need 0 <= default_noise_level ({self.default_noise_level}) <= "
                                 f"max_noise_level ({self.max_noise_level}) <= {top}")
        semantic = self.conditioner.semantic.channels if self.conditioner is not None else 0
        raster = self.conditioner.layout.raster_channels if self.conditioner is not None else 0
        rescaled = self.conditioner.rescaler.channels if self.conditioner is not None else 0
        extra = {"none": 0, "inpaint": 1 + self.latent_channels, "lowres": 3, "semantic": semantic,
                 "layout": raster, "masked_image": self.latent_channels + 1,
                 "rescaled_map": rescaled}[self.concat_input]
        expected = self.latent_channels + extra
        if self.unet.in_channels != expected:
            raise ValueError(
                f"{self.name}: UNet has {self.unet.in_channels} input channels, but a "
                f"{self.latent_channels}-channel latent with concat_input={self.concat_input!r} needs {expected}"
            )

    def _check_sdxl(self) -> None:
        """SDXL's conditioner and UNet agree on the context width and the added vector's width."""
        sdxl = self.conditioner is not None and self.conditioner.kind == "sdxl"
        if sdxl != (self.unet.adm_in_channels is not None):
            raise ValueError(f"{self.name}: an SDXL conditioner goes with a UNet that takes an added vector "
                             "(unet.adm_in_channels) and only with it")
        if self.conditioner is not None and sdxl:
            text = self.conditioner.sdxl
            if (self.unet.adm_in_channels, self.unet.context_dim) != (text.vector_dim, text.context_dim):
                raise ValueError(f"{self.name}: the UNet takes a {self.unet.adm_in_channels}-wide vector and a "
                                 f"{self.unet.context_dim}-wide context, the SDXL text encoders make "
                                 f"{text.vector_dim} and {text.context_dim}")

    def _check_rescaler(self) -> None:
        """The CompVis zoo's SpatialRescaler: concat conditioning, maps shrunk by the first stage's factor."""
        kind = self.conditioner.kind if self.conditioner is not None else None
        if (kind == "rescaler") != (self.concat_input == "rescaled_map"):
            raise ValueError(f"{self.name}: a rescaler conditioner goes with concat_input 'rescaled_map' and only "
                             "with it")
        if self.conditioner is not None and kind == "rescaler":
            if self.conditioning != "concat":
                raise ValueError(f"{self.name}: a rescaler conditioner needs conditioning 'concat'")
            if self.conditioner.rescaler.downsample != self.downsample_factor:
                raise ValueError(f"{self.name}: the rescaler shrinks maps {self.conditioner.rescaler.downsample}x, "
                                 f"the first stage {self.downsample_factor}x")

    def _check_conditioner(self) -> None:
        """The class, layout and semantic conditioners against the wiring and the UNet."""
        kind = self.conditioner.kind if self.conditioner is not None else None
        self._check_rescaler()
        if (kind == "semantic") != (self.concat_input == "semantic"):
            raise ValueError(f"{self.name}: a semantic conditioner goes with concat_input 'semantic' and only with it")
        if kind == "semantic":
            assert self.conditioner is not None
            if self.conditioning != "concat":
                raise ValueError(f"{self.name}: a semantic conditioner needs conditioning 'concat'")
            if self.unet.context_dim is not None:
                raise ValueError(f"{self.name}: a semantic-map model has no cross-attention context "
                                 "(unet.context_dim must be null)")
            if self.conditioner.semantic.downsample != self.downsample_factor:
                raise ValueError(f"{self.name}: conditioner.semantic.downsample must equal the first stage's factor "
                                 f"{self.downsample_factor}, got {self.conditioner.semantic.downsample}")
        raster = kind == "layout" and self.conditioner is not None and self.conditioner.layout.raster_channels > 0
        if raster != (self.concat_input == "layout"):
            raise ValueError(f"{self.name}: a layout conditioner with a raster goes with concat_input 'layout' and "
                             "only with it")
        if raster:
            assert self.conditioner is not None
            if self.conditioner.layout.raster_downsample != self.downsample_factor:
                raise ValueError(f"{self.name}: conditioner.layout.raster_downsample must equal the first stage's "
                                 f"factor {self.downsample_factor}, got {self.conditioner.layout.raster_downsample}")
        if kind in ("class", "layout", "box_tokens"):
            assert self.conditioner is not None
            wiring = "hybrid" if raster else "crossattn"
            if self.conditioning != wiring:
                raise ValueError(f"{self.name}: a {kind} conditioner{' with a raster' if raster else ''} needs "
                                 f"conditioning {wiring!r}")
            if self.unet.context_dim != self.conditioner.context_dim:
                raise ValueError(f"{self.name}: unet.context_dim {self.unet.context_dim} differs from the {kind} "
                                 f"conditioner's width {self.conditioner.context_dim}")


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from plain data, checking every key and converting lists to tuples."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):  # SDXL's encoders
            return tuple(from_dict(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))  # type: ignore[arg-type]
        return tuple(value)
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The inverse of `from_dict`: plain data for YAML/JSON (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    data: dict[str, Any] = plain(dataclasses.asdict(config))
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a model YAML (see models/configs/)."""
    path = Path(path)
    with path.open() as fh:
        data = yaml.safe_load(fh)
    return from_dict(ModelConfig, data, where=path.name)


CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_config(name: str) -> ModelConfig:
    """A config shipped in models/configs/ by name, e.g. "sd-v1"."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"no built-in config {name!r}; known: {known}")
    return load_model_config(path)
