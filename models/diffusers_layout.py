"""The diffusers folder layout (`unet/ vae/ text_encoder/ tokenizer/ scheduler/`), read into ours.

Diffusers renames the original CompVis keys (ldm-facts §4.2). Instead of a second hand-written table
in the other direction, `unet_key_map` / `autoencoder_key_map` walk *our* key names (which are the
original ones) and apply diffusers' documented renaming rules; loading a folder inverts that map.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from models.autoencoder import AutoencoderConfig
from models.diffusion import ScheduleConfig
from models.text.clip import CLIPTextConfig
from models.unet import UNetConfig, depths_config

_RESNET_RENAMES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


def read_json(path: Path) -> dict[str, Any]:
    with path.open() as fh:
        data: dict[str, Any] = json.load(fh)
    return data


class UnsupportedConfigError(ValueError):
    """A diffusers / transformers config field whose value changes the math in a way we do not implement."""


def _unsupported(what: str, cfg: dict[str, Any], field: str, allowed: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(
        f"{what} config field {field}={cfg[field]!r} is not supported (supported: {allowed})"
    )


def _require(what: str, cfg: dict[str, Any], required: dict[str, tuple[Any, ...]]) -> None:
    """Every field of `required` that the config holds must take one of the listed values (absent = the
    diffusers default, which is always the first one listed)."""
    for field, allowed in required.items():
        if field in cfg and cfg[field] not in allowed:
            raise _unsupported(what, cfg, field, " or ".join(repr(a) for a in allowed))


def _refuse_unknown(what: str, cfg: dict[str, Any], known: set[str]) -> None:
    """A field we have never seen may change the math: refuse it by name rather than guess."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        raise UnsupportedConfigError(f"{what} config has fields this loader does not know: {unknown}")


#: UNet2DConditionModel fields whose only supported values are these (SD 1.x / 2.x); an SDXL UNet fails
#: here by name (addition_embed_type 'text_time'), not on 336 unexpected keys.
_UNET_REQUIRED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0), "act_fn": ("silu",),
    "norm_eps": (1e-5,), "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "addition_embed_type_num_heads": (64,),
}
#: read into UNetConfig (or the model's default size); `upcast_attention` is read and needs nothing: it
#: only affects diffusers' non-SDPA attention in fp16, and every attention here is SDPA, which
#: accumulates the softmax in fp32 (diffusers' default AttnProcessor2_0 ignores the flag the same way)
_UNET_READ = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "dropout", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "num_class_embeds", "upcast_attention",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "only_cross_attention",
}


def _per_level(what: str, cfg: dict[str, Any], field: str, value: Any, levels: int) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value] * levels
    if len(values) != levels:
        raise UnsupportedConfigError(f"{what} config field {field} has {len(values)} entries for {levels} levels")
    return values


