"""Checkpoints in, checkpoints out.

In: the original single-file layout (`.safetensors`, or `.ckpt` read with `weights_only=True`, so no
pickled code ever runs), the diffusers folder layout, and our own saved models. The family and the
architecture come from the tensors' keys and shapes, as ComfyUI does, so variants load without a
hand-written config. Loading is strict: a missing, unexpected or misshaped key is an error that
names the keys; only keys known to be harmless (schedule buffers, EMA copies, `position_ids`) are
dropped, and they are listed in `IGNORED_KEYS`.

Memory: a model is built on the meta device and each tensor is read from its file (models/tensor_files.py)
into memory of its own, already in the asked dtype, and handed to the module as its parameter
(`load_state_dict(assign=True)`): no second copy of the weights exists at any point, whatever the layout
or dtype, beyond the one tensor being converted.

Out: one `.safetensors` file in the original layout with our config as JSON in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from models.autoencoder import AutoencoderConfig
from models.conditioners import ConditionerConfig
from models.config import Family, ModelConfig, from_dict, to_dict
from models.cpu_inference import is_packed
from models.diffusers_layout import (
    UnsupportedConfigError,
    autoencoder_config_from_diffusers,
    autoencoder_key_map,
    clip_config_from_transformers,
    default_size_from_diffusers,
    noise_schedule_config_from_diffusers,
    read_json,
    schedule_config_from_diffusers,
    unet_config_from_diffusers,
    unet_key_map,
)
from models.diffusion import PredictionType, ScheduleConfig
from models.ldm import PREFIXES, LatentDiffusion
from models.openclip_layout import OPENCLIP_PREFIX, is_openclip, openclip_to_clip
from models.tensor_files import CheckpointError, InMemoryFile, StateDict, TensorFile, open_tensor_file
from models.text.clip import CLIPTextConfig
from models.unet import UNetConfig, depths_config

log = logging.getLogger(__name__)

T = TypeVar("T")
CONFIG_METADATA_KEY = "ldm_serve_config"
ZOO_DIR = Path(__file__).parent / "zoo"

#: Keys that original checkpoints carry besides the weights we load, dropped on purpose.
IGNORED_KEYS = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|lvlb_weights|logvar|scale_factor|ddim_\w+|model_ema\..*|loss\..*"
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids"
    # the SD x4 upscaler's low-resolution noise schedule: read by its config (models/upscaler_layout.py), refused
    # in any other family's file
    r"|low_scale_model\.(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod))$"
)


def _shown(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: Path) -> tuple[StateDict, dict[str, str]]:
    """All tensors and the metadata of one weights file (for training code that loads into live modules)."""
    file = open_tensor_file(path)
    return file.read_all(), file.metadata


def split_parts(sd: StateDict) -> dict[str, StateDict]:
    """Original single-file keys -> {"unet": ..., "autoencoder": ..., "conditioner": ...} (prefix stripped)."""
    parts: dict[str, StateDict] = {part: {} for part in PREFIXES}
    unexpected = []
    for key, tensor in sd.items():
        if IGNORED_KEYS.match(key):
            continue
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = tensor
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"unexpected keys outside the model's parts: {_shown(sorted(unexpected))}")
    if is_openclip(parts["conditioner"]):  # SD 2: OpenCLIP's names, run as CLIP (models/openclip_layout.py)
        try:
            parts["conditioner"] = openclip_to_clip(parts["conditioner"])
        except ValueError as err:
            raise CheckpointError(f"{PREFIXES['conditioner']}*: {err}") from None
    return parts


def ema_unet_keys(file_keys: Collection[str], unet_keys: list[str]) -> dict[str, str]:
    """UNet key -> the key of its LitEma shadow copy in the file (`model_ema.<key without dots>`)."""
    if not any(k.startswith("model_ema.diffusion_model") for k in file_keys):
        raise CheckpointError("asked for EMA weights, but the file has none (no model_ema.* keys)")
    out = {key: "model_ema.diffusion_model" + key.replace(".", "") for key in unet_keys}
    missing = [ema_key for ema_key in out.values() if ema_key not in file_keys]
    if missing:
        raise CheckpointError(f"asked for EMA weights, but these are missing: {_shown(missing)}")
    return out


# --------------------------------------------------------------------------- inferring configs


def infer_unet_config(sd: StateDict) -> UNetConfig:
    """The UNet's architecture from its tensors (keys without `model.diffusion_model.`); a KeyError
    names a key the layout needs and the file lacks.

    Levels come from the output side: each of the L levels has num_res_blocks + 1 output blocks and
    all but one end in an upsampler (a conv, or a ResBlock with `resblock_updown`), so L and
    num_res_blocks follow from two counts; then input block i >= 1 sits at level (i-1) // (n+1).
    Head counts are not stored in any tensor; like ComfyUI we take the conventions: 8 heads for
    spatial transformers, 64-channel heads with a 1024-wide (SD 2) context, 32-channel heads for the
    legacy attention blocks of the original LDMs.
    """
    model_channels = sd["time_embed.0.weight"].shape[1]
    outputs = {int(k.split(".")[1]) for k in sd if k.startswith("output_blocks.")}
    upsamplers = {i for i in outputs for j in (1, 2)
                  if f"output_blocks.{i}.{j}.conv.weight" in sd or f"output_blocks.{i}.{j}.in_layers.0.weight" in sd}
    n_levels = len(upsamplers) + 1
    per_level = len(outputs) // n_levels
    mult, attention_ds = [], set()
    for level in range(n_levels):
        first = 1 + level * per_level
        mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        if any(k.startswith(f"input_blocks.{first}.1.") for k in sd):
            attention_ds.add(2**level)
    spatial = any(".transformer_blocks." in k for k in sd)
    context_dim, heads, head_channels, depth, linear = None, 8, -1, 1, False
    depths: tuple[int, ...] = ()
    if spatial:
        first_st = next(k for k in sd if ".transformer_blocks." in k).split(".transformer_blocks.")[0]
        to_k = sd[first_st + ".transformer_blocks.0.attn2.to_k.weight"]
        to_q = sd[first_st + ".transformer_blocks.0.attn2.to_q.weight"]
        # an unconditional spatial transformer has attn2 = self-attention: to_k as wide as to_q's input
        context_dim = None if to_k.shape[1] == to_q.shape[1] and to_k.shape[1] != 768 else to_k.shape[1]
        if context_dim == 1024:
            heads, head_channels = -1, 64
        depth, depths = depths_config(_level_depths(sd, n_levels, per_level),
                                      [2**level in attention_ds for level in range(n_levels)])
        linear = sd[first_st + ".proj_in.weight"].ndim == 2
    elif any(k.endswith(".qkv.weight") for k in sd):
        heads, head_channels = -1, 32
    first_out = sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
    config = UNetConfig(
        in_channels=sd["input_blocks.0.0.weight"].shape[1],
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=per_level - 1,
        attention_resolutions=tuple(sorted(attention_ds, reverse=True)),
        num_heads=heads,
        num_head_channels=head_channels,
        transformer_depth=depth,
        level_depths=depths,
        context_dim=context_dim,
        use_spatial_transformer=spatial,
        use_linear_in_transformer=linear,
        num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None,
        use_scale_shift_norm=sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * first_out,
        resblock_updown=any(f"output_blocks.{i}.{j}.in_layers.0.weight" in sd for i in upsamplers for j in (1, 2)),
    )
    _check_middle_depth(sd, config)
    return config


def _level_depths(sd: StateDict, n_levels: int, per_level: int) -> list[int]:
    """Transformer blocks per level (0 where a level has no attention); a last level without attention counts
    the middle block's, which takes the last level's depth."""
    def count(block: str) -> int:
        return len({k[len(block):].split(".")[0] for k in sd if k.startswith(block)})

    depths = [count(f"input_blocks.{1 + level * per_level}.1.transformer_blocks.") for level in range(n_levels)]
    if not depths[-1]:
        depths[-1] = count("middle_block.1.transformer_blocks.")
    return depths


def _check_middle_depth(sd: StateDict, unet: UNetConfig) -> None:
    """The middle block takes the last level's depth (the original's default); a file whose middle block has
    another is refused rather than run with the wrong count."""
    prefix = "middle_block.1.transformer_blocks."
    middle = len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    last = unet.depth(len(unet.channel_mult) - 1)
    if middle and middle != last:
        raise ValueError(f"the middle block has {middle} transformer blocks, the last level {last}: a middle "
                         "depth of its own is not supported")


def infer_autoencoder_config(sd: StateDict) -> AutoencoderConfig:
    """The autoencoder's architecture from its tensors (keys without `first_stage_model.`); a KeyError
    names a key the layout needs and the file lacks."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    embed_dim = sd["post_quant_conv.weight"].shape[1]
    mult, level = [], 0
    while f"encoder.down.{level}.block.0.conv1.weight" in sd:
        mult.append(sd[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] // ch)
        level += 1
    if not mult:
        raise KeyError("encoder.down.0.block.0.conv1.weight")
    blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    resolution = 256
    attn = tuple(resolution // 2**lv for lv in range(level) if f"encoder.down.{lv}.attn.0.q.weight" in sd)
    vq = "quantize.embedding.weight" in sd
    return AutoencoderConfig(
        kind="vq" if vq else "kl",
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=blocks,
        attn_resolutions=attn,
        resolution=resolution,
        z_channels=z_channels,
        embed_dim=embed_dim,
        n_embed=sd["quantize.embedding.weight"].shape[0] if vq else 0,
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
    )


def infer_clip_config(sd: StateDict) -> CLIPTextConfig:
    """The CLIP text transformer's size (keys without `cond_stage_model.`)."""
    p = "transformer.text_model."
    tok = sd[p + "embeddings.token_embedding.weight"]
    width = tok.shape[1]
    layers = len({k.split(".")[4] for k in sd if k.startswith(p + "encoder.layers.")})
    return CLIPTextConfig(
        vocab_size=tok.shape[0],
        hidden_size=width,
        intermediate_size=sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=width // 64 if width % 64 == 0 else 1,  # not stored: CLIP's 64-channel heads
        max_positions=sd[p + "embeddings.position_embedding.weight"].shape[0],
    )


def infer_schedule(sd: StateDict) -> ScheduleConfig:
    """The training schedule from the stored `betas` buffer, SD v1's when there is none."""
    if "betas" not in sd:
        return ScheduleConfig()
    betas = sd["betas"].double().reshape(-1)
    start, end, n = float(betas[0]), float(betas[-1]), betas.numel()
    scaled = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if torch.allclose(betas, scaled, rtol=1e-4, atol=1e-9):
        return ScheduleConfig(beta_schedule="scaled_linear", beta_start=round(start, 8), beta_end=round(end, 8),
                              num_train_timesteps=n)
    plain = torch.linspace(start, end, n, dtype=torch.float64)
    if torch.allclose(betas, plain, rtol=1e-4, atol=1e-9):
        return ScheduleConfig(beta_schedule="linear", beta_start=round(start, 8), beta_end=round(end, 8),
                              num_train_timesteps=n)
    return ScheduleConfig(beta_schedule="cosine", num_train_timesteps=n)


def _inferred(part: str, infer: Callable[[StateDict], T], sd: StateDict) -> T:
    """`infer(sd)`, with the lookups of a key the layout needs turned into an error naming that key."""
    try:
        return infer(sd)
    except KeyError as err:
        raise CheckpointError(
            f"missing {part} key {PREFIXES[part]}{err.args[0]}, needed to infer the architecture"
        ) from None
    except (IndexError, StopIteration, ZeroDivisionError, ValueError) as err:
        raise CheckpointError(
            f"the {part} weights do not have a known layout, so its architecture cannot be inferred "
            f"({type(err).__name__}: {err})"
        ) from None


def _require_unet(sd: StateDict) -> None:
    """Refuse a file without the UNet's keys, saying what it looks like instead."""
    unet_prefix = PREFIXES["unet"]
    if not any(k.startswith(unet_prefix) for k in sd):
        hint = ""
        if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for k in sd):
            hint = " (this looks like one diffusers component file: pass the whole diffusers folder)"
        elif any(k.startswith(("encoder.", "decoder.")) for k in sd):
            hint = " (this looks like an autoencoder alone, not a whole latent diffusion model)"
        raise CheckpointError(f"not a latent diffusion checkpoint: no {unet_prefix}* keys{hint}")


def infer_model_config(sd: StateDict, name: str, *, prediction_type: PredictionType | None = None,
                       metadata: Mapping[str, str] | None = None) -> ModelConfig:
    """Family and architecture of an original single-file checkpoint, from keys and shapes.

    The prediction type is in no tensor: `prediction_type` when given, else the file's ModelSpec metadata
    (`modelspec.prediction_type`), else epsilon for SD 1 and the LDMs; SD 2 files have both kinds (512-base
    predicts epsilon, 768-v predicts v), so one without either is refused rather than guessed."""
    _require_unet(sd)
    parts = split_parts(sd)
    unet = _inferred("unet", infer_unet_config, parts["unet"])
    autoencoder = _inferred("autoencoder", infer_autoencoder_config, parts["autoencoder"])
    if unet.adm_in_channels is not None:
        raise CheckpointError("the UNet takes SDXL's added vector (model.diffusion_model.label_emb.0.*), but the file "
                              "has no SDXL text encoders (conditioner.embedders.*)")
    schedule = infer_schedule(sd)
    clip = any(k.startswith("transformer.text_model.") for k in parts["conditioner"])
    openclip = any(k.startswith(PREFIXES["conditioner"] + OPENCLIP_PREFIX) for k in sd)
    latent = autoencoder.embed_dim
    if clip and openclip and unet.in_channels == latent + 3:
        return _x4_upscaler(name, sd, parts, unet, autoencoder, schedule, prediction_type, metadata)
    low_scale = sorted(k for k in sd if k.startswith("low_scale_model."))
    if low_scale:
        raise CheckpointError(f"low-resolution noise schedule keys ({_shown(low_scale)}) in a file that is not the "
                              "SD x4 upscaler (an OpenCLIP text encoder and a latent + 3 channel UNet)")
    schedule = dataclasses.replace(schedule, prediction_type=_prediction_type(prediction_type, metadata, openclip))
    if clip:
        if unet.context_dim == 1024 and not openclip:
            raise CheckpointError(
                "this is a Stable Diffusion 2.x checkpoint (1024-wide context) with SD 1's CLIP key names "
                "(cond_stage_model.transformer.*): SD 2 files hold OpenCLIP's (cond_stage_model.model.*), and "
                "without them the text encoder's activation and output layer are unknown"
            )
        clip_config = _inferred("conditioner", infer_clip_config, parts["conditioner"])
        if openclip:  # OpenCLIP ViT-H: exact GELU, pads with "!" (id 0); the UNet has 64-channel heads
            clip_config = dataclasses.replace(clip_config, hidden_act="gelu", pad_token="!")
            unet = dataclasses.replace(unet, num_heads=-1, num_head_channels=64)
        conditioner = ConditionerConfig(kind="clip", clip=clip_config)
        unet = dataclasses.replace(unet, context_dim=clip_config.hidden_size)
        size = 768 if openclip and schedule.prediction_type == "v_prediction" else 512
        if unet.in_channels == latent:
            return ModelConfig(name=name, family="sd_v2" if openclip else "sd_v1", unet=unet,
                               autoencoder=autoencoder, schedule=schedule, conditioner=conditioner,
                               conditioning="crossattn", default_size=size)
        if unet.in_channels == 2 * latent + 1:
            return ModelConfig(name=name, family="sd_v2_inpainting" if openclip else "sd_v1_inpainting", unet=unet,
                               autoencoder=autoencoder, schedule=schedule, conditioner=conditioner,
                               conditioning="hybrid", concat_input="inpaint", default_size=size)
        raise CheckpointError(
            f"SD v1 text encoder with a {unet.in_channels}-channel UNet input: expected {latent} (txt2img) "
            f"or {2 * latent + 1} (inpainting)"
        )
    classes = parts["conditioner"].get("embedding.weight")
    if classes is not None and len(parts["conditioner"]) == 1 and unet.in_channels == latent:
        # the paper's class-conditional LDMs (cin256-v2: ClassEmbedder, 1000 classes + the null class 1000)
        rows, dim = classes.shape
        conditioner = ConditionerConfig(kind="class", n_classes=rows - 1, class_dim=dim)
        return ModelConfig(name=name, family="ldm", unet=dataclasses.replace(unet, context_dim=dim),
                           autoencoder=autoencoder, schedule=schedule, conditioner=conditioner,
                           conditioning="crossattn", scale_factor=1.0 if autoencoder.kind == "vq" else 0.18215,
                           default_size=256, description="class-conditional LDM (prompt = class id)")
    if not parts["conditioner"] and unet.in_channels == latent + 3:
        return ModelConfig(name=name, family="ldm_sr", unet=unet, autoencoder=autoencoder, schedule=schedule,
                           conditioner=None, conditioning="concat", concat_input="lowres",
                           scale_factor=1.0, default_size=256)
    raise CheckpointError(
        "unrecognised latent diffusion family: expected SD v1 (CLIP text encoder, 4- or 9-channel UNet), a "
        "class-conditional LDM (cond_stage_model.embedding.weight), "
        f"LDM super-resolution (no text encoder, UNet input = latent + 3), or an ldm-serve file with its config; "
        f"found UNet input {unet.in_channels}, latent {latent}, conditioner keys {len(parts['conditioner'])}"
    )


def _x4_upscaler(name: str, sd: StateDict, parts: dict[str, StateDict], unet: UNetConfig,
                 autoencoder: AutoencoderConfig, schedule: ScheduleConfig, given: PredictionType | None,
                 metadata: Mapping[str, str] | None) -> ModelConfig:
    """The SD x4 upscaler's original file (models/upscaler_layout.py): OpenCLIP ViT-H as SD 2, v-prediction unless
    the caller or the file's metadata says otherwise."""
    from models.upscaler_layout import x4_upscaler_config  # it builds on this module

    clip = _inferred("conditioner", infer_clip_config, parts["conditioner"])
    clip = dataclasses.replace(clip, hidden_act="gelu", pad_token="!")
    unet = dataclasses.replace(unet, context_dim=clip.hidden_size)
    spec = (metadata or {}).get("modelspec.prediction_type")
    prediction = _prediction_type(given, metadata, openclip=False) if given or spec else None
    return x4_upscaler_config(name, sd, parts["unet"], unet, autoencoder, clip, schedule, prediction)


def _prediction_type(given: PredictionType | None, metadata: Mapping[str, str] | None,
                     openclip: bool) -> PredictionType:
    """What a single file's UNet predicts (see `infer_model_config`)."""
    spec = (metadata or {}).get("modelspec.prediction_type")
    from_spec: dict[str | None, PredictionType] = {"epsilon": "epsilon", "v": "v_prediction",
                                                   "v_prediction": "v_prediction"}
    if spec is not None and spec not in from_spec:
        raise CheckpointError(f"metadata modelspec.prediction_type={spec!r} is not epsilon or v")
    if given is not None:
        if spec is not None and from_spec[spec] != given:
            raise CheckpointError(f"prediction type {given!r} asked, but the file's metadata says {spec!r}")
        return given
    if spec is not None:
        return from_spec[spec]
    if openclip:
        raise CheckpointError(
            "Stable Diffusion 2.x files do not record whether the UNet predicts epsilon (the 512-base models) "
            "or v (the 768-v models): give the prediction type (--prediction-type epsilon|v_prediction)"
        )
    return "epsilon"


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where one tensor of a part is: its file, its key there, and its shape in our module (diffusers
    stores the VAE's 1x1 attention convs as Linear weights)."""

    file: TensorFile
    key: str
    shape: torch.Size

    def read(self, dtype: torch.dtype, *, lookup_table: bool = False) -> torch.Tensor:
        """In `dtype`; a lookup table already in it is mapped, not read (only the rows used become resident)."""
        if lookup_table and self.file.meta[self.key].dtype == dtype:
            return self.file.map(self.key).reshape(self.shape)
        return self.file.read(self.key, dtype).reshape(self.shape)


#: a part's keys (ours, prefix stripped) -> where each tensor is stored
Sources = dict[str, Stored]


def in_memory_sources(path: Path, parts: dict[str, StateDict]) -> dict[str, Sources]:
    """Tensors already in memory (converted from another layout, or from a pickle read whole) as sources;
    each is released as it is loaded."""
    flat = {f"{part}/{key}": tensor for part, tensors in parts.items() for key, tensor in tensors.items()}
    file = InMemoryFile(path, flat)
    return {part: {key: Stored(file, f"{part}/{key}", tensor.shape) for key, tensor in tensors.items()}
            for part, tensors in parts.items()}


def file_parts(file: TensorFile) -> dict[str, Sources]:
    """Where each tensor of each part is in an original single file. SD 2's OpenCLIP text encoder is read and
    converted to our CLIP layout in memory (its fused q/k/v are split); everything else is read when loaded."""
    parts = {part: {k: Stored(file, PREFIXES[part] + k, t.shape) for k, t in tensors.items()}
             for part, tensors in split_parts(file.meta).items()}
    prefix = PREFIXES["conditioner"]
    if any(k.startswith(prefix + OPENCLIP_PREFIX) for k in file.meta):
        raw = {k[len(prefix):]: file.read(k) for k in file.meta if k.startswith(prefix)}
        parts["conditioner"] = in_memory_sources(file.path, {"conditioner": openclip_to_clip(raw)})["conditioner"]
    return parts


def load_parts_strict(model: LatentDiffusion, parts: dict[str, Sources], source: str, dtype: torch.dtype) -> None:
    """Load every part with strict key and shape checks, naming every offending key; each tensor is read
    only after every check passed, in `dtype`, and becomes the module's own parameter (no copy)."""
    problems = []
    for part in PREFIXES:
        module = getattr(model, part)
        given = parts.get(part, {})
        if module is not None and not given and getattr(module, "weights_from_package", False):
            continue  # loaded from its package when built (files saved by `save_model` leave it out)
        if module is None:
            if given:
                problems.append(f"{part}: the config has none, but the file has {_shown(sorted(given))}")
            continue
        expected = module.state_dict()
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        misshaped = sorted(
            f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
            for k in set(given) & set(expected)
            if given[k].shape != expected[k].shape
        )
        prefix = PREFIXES[part]
        if missing:
            problems.append(f"missing {part} keys: {_shown([prefix + k for k in missing])}")
        if unexpected:
            problems.append(f"unexpected {part} keys: {_shown([prefix + k for k in unexpected])}")
        if misshaped:
            problems.append(f"misshaped {part} keys (file vs model): {_shown([prefix + k for k in misshaped])}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read")
    try:
        for part in PREFIXES:
            module = getattr(model, part)
            if module is not None and parts.get(part):
                tables = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
                keys = list(parts[part])
                tensors = pool.map(lambda s, table: s.read(dtype, lookup_table=table),
                                   [parts[part][k] for k in keys], [k in tables for k in keys])
                module.load_state_dict(dict(zip(keys, tensors, strict=True)), strict=True, assign=True)
    finally:  # a read that failed (a truncated file) leaves no others running
        pool.shutdown(wait=True, cancel_futures=True)


#: threads reading a model's tensors at once. A read copies from the page cache into fresh memory, and the page
#: faults of that memory are most of its time: on 2 cores two threads load SD-1.5's 3.97 GiB in 1.7-1.8 s where one
#: took 2.5 s and more (`python bench/model_bench.py --loading`; docs/benchmarks.md, "Loading from files")
READ_THREADS = min(4, os.cpu_count() or 1)


class _SkipRandomInit(TorchFunctionMode):
    """Random initialisation of meta tensors as a no-op: the values come from the file anyway, and
    `normal_` on a meta tensor runs a decomposition that imports torch._dynamo (seconds, ~100 MB)."""

    SKIPPED = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, *(getattr(torch.nn.init, name) for name in (
        "normal_", "uniform_", "trunc_normal_", "kaiming_normal_", "kaiming_uniform_", "xavier_normal_",
        "xavier_uniform_", "orthogonal_"))})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _build(config: ModelConfig, tokenizer_dir: Path | None) -> LatentDiffusion:
    """The model with weights on the meta device (no random init of 1 B parameters), to be assigned."""
    with torch.device("meta"), _SkipRandomInit():
        model = LatentDiffusion(config, tokenizer_dir=tokenizer_dir)
    return model


