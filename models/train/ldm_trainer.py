"""`ldm train ldm`: the second stage, Eq. 1 of the paper on the latents of a frozen autoencoder.

- The latent scale factor is measured from the data before training (1 / std of the posterior samples),
  as SD's 0.18215 was, and stored in the model config.
- Latents come from a pool of `latent_pool` images encoded once (posterior mean and std; a fresh sample
  is drawn each time an image is used) and cached in the run folder: the frozen encoder would otherwise
  cost as much as a third of each step on a CPU. 0 encodes every batch on the fly.
- Text contexts are cached per caption (the frozen encoder gives the same states for the same text;
  the shapes grammar has 1782 captions). Conditioning dropout replaces a caption by "" with
  probability `cond_drop`, the unconditional input classifier-free guidance needs.
- AdamW with linear warm-up, gradient clipping, EMA, bf16/fp16 autocast on CUDA. Checkpoints hold the
  UNet, EMA, optimiser, grad scaler, step and RNG states, so a resumed run equals an uninterrupted one.
- The result, `model.safetensors`, is a complete model file (config in its metadata) that
  `ldm generate --model` loads; with `save_ema` its UNet weights are the EMA weights.
- The paper's other conditionings (§4.3), chosen by the conditioner: `class` (class labels through a
  learned embedding, cross-attention), `layout` (boxes through a small transformer, cross-attention),
  `semantic` (label maps encoded and concatenated to the latent) and none (unconditional). Their encoders
  are trained jointly with the UNet (optimiser, EMA, checkpoints and the exported file hold both), as any
  conditioner with trainable weights is; the pool keeps each image's condition (class id, boxes, label
  map) beside its latent. Conditioning dropout replaces it by the null condition (the null class, the
  empty layout, the all-unknown map) with probability `cond_drop`. On the shapes data the class names
  (`CLASS_NAMES`) are written into the model, so its users can say "red circle".
- `autoencoder_path` may also be a complete model file (`save_model`'s, e.g. a shipped model): its first
  stage is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from models.attention import CrossAttention
from models.autoencoder import Autoencoder, AutoencoderConfig
from models.checkpoints import read_model_config, read_state_dict, save_model, split_parts
from models.class_conditioner import ClassConditioner
from models.conditioners import ConditionerConfig
from models.conditioning import UNKNOWN_LABEL, LayoutEncoder, SemanticEncoder
from models.config import ConcatInput, ModelConfig, SamplerGuidance, to_dict
from models.config import Conditioning as Wiring
from models.diffusion import NoiseSchedule, ScheduleConfig, diffusion_loss, q_sample
from models.images import to_tensor
from models.ldm import LatentDiffusion
from models.names import ConditionKind, SamplerName, condition_kind
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.resolve import pick_device
from models.train.autoencoder_trainer import load_first_stage
from models.train.common import (
    EMA,
    LossLog,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_lr,
    set_rng_state,
    warmup_lr,
    write_resolved_config,
)
from models.train.data import ConditionedSource, DataConfig, ImageSource, condition_tensors, make_sources
from models.train.data_shapes import CLASS_NAMES, PAIR_PROBABILITY
from models.train.decoder_swap import same_encoder
from models.train.grid import save_grid
from models.unet import UNetConfig

log = logging.getLogger(__name__)
#: a batch's conditions: captions (text models, and ignored by unconditional ones), else tensors by name
#: (`models.train.data.condition_tensors`)
Conds = Sequence[str] | Mapping[str, torch.Tensor]


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor]) -> set[str]:
    """Copy into `module` the tensors of `state` whose names and shapes match its own; their names."""
    own = module.state_dict()
    taken = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(taken, strict=False)
    return set(taken)


@dataclass(frozen=True)
class LDMTrainConfig:
    name: str = "my-ldm"
    description: str = ""
    #: the trained first stage (`ldm train autoencoder`'s autoencoder.safetensors), or "pixel" for
    #: diffusion on the pixels themselves (the paper's LDM-1 baseline: no first stage)
    autoencoder_path: str | None = None
    #: the first stage written into model.safetensors (default: autoencoder_path); it must have the same
    #: encoder, i.e. be a decoder-only fine-tune (`train_encoder: false`), so the latent space is unchanged
    export_autoencoder_path: str | None = None
    #: start the UNet from the weights in this model file (a `model.safetensors` of an earlier run, whose
    #: UNet config must equal this run's) instead of a random init: fine-tuning, or moving a run to a GPU
    init_from: str | None = None
    #: init_from a model of another design: take every tensor whose name and shape match (a semantic
    #: model's map encoder starts a layout raster), keep the fresh init for the rest, and zero the output
    #: projection of every attention not wholly taken (cross-attention added to a model without it), so
    #: training starts from the earlier model's function
    init_partial: bool = False
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(2, 4), num_heads=4, context_dim=384))
    conditioner: ConditionerConfig | None = field(default_factory=lambda: ConditionerConfig(kind="minilm",
                                                                                             max_length=20))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    data: DataConfig = field(default_factory=DataConfig)
    #: None: measured from `scale_images` training images (1 / std of their latents)
    scale_factor: float | None = None
    scale_images: int = 1024
    #: images encoded once and reused (mean + std kept; a new posterior sample each use); 0 = on the fly
    latent_pool: int = 20000
    steps: int = 4000
    #: stop at the first checkpoint boundary after this many seconds of training in this process
    #: (None = run all `steps`); benchmarks use it to give every model the same compute
    time_budget_s: float | None = None
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 200
    #: from this step the learning rate falls linearly to a tenth of `lr` at `steps` (None = constant)
    lr_decay_start: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    #: probability of training a sample on the empty caption (classifier-free guidance)
    cond_drop: float = 0.1
    #: this fraction of every batch takes its timestep uniformly below `low_noise_max_t` instead of on all T: more
    #: training on the last noise levels, where a multistep sampler (PLMS) extrapolates the model's epsilon and a
    #: noisy one there derails it (0 = the paper's uniform timesteps)
    low_noise_fraction: float = 0.0
    low_noise_max_t: int = 250
    #: autocast dtype on CUDA ("no" = fp32); ignored on the CPU
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    sample_prompts: tuple[str, ...] = (
        "a red circle on a black background", "a large blue square", "a small yellow triangle on the left",
        "a green circle and a purple triangle", "an orange square in the center on a gray background",
        "a purple triangle on the top", "a blue circle and a red square on a black background",
        "a large green triangle",
    )
    sample_steps: int = 20
    sample_guidance: float = 5.0
    #: written into the model's config: the guidance scale its requests get when they give none (None: the task's
    #: default, `models.names.DEFAULT_GUIDANCE`); set it to the scale the evaluation found best for every sampler
    default_guidance: float | None = None
    #: written into the model's config: the sampler its requests get when they name none (None: DPM-Solver++(2M),
    #: `models.names.DEFAULT_SAMPLER`); set it to the sampler the evaluation found best at the default guidance
    default_sampler: SamplerName | None = None
    #: written into the model's config: a sampler's own default scale where the evaluation found the model's
    #: default_guidance wrong for it (PLMS breaks down at the class and layout tasks' scales)
    sampler_guidance: tuple[SamplerGuidance, ...] = ()
    save_ema: bool = True
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.low_noise_fraction <= 1:
            raise ValueError(f"low_noise_fraction must be in [0, 1], got {self.low_noise_fraction}")
        if not 1 <= self.low_noise_max_t <= self.schedule.num_train_timesteps:
            raise ValueError(f"low_noise_max_t must be in 1..{self.schedule.num_train_timesteps} (the schedule's T), "
                             f"got {self.low_noise_max_t}")

    def model_config(self, autoencoder: Any, scale_factor: float) -> ModelConfig:
        kind = condition_kind(self.conditioner)
        raster = kind == "layout" and self.conditioner is not None and self.conditioner.layout.raster_channels > 0
        conditioning: Wiring = ("none" if kind == "none" else "concat" if kind == "semantic"
                                else "hybrid" if raster else "crossattn")
        concat_input: ConcatInput = "semantic" if kind == "semantic" else "layout" if raster else "none"
        return ModelConfig(
            name=self.name, family="ldm", unet=self.unet, autoencoder=autoencoder, schedule=self.schedule,
            conditioner=self.conditioner, conditioning=conditioning, concat_input=concat_input,
            scale_factor=scale_factor, default_size=self.data.size, description=self.description,
            default_guidance=self.default_guidance, default_sampler=self.default_sampler,
            sampler_guidance=self.sampler_guidance,
        )


def with_class_names(config: LDMTrainConfig) -> LDMTrainConfig:
    """On the shapes data, a class/layout/semantic conditioner gets the data's class names (checked if given)."""
    cond = config.conditioner
    if cond is None or cond.kind not in ("class", "layout", "semantic") or config.data.kind != "shapes":
        return config
    if cond.n_classes != len(CLASS_NAMES):
        raise ValueError(f"the shapes data has {len(CLASS_NAMES)} classes (colour x shape): set conditioner.n_classes "
                         f"to {len(CLASS_NAMES)}, got {cond.n_classes}")
    if cond.class_names and tuple(cond.class_names) != CLASS_NAMES:
        raise ValueError("conditioner.class_names differ from the shapes data's (data_shapes.CLASS_NAMES); leave "
                         "them out and they are filled in")
    if config.data.pair_probability > 0 and cond.kind == "class":
        raise ValueError("class-conditional training takes single-object scenes: set data.pair_probability: 0")
    return dataclasses.replace(config, conditioner=dataclasses.replace(cond, class_names=CLASS_NAMES))