def _unet_heads(cfg: dict[str, Any], channels: list[int]) -> tuple[int, int]:
    """(num_heads, num_head_channels) of UNetConfig from diffusers' per-level head counts.

    diffusers' `attention_head_dim` is a misnomer kept for old configs: it holds the head COUNT per level
    (`num_attention_heads` overrides it when set), and each level's head width is its channels / count; the
    mid block uses the last level's. The original code has one rule for all levels, a head count (SD 1:
    8 heads everywhere) or a head width (SD 2: 64-channel heads, i.e. 5, 10, 20, 20 heads); a list that
    fits neither is refused rather than run with the first level's count everywhere."""
    field = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = [int(h) for h in _per_level("UNet", cfg, field, cfg.get(field, 8), len(channels))]
    if len(set(heads)) == 1:
        return heads[0], -1
    widths = {c // h for c, h in zip(channels, heads, strict=True) if c % h == 0}
    if len(widths) == 1 and all(c % h == 0 for c, h in zip(channels, heads, strict=True)):
        return -1, widths.pop()
    raise UnsupportedConfigError(
        f"UNet config field {field}={cfg[field]!r}: per-level head counts for block_out_channels {channels} "
        "that are neither one count for every level nor one head width for every level"
    )


def _added_vector(cfg: dict[str, Any]) -> int | None:
    """SDXL's `addition_embed_type: text_time` (pooled text + Fourier-embedded micro-conditioning through
    `add_embedding`) -> the vector's width; None without one. Both its widths must be given."""
    if cfg.get("addition_embed_type") != "text_time":
        for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if cfg.get(field) is not None:
                raise _unsupported("UNet", cfg, field, "null without addition_embed_type 'text_time'")
        return None
    for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if not isinstance(cfg.get(field), int):
            raise UnsupportedConfigError(f"UNet config has addition_embed_type 'text_time' but no {field}")
    if cfg.get("num_class_embeds") is not None:
        raise _unsupported("UNet", cfg, "num_class_embeds", "null with addition_embed_type 'text_time'")
    return int(cfg["projection_class_embeddings_input_dim"])


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """UNet2DConditionModel's config.json -> UNetConfig (SD 1.x, 2.x and SDXL UNets); any field that would
    change the math in a way UNetConfig cannot say is refused by name. SDXL's `addition_time_embed_dim` (the
    micro-conditioning's embedding width) is the text encoders' business: `sdxl_layout` reads it."""
    _refuse_unknown("UNet", cfg, set(_UNET_REQUIRED) | _UNET_READ)
    _require("UNet", cfg, _UNET_REQUIRED)
    channels = [int(c) for c in cfg["block_out_channels"]]
    # per level (or one for all): attn1 attends to the context (the x4 upscaler's True, True, True, False); the
    # UNetMidBlock2DCrossAttn middle block keeps self-attention whatever it says
    only_cross = [bool(b) for b in _per_level("UNet", cfg, "only_cross_attention",
                                              cfg.get("only_cross_attention", False), len(channels))]
    base = channels[0]
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    known_down, known_up = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    if any(d not in known_down for d in down) or any(u not in known_up for u in up):
        raise UnsupportedConfigError(f"UNet block types {down} / {up}: supported are {known_down} / {known_up}")
    if [d.startswith("CrossAttn") for d in down] != [u.startswith("CrossAttn") for u in reversed(up)]:
        raise UnsupportedConfigError(f"UNet up_block_types {up} do not mirror down_block_types {down}")
    # highest ds first, the order of the original configs ([4, 2, 1]) and of shape inference
    attention = tuple(2**i for i, kind in reversed(list(enumerate(down))) if kind.startswith("CrossAttn"))
    heads, head_channels = _unet_heads(cfg, channels)
    field = "transformer_layers_per_block"
    depths = _per_level("UNet", cfg, field, cfg.get(field, 1), len(channels))
    if any(not isinstance(d, int) for d in depths):
        raise _unsupported("UNet", cfg, field, "one depth per level")  # diffusers' per-block lists
    depth, level_depths = depths_config([int(d) for d in depths], [d.startswith("CrossAttn") for d in down])
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=cfg["layers_per_block"],
        attention_resolutions=attention,
        num_heads=heads,
        num_head_channels=head_channels,
        transformer_depth=depth,
        level_depths=level_depths,
        adm_in_channels=_added_vector(cfg),
        context_dim=cfg.get("cross_attention_dim", 768),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        num_classes=cfg.get("num_class_embeds"),
        dropout=float(cfg.get("dropout", 0.0)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        disable_self_attentions=tuple(only_cross) if any(only_cross) else None,
    )


_VAE_REQUIRED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",), "norm_num_groups": (32,), "shift_factor": (None, 0, 0.0), "latents_mean": (None,),
    "latents_std": (None,), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}
#: `force_upcast` (run the VAE in fp32 under an fp16 pipeline) and `sample_size` are read and change nothing
_VAE_READ = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "latent_channels", "sample_size", "scaling_factor", "force_upcast"}