def _finish(model: LatentDiffusion, device: str | torch.device, dtype: torch.dtype) -> LatentDiffusion:
    # Every tensor comes from the file (strict load) or is built on the CPU (the schedule); a module that
    # computed a non-persistent buffer in its constructor would stay on the meta device: say so, loudly.
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors no file provides (computed buffers are not supported): {_shown(leftovers)}")
    model.to(device=device, dtype=dtype)  # on the CPU a no-op for what the files gave (read in `dtype`)
    model.eval().requires_grad_(False)
    return model


def _model_config(path: Path, file: TensorFile, prediction_type: PredictionType | None = None) -> ModelConfig:
    if CONFIG_METADATA_KEY in file.metadata:
        try:
            config = from_dict(ModelConfig, json.loads(file.metadata[CONFIG_METADATA_KEY]), where=CONFIG_METADATA_KEY)
        except ValueError as err:  # json.JSONDecodeError included
            raise CheckpointError(f"{path}: the model config in its metadata is invalid: {err}") from None
        _check_prediction_type(path, config.schedule, prediction_type)
        return config
    from models.sdxl_layout import is_sdxl_file  # SDXL builds on this module

    if is_sdxl_file(file.meta):
        from models.sdxl_load import sdxl_file_config

        return sdxl_file_config(path, file, prediction_type)[0]
    shapes = dict(file.meta)  # inference needs shapes only, but for the schedules' values
    for betas in ("betas", "low_scale_model.betas"):
        if betas in shapes:
            shapes[betas] = file.read(betas)
    try:
        return infer_model_config(shapes, name=path.stem, prediction_type=prediction_type, metadata=file.metadata)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _check_prediction_type(source: Path, schedule: ScheduleConfig, given: PredictionType | None) -> None:
    """A prediction type asked for a model whose config already says one must agree with it."""
    if given is not None and given != schedule.prediction_type:
        raise CheckpointError(f"{source}: prediction type {given!r} asked, but the model's config says "
                              f"{schedule.prediction_type!r}")


