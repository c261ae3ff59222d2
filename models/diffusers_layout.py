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
from models.unet import UNetConfig

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


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """UNet2DConditionModel's config.json -> UNetConfig (SD v1-style UNets)."""
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    # highest ds first, the order of the original configs ([4, 2, 1]) and of shape inference
    attention = tuple(2**i for i, kind in reversed(list(enumerate(cfg["down_block_types"])))
                      if kind.startswith("CrossAttn"))
    heads = cfg.get("attention_head_dim", 8)  # diffusers' misnomer: for SD v1 this is the head count
    if isinstance(heads, list):
        heads = heads[0]
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        depth = depth[0]
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=cfg["layers_per_block"],
        attention_resolutions=attention,
        num_heads=int(heads),
        transformer_depth=int(depth),
        context_dim=cfg.get("cross_attention_dim", 768),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        num_classes=cfg.get("num_class_embeds"),
    )


def autoencoder_config_from_diffusers(cfg: dict[str, Any]) -> tuple[AutoencoderConfig, float]:
    """AutoencoderKL's config.json -> (AutoencoderConfig, scaling factor)."""
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


def schedule_config_from_diffusers(cfg: dict[str, Any]) -> ScheduleConfig:
    """scheduler_config.json -> ScheduleConfig (the model's own training schedule)."""
    spacing = cfg.get("timestep_spacing", "leading")
    return ScheduleConfig(
        beta_schedule="cosine" if cfg.get("beta_schedule") == "squaredcos_cap_v2" else cfg["beta_schedule"],
        beta_start=float(cfg.get("beta_start", 0.00085)),
        beta_end=float(cfg.get("beta_end", 0.012)),
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        steps_offset=int(cfg.get("steps_offset", 1)),
        timestep_spacing=spacing,
    )


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