def autoencoder_config_from_diffusers(cfg: dict[str, Any]) -> tuple[AutoencoderConfig, float]:
    """AutoencoderKL's config.json -> (AutoencoderConfig, scaling factor)."""
    _refuse_unknown("VAE", cfg, set(_VAE_REQUIRED) | _VAE_READ)
    _require("VAE", cfg, _VAE_REQUIRED)
    blocks = [*cfg.get("down_block_types", ()), *cfg.get("up_block_types", ())]
    if any(b not in ("DownEncoderBlock2D", "UpDecoderBlock2D") for b in blocks):
        raise UnsupportedConfigError(f"VAE block types {blocks}: supported are DownEncoderBlock2D / UpDecoderBlock2D")
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    config = AutoencoderConfig(
        kind="kl",
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        ch=base,
        ch_mult=tuple(c // base for c in channels),
        num_res_blocks=cfg["layers_per_block"],
        z_channels=cfg["latent_channels"],
        embed_dim=cfg["latent_channels"],
    )
    return config, float(cfg.get("scaling_factor", 0.18215))


#: scheduler fields that describe the model's training (read) ...
_SCHEDULE_READ = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                  "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"}
#: ... that would change it in ways we do not implement, or change the folder's default sampler in ways
#: ours never do (these must keep the value SD's configs have) ...
_SCHEDULE_REQUIRED: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,), "thresholding": (False,),
    "clip_sample": (False,), "set_alpha_to_one": (False,), "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,), "algorithm_type": ("dpmsolver++",),
}
#: ... and the folder's default-sampler settings, which a request's sampler choice replaces
_SCHEDULER_CHOICES = {
    "skip_prk_steps", "solver_order", "solver_type", "lower_order_final", "euler_at_final",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "final_sigmas_type",
    "lambda_min_clipped", "variance_type", "dynamic_thresholding_ratio", "sample_max_value",
    "clip_sample_range", "flow_shift", "time_shift_type", "interpolation_type", "timestep_type", "sigma_min",
    "sigma_max",
}


def schedule_config_from_diffusers(cfg: dict[str, Any]) -> ScheduleConfig:
    """scheduler_config.json -> ScheduleConfig (the model's own training schedule).

    Zero-terminal-SNR schedules (`rescale_betas_zero_snr`) are read; they need v-prediction (refused by name
    otherwise: at alpha-bar 0 epsilon carries no x0), and only the samplers that step from the model's own x0
    (ddim, dpmpp_2m) run them (models/samplers.py)."""
    _refuse_unknown("scheduler", cfg, _SCHEDULE_READ | set(_SCHEDULE_REQUIRED) | _SCHEDULER_CHOICES)
    _require("scheduler", cfg, _SCHEDULE_REQUIRED)
    schedules = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    if cfg.get("beta_schedule") not in schedules:
        raise _unsupported("scheduler", cfg, "beta_schedule", ", ".join(schedules))
    if cfg.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise _unsupported("scheduler", cfg, "prediction_type", "'epsilon' or 'v_prediction'")
    if cfg.get("timestep_spacing", "leading") not in ("leading", "trailing", "linspace"):
        raise _unsupported("scheduler", cfg, "timestep_spacing", "'leading', 'trailing' or 'linspace'")
    if cfg.get("rescale_betas_zero_snr", False) and cfg.get("prediction_type", "epsilon") != "v_prediction":
        raise UnsupportedConfigError(
            f"scheduler config field rescale_betas_zero_snr=True with prediction_type="
            f"{cfg.get('prediction_type', 'epsilon')!r}: a zero-terminal-SNR schedule needs 'v_prediction' (at "
            "alpha-bar 0 an epsilon prediction carries no x0)")
    return ScheduleConfig(
        beta_schedule=schedules[cfg["beta_schedule"]],  # type: ignore[arg-type]
        beta_start=float(cfg.get("beta_start", 0.00085)),
        beta_end=float(cfg.get("beta_end", 0.012)),
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        steps_offset=int(cfg.get("steps_offset", 0)),
        timestep_spacing=cfg.get("timestep_spacing", "leading"),
        rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )


#: fields of a scheduler that only its sampling reads: a pipeline that only noises an input with it (`add_noise`:
#: the x4 upscaler's `low_res_scheduler`, a DDPMScheduler with clip_sample true) never uses them
_SAMPLING_ONLY = {"clip_sample", "clip_sample_range", "variance_type", "prediction_type", "thresholding",
                  "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "steps_offset"}


def noise_schedule_config_from_diffusers(cfg: dict[str, Any]) -> ScheduleConfig:
    """A scheduler config used only to noise an input (the x4 upscaler's `low_res_scheduler`): its betas are read
    (and refused by name as `schedule_config_from_diffusers` refuses them); its sampling settings mean nothing."""
    return schedule_config_from_diffusers({k: v for k, v in cfg.items()
                                           if k not in _SAMPLING_ONLY | _SCHEDULER_CHOICES})


#: transformers CLIPTextConfig fields that change the text encoder's math (read), and the model types
_CLIP_ACTIVATIONS = ("quick_gelu", "gelu")


def clip_config_from_transformers(cfg: dict[str, Any], architecture: str = "CLIPTextModel") -> CLIPTextConfig:
    """A text_encoder/config.json (transformers CLIPTextModel) -> CLIPTextConfig.

    SD 1 uses OpenAI's CLIP ViT-L (quick_gelu); SD 2 uses OpenCLIP ViT-H (exact gelu), already cut to its
    penultimate layer in diffusers folders (23 of 24 layers, whose last hidden state after the final
    LayerNorm is SD 2's context). A projection model (SDXL's second encoder) is refused by name."""
    architectures = cfg.get("architectures") or [architecture]
    if architectures != [architecture] or cfg.get("model_type", "clip_text_model") != "clip_text_model":
        raise UnsupportedConfigError(
            f"text encoder architectures={architectures!r}, model_type={cfg.get('model_type')!r}: only "
            f"{architecture} (clip_text_model) is supported here"
        )
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _CLIP_ACTIVATIONS:
        raise _unsupported("text encoder", cfg, "hidden_act", " or ".join(_CLIP_ACTIVATIONS))
    return CLIPTextConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        max_positions=cfg["max_position_embeddings"], layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        hidden_act=act,
    )


def default_size_from_diffusers(unet_cfg: dict[str, Any], autoencoder: AutoencoderConfig) -> int:
    """The image size a UNet was trained at: sample_size latents x the VAE factor (SD 2 768-v: 96 x 8)."""
    sample = unet_cfg.get("sample_size")
    return int(sample) * autoencoder.downsample_factor if isinstance(sample, int) else 512


def _resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_key_map(keys: list[str], config: UNetConfig) -> dict[str, str]:
    """Original UNet key -> diffusers key, by diffusers' conversion rules."""
    per_level = config.num_res_blocks + 1
    out: dict[str, str] = {}
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
             "label_emb.": "class_embedding."}
    for key in keys:
        for old, new in fixed.items():
            if key.startswith(old):
                out[key] = new + key[len(old) :]
                break
        else:
            out[key] = _unet_block_key(key, per_level)
    return out


def _unet_block_key(key: str, per_level: int) -> str:
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = (i - 1) // per_level, (i - 1) % per_level
        if rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        kind = "resnets" if j == 0 else "attentions"
        return f"down_blocks.{block}.{kind}.{layer}.{_resnet(rest) if j == 0 else rest}"
    if m := re.match(r"middle_block\.(\d+)\.(.*)", key):
        j, rest = int(m[1]), m[2]
        if j == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{j // 2}.{_resnet(rest)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = i // per_level, i % per_level
        if rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        if j == 0:
            return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        return f"up_blocks.{block}.attentions.{layer}.{rest}"
    raise KeyError(f"no diffusers name for UNet key {key!r}")


def autoencoder_key_map(keys: list[str], config: AutoencoderConfig) -> dict[str, str]:
    """Original autoencoder key -> diffusers AutoencoderKL key."""
    levels = len(config.ch_mult)
    attn = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
    out: dict[str, str] = {}
    for key in keys:
        new = key.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
        new = re.sub(r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", new)
        new = re.sub(r"decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", new)
        new = re.sub(r"mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", new)
        if m := re.match(r"(.*)mid\.attn_1\.(.*)", new):
            rest = m[2]
            for old, rename in attn.items():
                if rest.startswith(old):
                    rest = rename + rest[len(old) :]
                    break
            new = f"{m[1]}mid_block.attentions.0.{rest}"
        out[key] = new
    return out