def read_model_config(path: Path, *, prediction_type: PredictionType | None = None) -> ModelConfig:
    """The config of a single-file checkpoint (its metadata, or inferred from its keys), without building it."""
    return _model_config(path, open_tensor_file(path), prediction_type)


def load_single_file(
    path: Path,
    *,
    tokenizer_dir: Path | None = None,
    tokenizer_2_dir: Path | None = None,
    use_ema: bool = False,
    prediction_type: PredictionType | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentDiffusion:
    """An original single-file checkpoint, or one saved by `save_model` (config in its metadata). SDXL
    (`conditioner.embedders.*`) takes two tokenizer folders (models/sdxl_load.py)."""
    file = open_tensor_file(path)
    from models.sdxl_layout import is_sdxl_file  # SDXL builds on this module

    if CONFIG_METADATA_KEY not in file.metadata and is_sdxl_file(file.meta):
        from models.sdxl_load import load_sdxl_file

        if use_ema:
            raise CheckpointError(f"{path}: SDXL files hold one set of UNet weights, no EMA copy")
        return load_sdxl_file(path, file, tokenizer_dir=tokenizer_dir, tokenizer_2_dir=tokenizer_2_dir,
                              prediction_type=prediction_type, device=device, dtype=dtype)
    config = _model_config(path, file, prediction_type)
    parts = file_parts(file)
    if use_ema:
        try:
            ema = ema_unet_keys(file.meta.keys(), list(parts["unet"]))
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        parts["unet"] = {k: Stored(file, key, file.meta[key].shape) for k, key in ema.items()}
    model = _build(config, tokenizer_dir)
    if tokenizer_2_dir is not None:
        from models.sdxl_load import given_tokenizers, set_tokenizers

        if config.conditioner is None or config.conditioner.kind != "sdxl":
            raise CheckpointError(f"{path}: a second tokenizer (--tokenizer-2) is for SDXL; this is {config.family}")
        set_tokenizers(model, given_tokenizers(len(config.conditioner.sdxl.encoders), tokenizer_dir, tokenizer_2_dir))
    load_parts_strict(model, parts, str(path), dtype)
    log.info("loaded %s (family %s) from %s", config.name, config.family, path)
    return _finish(model, device, dtype)


#: diffusers pipelines whose folders hold an SD 1/2 model (txt2img, inpainting or the x4 upscaler: one UNet, VAE,
#: CLIP encoder; the upscaler also a `low_res_scheduler`)
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline",
                "StableDiffusionUpscalePipeline")
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"