class LatentPool:
    """Posterior means and stds of `count` training images, encoded once; sampled by global index. `conds`
    holds each image's condition tensors (class ids, boxes, label maps), indexed like the latents."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, texts: list[str], seed: int,
                 conds: Mapping[str, torch.Tensor] | None = None) -> None:
        self.mean, self.std, self.texts, self.seed = mean, std, texts, seed
        self.conds = dict(conds or {})
        self._epoch_perm: tuple[int, torch.Tensor] | None = None  # the last epoch's permutation

    @classmethod
    @torch.no_grad()
    def encode(cls, model: LatentDiffusion, source: ImageSource, count: int, seed: int,
               batch: int = 256, kind: ConditionKind = "text", max_boxes: int = 0) -> LatentPool:
        means, stds, texts, parts = [], [], [], []
        for first in tqdm(range(0, count, batch), desc="encoding latent pool", unit="batch", dynamic_ncols=True):
            if kind in ("text", "none"):
                images, captions = source.batch(first, min(batch, count - first))
            else:
                conditioned: ConditionedSource = source  # type: ignore[assignment]
                images, captions, conditions = conditioned.batch_with_conditions(first, min(batch, count - first))
                parts.append(condition_tensors(conditions, kind, max_boxes))
            posterior = model.autoencoder.encode(images.to(model.device))
            means.append(posterior.mean.cpu())  # type: ignore[union-attr]
            stds.append(posterior.std.cpu())  # type: ignore[union-attr]
            texts += captions
        conds = {k: torch.cat([part[k] for part in parts]) for k in parts[0]} if parts else {}
        return cls(torch.cat(means), torch.cat(stds), texts, seed, conds)

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(mean, std, captions) of items first..first+count-1, through a per-epoch permutation."""
        mean, std, texts, _ = self.items(first, count)
        return mean, std, texts

    def items(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, torch.Tensor]]:
        """`batch` plus the items' condition tensors."""
        n = len(self.texts)
        index = []
        for i in range(first, first + count):
            epoch, pos = divmod(i, n)
            index.append(int(self._perm(epoch)[pos]))
        idx = torch.tensor(index)
        conds = {k: v[idx] for k, v in self.conds.items()}
        return self.mean[idx], self.std[idx], [self.texts[i] for i in index], conds

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._epoch_perm is None or self._epoch_perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch_perm = (epoch, torch.randperm(len(self.texts), generator=g))
        return self._epoch_perm[1]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"mean": self.mean, "std": self.std, "texts": self.texts, "seed": self.seed,
                    "conds": self.conds}, path)

    @classmethod
    def load(cls, path: Path) -> LatentPool:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["mean"], data["std"], data["texts"], data["seed"], data.get("conds"))