def _weights_in(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix}.index.json"):  # whole, or shards
                if candidate.is_file():
                    return candidate
    raise CheckpointError(f"{folder}: no weights file ({', '.join(s + '.safetensors' for s in stems)} or .bin, "
                          "whole or in shards with an .index.json)")


def load_diffusers_folder(
    folder: Path,
    *,
    tokenizer_dir: Path | None = None,
    tokenizer_2_dir: Path | None = None,
    prediction_type: PredictionType | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentDiffusion:
    """A diffusers StableDiffusionPipeline folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/. Every
    config field that changes the math is read or refused by name (models/diffusers_layout.py)."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = index.get("_class_name", "StableDiffusionPipeline")
    # the SDXL refiner has text_encoder_2/ alone
    for sub in ("unet", "vae", "text_encoder_2" if pipeline.startswith("StableDiffusionXL") else "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a diffusers Stable Diffusion folder ({sub}/config.json is missing)")
    from models.sdxl_layout import SDXL_PIPELINES  # SDXL builds on this module
    if pipeline in SDXL_PIPELINES:
        from models.sdxl_load import load_sdxl_folder

        return load_sdxl_folder(folder, index, tokenizer_dir=tokenizer_dir, tokenizer_2_dir=tokenizer_2_dir,
                                prediction_type=prediction_type, device=device, dtype=dtype)
    if pipeline not in SD_PIPELINES:
        raise CheckpointError(f"{folder}: a {pipeline} folder; supported are "
                              f"{', '.join(SD_PIPELINES + SDXL_PIPELINES)}")
    if tokenizer_2_dir is not None:
        raise CheckpointError(f"{folder}: a second tokenizer (--tokenizer-2) is for SDXL; this is a {pipeline}")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    low_res_path = folder / "low_res_scheduler" / "scheduler_config.json"
    if pipeline == UPSCALE_PIPELINE and not low_res_path.is_file():
        raise CheckpointError(f"{folder}: a {pipeline} folder without low_res_scheduler/scheduler_config.json (the "
                              "schedule that noises the low-resolution input)")
    unet_json = read_json(folder / "unet" / "config.json")
    try:
        unet_config = unet_config_from_diffusers(unet_json)
        ae_config, scale = autoencoder_config_from_diffusers(read_json(folder / "vae" / "config.json"))
        clip = clip_config_from_transformers(read_json(folder / "text_encoder" / "config.json"))
        schedule = schedule_config_from_diffusers(read_json(sched_path)) if sched_path.is_file() else None
        lowres_noise = (noise_schedule_config_from_diffusers(read_json(low_res_path))
                        if pipeline == UPSCALE_PIPELINE else None)
    except (UnsupportedConfigError, KeyError) as err:
        what = f"missing config field {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{folder}: {what}") from None
    if schedule is None:
        schedule = ScheduleConfig(prediction_type=prediction_type or "epsilon")
    _check_prediction_type(sched_path, schedule, prediction_type)
    if unet_config.adm_in_channels is not None:
        raise CheckpointError(f"{folder}: the UNet has SDXL's added embedding (addition_embed_type 'text_time'), but "
                              f"the folder is a {pipeline}, not a StableDiffusionXLPipeline")
    config = _diffusers_model_config(folder, unet_json, unet_config, ae_config, scale, clip, schedule, lowres_noise,
                                     int(index.get("max_noise_level", 350)))
    tokenizer_dir = tokenizer_dir or (folder / "tokenizer" if (folder / "tokenizer").is_dir() else None)
    model = _build(config, tokenizer_dir)
    parts = diffusers_unet_and_vae(folder, model, unet_config, ae_config)
    parts["conditioner"] = _text_encoder_keys(open_tensor_file(_weights_in(folder / "text_encoder",
                                                                           ("model", "pytorch_model"))))
    load_parts_strict(model, parts, str(folder), dtype)
    return _finish(model, device, dtype)


def diffusers_unet_and_vae(folder: Path, model: LatentDiffusion, unet: UNetConfig, ae: AutoencoderConfig
                           ) -> dict[str, Sources]:
    """Where a diffusers folder's UNet and VAE tensors are, in our keys: the same for every family (SD 1/2, the
    x4 upscaler, SDXL); only the text encoders differ."""
    return {
        "unet": _from_diffusers(folder / "unet", ("diffusion_pytorch_model",),
                                unet_key_map(list(model.unet.state_dict()), unet)),
        "autoencoder": _from_diffusers(folder / "vae", ("diffusion_pytorch_model",),
                                       autoencoder_key_map(list(model.autoencoder.state_dict()), ae),
                                       squeeze_attention=True),
    }


def _diffusers_model_config(folder: Path, unet_json: dict[str, Any], unet: UNetConfig, ae: AutoencoderConfig,
                            scale: float, clip: CLIPTextConfig, schedule: ScheduleConfig,
                            lowres_noise: ScheduleConfig | None, max_noise_level: int) -> ModelConfig:
    """The model a diffusers folder holds: txt2img, inpainting (a 9-channel UNet) or, with a low-resolution noise
    schedule, the x4 upscaler (a 7-channel UNet: latent + the noised low-resolution image, the noise level as its
    class label)."""
    latent = ae.embed_dim
    inpainting = unet.in_channels == 2 * latent + 1
    v2 = clip.hidden_act == "gelu"  # OpenCLIP ViT-H (SD 2) or OpenAI's ViT-L (SD 1)
    family: Family = (("sd_v2_inpainting" if inpainting else "sd_v2") if v2
                      else ("sd_v1_inpainting" if inpainting else "sd_v1"))
    wiring: dict[str, Any] = {"conditioning": "hybrid" if inpainting else "crossattn",
                              "concat_input": "inpaint" if inpainting else "none"}
    if lowres_noise is not None:
        family, wiring = "sd_v2_upscaler", {"conditioning": "hybrid", "concat_input": "lowres",
                                            "lowres_noise": lowres_noise, "max_noise_level": max_noise_level}
    try:
        return ModelConfig(
            name=folder.name, family=family, unet=unet, autoencoder=ae, schedule=schedule,
            conditioner=ConditionerConfig(kind="clip", clip=clip), scale_factor=scale,
            default_size=default_size_from_diffusers(unet_json, ae), **wiring,
        )
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from None


def _text_encoder_keys(file: TensorFile) -> Sources:
    """HF CLIPTextModel keys -> ours: transformers < 5 saves `text_model.*`, transformers >= 5 drops
    that level; `position_ids` is a buffer we rebuild."""
    return {"transformer." + (k if k.startswith("text_model.") else "text_model." + k): Stored(file, k, t.shape)
            for k, t in file.meta.items() if not k.endswith("position_ids")}


def _from_diffusers(
    folder: Path, stems: tuple[str, ...], key_map: dict[str, str], *, squeeze_attention: bool = False
) -> Sources:
    """A diffusers component's tensors under the original keys (strictly)."""
    file = open_tensor_file(_weights_in(folder, stems))
    inverse = {new: old for old, new in key_map.items()}
    unexpected = sorted(set(file.meta) - set(inverse))
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected keys {_shown(unexpected)}")
    out = {}
    for new, tensor in file.meta.items():
        old = inverse[new]
        shape = tensor.shape
        if squeeze_attention and ".mid.attn_1." in old and tensor.ndim == 2:
            shape = torch.Size([*shape, 1, 1])  # diffusers stores the 1x1 conv attention weights as Linear
        out[old] = Stored(file, new, shape)
    return out