class ContextCache:
    """Frozen text encoder outputs per caption, computed once (the encoder is frozen, so they never change)."""

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self.cache})
        assert self.model.conditioner is not None
        for first in range(0, len(missing), 256):
            chunk = missing[first:first + 256]
            context = self.model.conditioner.encode(chunk).context.float().cpu()
            self.cache.update(zip(chunk, context, strict=True))
        return torch.stack([self.cache[t] for t in texts]).to(self.model.device)


class LDMTrainer:
    """One run in `run_dir`; `train()` resumes from `run_dir/checkpoints/last.pt` when it exists."""

    def __init__(self, config: LDMTrainConfig, run_dir: Path) -> None:
        if config.autoencoder_path is None:
            raise ValueError("LDM training needs a trained autoencoder: give --autoencoder or autoencoder_path")
        first_stage = config.autoencoder_path
        config = with_class_names(config)
        self.config, self.run_dir = config, run_dir
        self.kind = condition_kind(config.conditioner)
        self.device = pick_device(config.device)
        seed_everything(config.seed)
        autoencoder = (Autoencoder(AutoencoderConfig(kind="identity", ch_mult=(1,), embed_dim=3, z_channels=3))
                       if first_stage == "pixel" else load_first_stage(Path(first_stage)))
        resumed = self._resume_state()
        scale = resumed["scale_factor"] if resumed else config.scale_factor
        model_config = config.model_config(autoencoder.config, scale or 1.0)
        self.model = LatentDiffusion(model_config).to(self.device)
        self.model.autoencoder.load_state_dict(autoencoder.state_dict())
        self.model.autoencoder.requires_grad_(False).eval()
        self.unet = self.model.unet
        conditioner = self.model.conditioner
        #: a conditioner with trainable weights (class, layout, semantic, from-scratch text) trains with the UNet
        self.trains_conditioner = conditioner is not None and any(p.requires_grad for p in conditioner.parameters())
        #: what the optimiser and the EMA see: the UNet (state keys unchanged), or the UNet and the conditioner
        self.trained: nn.Module = self.unet
        if self.trains_conditioner:
            assert isinstance(conditioner, nn.Module)
            self.trained = nn.ModuleDict({"unet": self.unet, "conditioner": conditioner})
        if config.init_from is not None and resumed is None:
            self._init_unet(Path(config.init_from))
        self.schedule = NoiseSchedule.from_config(config.schedule)
        self.train_data, self.heldout = make_sources(config.data)
        frozen_text = conditioner is not None and self.kind == "text" and not self.trains_conditioner
        self.contexts = ContextCache(self.model) if frozen_text else None
        self.opt = torch.optim.AdamW(self.trained.parameters(), lr=config.lr, betas=config.betas,
                                     weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._autocast_dtype() == torch.float16)
        self.ema = EMA(self.trained, config.ema_decay)
        self.step = 0
        self._resumed = resumed
        if scale is None:
            self._set_scale(self.measure_scale_factor())
        self.pool: LatentPool | None = None

    # ------------------------------------------------------------------------------ set-up helpers
    def _resume_state(self) -> dict[str, Any] | None:
        return load_checkpoint(self.checkpoint_path) if self.checkpoint_path.is_file() else None

    def _init_unet(self, path: Path) -> None:
        """The UNet (and a trained conditioner, when the file has one of the same config) from a model file."""
        saved_config = read_model_config(path)
        parts = split_parts(read_state_dict(path)[0])
        if self.config.init_partial:
            self._init_partial(path, saved_config, parts)
            return
        if saved_config.unet != self.config.unet:
            raise ValueError(f"init_from {path}: its UNet config differs from this run's (init_partial: true "
                             "takes what matches)")
        self.unet.load_state_dict(parts["unet"], strict=True)
        if self.trains_conditioner and parts["conditioner"]:
            if saved_config.conditioner != self.model.config.conditioner:
                raise ValueError(f"init_from {path}: its conditioner config differs from this run's")
            assert self.model.conditioner is not None
            self.model.conditioner.load_state_dict(parts["conditioner"], strict=True)
        log.info("UNet initialised from %s", path)

    def _init_partial(self, path: Path, saved_config: ModelConfig, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        """`init_partial`: the tensors of `parts` whose names and shapes match, see LDMTrainConfig. A model without
        cross-attention has a second self-attention as attn2: it is not taken for a run with cross-attention."""
        saved_unet = parts["unet"]
        if saved_config.unet.context_dim is None and self.config.unet.context_dim is not None:
            saved_unet = {k: v for k, v in saved_unet.items() if ".attn2." not in k}
        unet_taken = load_matching(self.unet, saved_unet)
        for name, module in self.unet.named_modules():
            if isinstance(module, CrossAttention):
                own = {f"{name}.{key}" for key, _ in module.named_parameters()}
                if not own <= unet_taken:
                    out = module.to_out[0]
                    assert isinstance(out, nn.Linear)
                    nn.init.zeros_(out.weight)
                    nn.init.zeros_(out.bias)
        cond_taken: set[str] = set()
        conditioner = self.model.conditioner
        if self.trains_conditioner and parts["conditioner"]:
            assert isinstance(conditioner, nn.Module)
            saved = parts["conditioner"]
            if isinstance(conditioner, LayoutEncoder):  # a semantic model's map encoder starts the raster
                saved = {**saved, **{k.replace("proj_", "raster_", 1): v for k, v in saved.items()
                                     if k.startswith("proj_")}}
            cond_taken = load_matching(conditioner, saved)
        total = sum(1 for _ in self.unet.state_dict())
        log.info("UNet partly initialised from %s: %d of %d UNet tensors, %d conditioner tensors", path,
                 len(unet_taken), total, len(cond_taken))
        if not unet_taken:
            raise ValueError(f"init_from {path}: no UNet tensor matches this run's UNet")

    def _set_scale(self, scale: float) -> None:
        self.model.config = dataclasses.replace(self.model.config, scale_factor=scale)

    @torch.no_grad()
    def measure_scale_factor(self) -> float:
        """1 / std of posterior samples of `scale_images` training images (SD: 1 / 5.49 = 0.18215)."""
        samples = []
        for first in range(0, self.config.scale_images, 256):
            images, _ = self.train_data.batch(first, min(256, self.config.scale_images - first))
            posterior = self.model.autoencoder.encode(images.to(self.device))
            samples.append(posterior.sample().flatten())  # type: ignore[union-attr]
        scale = 1.0 / torch.cat(samples).std().item()
        log.info("latent scale factor measured on %d images: %.5f", self.config.scale_images, scale)
        return scale

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.config.mixed_precision == "no":
            return None
        return torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self._autocast_dtype()
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def _pool(self) -> LatentPool | None:
        c = self.config
        if c.latent_pool <= 0:
            return None
        suffix = "" if self.kind in ("text", "none") else f"-{self.kind}"
        if c.data.kind == "shapes" and c.data.pair_probability != PAIR_PROBABILITY:
            suffix += f"-pairs{c.data.pair_probability:g}"
        path = self.run_dir / "cache" / f"latents-{c.latent_pool}-seed{c.data.seed}{suffix}.pt"
        if path.is_file():
            return LatentPool.load(path)
        pool = LatentPool.encode(self.model, self.train_data, c.latent_pool, c.seed, kind=self.kind,
                                 max_boxes=self._max_boxes)
        pool.save(path)
        return pool

    @property
    def _max_boxes(self) -> int:
        cond = self.config.conditioner
        return cond.layout.max_boxes if cond is not None else 0

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
                 "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                 "scale_factor": self.model.config.scale_factor, "config": to_dict(self.config)}
        if self.trains_conditioner:
            assert self.model.conditioner is not None
            state["conditioner"] = self.model.conditioner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        if self.trains_conditioner:
            assert self.model.conditioner is not None
            self.model.conditioner.load_state_dict(state["conditioner"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.scaler.load_state_dict(state["scaler"])
        self._set_scale(state["scale_factor"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    # -------------------------------------------------------------------------------------- step
    def _batch(self, first: int, count: int) -> tuple[torch.Tensor, Conds]:
        """Scaled latents (a fresh posterior sample) and conditions of samples first..first+count-1: the
        captions for text (and unconditional) models, condition tensors by name for the others."""
        conds: dict[str, torch.Tensor] = {}
        if self.pool is not None:
            mean, std, texts, conds = self.pool.items(first, count)
            latents = mean + std * torch.randn_like(mean)
        else:
            if self.kind in ("text", "none"):
                images, texts = self.train_data.batch(first, count)
            else:
                images, texts, conditions = self.train_data.batch_with_conditions(first, count)
                conds = condition_tensors(conditions, self.kind, self._max_boxes)
            with torch.no_grad():
                latents = self.model.autoencoder.encode(images.to(self.device)).sample()  # type: ignore[union-attr]
        scaled = latents.to(self.device) * self.model.config.scale_factor
        return scaled, (texts if self.kind in ("text", "none") else conds)

    def loss(self, latents: torch.Tensor, conds: Conds) -> torch.Tensor:
        """Eq. 1 on one batch; dropout of conditions, timesteps and noise come from the global RNG."""
        context, concat = self._conditions(conds, latents)
        t = self.schedule.sample_timesteps(latents.shape[0])
        low = round(latents.shape[0] * self.config.low_noise_fraction)
        if low:
            t[:low] = torch.randint(0, self.config.low_noise_max_t, (low,))
        t = t.to(self.device)
        noise = torch.randn_like(latents)
        noisy = q_sample(self.schedule, latents, t, noise)
        # semantic maps and layout rasters: stacked on the noisy latent, as the original's c_concat
        noisy_in = noisy if concat is None else torch.cat([noisy, concat.to(noisy.dtype)], dim=1)
        with self._autocast():
            output = self.unet(noisy_in, t, context)
        return diffusion_loss(output, latents, noise, t, self.schedule)

    def _conditions(self, conds: Conds, latents: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(cross-attention context, concat input) of a batch, with conditioning dropout to the null condition."""
        conditioner = self.model.conditioner
        if conditioner is None:
            return None, None
        n = latents.shape[0]
        keep = torch.rand(n) >= self.config.cond_drop
        if self.kind == "text":
            texts = [t if k else "" for t, k in zip(conds, keep.tolist(), strict=True)]
            if self.contexts is not None:
                return self.contexts(texts), None
            return conditioner.encode(texts).context, None
        assert isinstance(conds, Mapping)
        drop = ~keep.to(self.device)
        if isinstance(conditioner, ClassConditioner):
            assert conditioner.null_class is not None, "training drops to the null class"
            ids = torch.where(drop, conditioner.null_class, conds["labels"].to(self.device))
            return conditioner.encode(ids).context, None
        if isinstance(conditioner, LayoutEncoder):
            boxes = conds["boxes"].to(self.device)
            labels = conds["box_labels"].to(self.device).masked_fill(drop[:, None], -1)
            if not conditioner.has_raster:
                return conditioner(boxes, labels), None
            f = self.model.config.downsample_factor
            return conditioner(boxes, labels), conditioner.raster(boxes, labels, latents.shape[-2] * f,
                                                                   latents.shape[-1] * f)
        assert isinstance(conditioner, SemanticEncoder)
        maps = conds["maps"].to(self.device).long().masked_fill(drop[:, None, None], UNKNOWN_LABEL)
        return None, conditioner(maps)

    def train_step(self, latents: torch.Tensor, conds: Conds) -> float:
        c = self.config
        self.trained.train()
        loss = self.loss(latents, conds)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), c.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.trained)
        return loss.item()

    # -------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        c = self.config
        if self._resumed is not None:
            self.load_state_dict(self._resumed)
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
            self._resumed = None
        write_resolved_config(self.run_dir, c, {"measured_scale_factor": self.model.config.scale_factor})
        self.pool = self._pool()
        losslog = LossLog(self.run_dir / "log.csv", ("loss", "lr", "samples_per_s"),
                          resume_step=self.step if self.step else None)
        bar = tqdm(total=c.steps, initial=self.step, desc="ldm", unit="step", dynamic_ncols=True)
        started, first_step, loss = time.monotonic(), self.step, float("nan")
        while self.step < c.steps:
            lr = warmup_lr(self.step, c.lr, c.warmup_steps, c.lr_decay_start, c.steps)
            set_lr(self.opt, lr)
            latents, conds = self._batch(self.step * c.batch_size, c.batch_size)
            loss = self.train_step(latents, conds)
            self.step += 1
            speed = (self.step - first_step) * c.batch_size / (time.monotonic() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{speed:.1f}")
            if self.step % c.log_every == 0:
                losslog.write(self.step, {"loss": loss, "lr": lr, "samples_per_s": speed})
            out_of_time = c.time_budget_s is not None and time.monotonic() - started >= c.time_budget_s
            if self.step % c.checkpoint_every == 0 or self.step == c.steps or out_of_time:
                save_checkpoint(self.checkpoint_path, self.state_dict())
            if self.step % c.sample_every == 0 or self.step == c.steps:
                self.save_samples()
            if out_of_time:
                log.info("time budget of %.0f s spent at step %d", c.time_budget_s, self.step)
                break
        bar.close()
        self.train_seconds = time.monotonic() - started
        self.export(self.run_dir / "model.safetensors")
        return {"loss": loss, "step": float(self.step), "samples_per_s": (self.step - first_step) * c.batch_size
                / max(self.train_seconds, 1e-9)}

    def _swap_decoder(self, path: Path) -> None:
        tuned = load_first_stage(path).to(self.device)
        ours = self.model.autoencoder
        if not same_encoder(tuned, ours):
            raise ValueError(f"{path}: its encoder differs from the one the diffusion model was trained on; "
                             "only a decoder-only fine-tune (train_encoder: false) can replace it")
        ours.load_state_dict(tuned.state_dict())
        log.info("first stage for export: %s (decoder fine-tune)", path)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The UNet (and a trained conditioner) hold the EMA weights inside the block, the trained weights after."""
        saved = {k: v.clone() for k, v in self.trained.state_dict().items()}
        self.ema.copy_to(self.trained)
        try:
            yield
        finally:
            self.trained.load_state_dict(saved)

    def save_samples(self, prompts: Sequence[str] | None = None) -> None:
        """A grid of EMA samples: the sample prompts (text models), or 8 held-out conditions over their real
        images (class, layout, semantic), or 8 seeds (unconditional)."""
        c = self.config
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        self.trained.eval()
        if self.kind != "text":
            with self.ema_weights():
                images = self._task_samples(8)
            save_grid(images, path, rows=max(1, len(images) // 8))
            return
        prompts = list(prompts or c.sample_prompts)
        specs = [SampleSpec(prompt=p, seed=i, guidance_scale=c.sample_guidance) for i, p in enumerate(prompts)]
        with self.ema_weights():
            result = Pipeline(self.model, optimize=False).txt2img(specs, RunSettings(steps=c.sample_steps))
        save_grid(to_tensor(result.images), path, rows=max(1, len(prompts) // 8))

    def _task_samples(self, n: int) -> torch.Tensor:
        """[n or 2n, 3, H, W]: generated from the first `n` held-out conditions, then the real images."""
        c = self.config
        pipeline = Pipeline(self.model, optimize=False)
        specs = [SampleSpec(seed=i, guidance_scale=c.sample_guidance) for i in range(n)]
        settings = RunSettings(steps=c.sample_steps)
        if self.kind == "none":
            return to_tensor(pipeline.unconditional(specs, settings).images)
        source: ConditionedSource = self.heldout
        real, _, conditions = source.batch_with_conditions(0, n)
        if self.kind == "class":
            result = pipeline.class2img(specs, settings, [cond.class_id if cond.class_id is not None else -1
                                                          for cond in conditions])
        elif self.kind == "layout":
            result = pipeline.layout2img(specs, settings, [cond.layout for cond in conditions])
        else:
            result = pipeline.semantic2img(specs, settings, [cond.label_map for cond in conditions])
        return torch.cat([to_tensor(result.images), real.clamp(-1, 1)])

    def export(self, path: Path) -> Path:
        """A complete model file (EMA UNet weights when `save_ema`) that `ldm generate --model` loads."""
        if self.config.export_autoencoder_path is not None:
            self._swap_decoder(Path(self.config.export_autoencoder_path))
        if self.config.save_ema:
            with self.ema_weights():
                save_model(self.model, path)
        else:
            save_model(self.model, path)
        log.info("wrote %s", path)
        return path