def load_model(
    source: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    use_ema: bool = False,
    prediction_type: PredictionType | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
    tokenizer_2_dir: str | Path | None = None,
) -> LatentDiffusion:
    """A shipped model name (models/zoo/<name>/), a single checkpoint file or a diffusers folder. A CompVis
    zoo checkpoint (`DIR/model.ckpt` with `DIR/config.yaml`, or any file with `config`) is described by its
    config.yaml (models/compvis/). `prediction_type`: what the UNet predicts, for files that do not say (SD 2);
    checked against any config. `tokenizer_2_dir`: SDXL's second tokenizer (bigG's), for single files."""
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    tok2 = Path(tokenizer_2_dir) if tokenizer_2_dir is not None else None
    path = Path(source)
    from models.compvis.load import config_beside, load_zoo_checkpoint  # it builds on this module

    zoo_config = Path(config) if config is not None else config_beside(path) if path.is_file() else None
    if zoo_config is not None:
        return load_zoo_checkpoint(path, zoo_config, tokenizer_dir=tok, use_ema=use_ema, device=device, dtype=dtype)
    if not path.exists() and (ZOO_DIR / str(source)).is_dir():
        path = ZOO_DIR / str(source)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
            if use_ema:
                raise CheckpointError(f"{path}: a diffusers folder holds one set of UNet weights, no EMA copy")
            return load_diffusers_folder(path, tokenizer_dir=tok, tokenizer_2_dir=tok2,
                                         prediction_type=prediction_type, device=device, dtype=dtype)
        weights = sorted(path.glob("*.safetensors"))
        if len(weights) != 1:
            raise CheckpointError(f"{path}: expected one .safetensors file or a diffusers folder, found {len(weights)}")
        return load_single_file(weights[0], tokenizer_dir=tok, tokenizer_2_dir=tok2, use_ema=use_ema,
                                prediction_type=prediction_type, device=device, dtype=dtype)
    if path.is_file():
        return load_single_file(path, tokenizer_dir=tok, tokenizer_2_dir=tok2, use_ema=use_ema,
                                prediction_type=prediction_type, device=device, dtype=dtype)
    shipped = sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir()) if ZOO_DIR.is_dir() else []
    raise CheckpointError(f"{source}: no such file or folder, and not a shipped model (shipped: {shipped})")


def save_model(model: LatentDiffusion, path: str | Path) -> Path:
    """Save in the original single-file layout, fp32 or the model's dtype, config in the metadata."""
    if is_packed(model):
        raise ValueError("this model was optimized for CPU inference (prepacked weights): save it before optimizing")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.original_state_dict().items()}
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(to_dict(model.config))})
    return path
