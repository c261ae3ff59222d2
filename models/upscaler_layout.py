"""The SD x4 upscaler as one original single file (`x4-upscaler-ema.ckpt` / `.safetensors`, Stability-AI/
stablediffusion's `configs/stable-diffusion/x4-upscaling.yaml`, a `LatentUpscaleDiffusion`).

What the file holds: `model.diffusion_model.*` (a 7-channel UNet: latent + the noised low-resolution image, a
1000-row `label_emb` for the noise level), `first_stage_model.*` (a 3-level KL VAE, factor 4),
`cond_stage_model.model.*` (OpenCLIP ViT-H, used at its penultimate layer as SD 2), the main schedule's buffers
(`betas`, ...) and `low_scale_model.*`: the buffers of `ImageConcatWithNoiseAugmentation`, whose `betas` are the
schedule that noises the low-resolution input (what diffusers' folder calls `low_res_scheduler`).

What only the YAML says, taken from it (as ComfyUI and diffusers' single-file loader do for this model): the
latent scale 0.08333, v-prediction (`parameterization: "v"`; `--prediction-type` or ModelSpec metadata may say
otherwise), 8 heads per attention layer (`num_heads: 8`), `max_noise_level: 350`, and
`disable_self_attentions: [True, True, True, False]` (attn1 attends to the text at the first three levels). That
last one changes the math, so it is checked against the shapes wherever they can tell (attn1's key width is the
context's where self-attention is off, the level's channels where it is on): a file that disagrees is refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from models.autoencoder import AutoencoderConfig
from models.checkpoints import infer_schedule
from models.conditioners import ConditionerConfig
from models.config import ModelConfig
from models.diffusion import PredictionType, ScheduleConfig
from models.tensor_files import CheckpointError, StateDict
from models.text.clip import CLIPTextConfig
from models.unet import UNetConfig

#: the low-resolution noise schedule's buffers (AbstractLowScaleModel.register_schedule)
LOW_SCALE_KEY = re.compile(
    r"^low_scale_model\.(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod)$")
LOW_SCALE_BETAS = "low_scale_model.betas"
#: x4-upscaling.yaml's values that no tensor stores
X4_SCALE_FACTOR = 0.08333
X4_HEADS = 8
X4_DISABLE_SELF_ATTENTIONS = (True, True, True, False)
X4_MAX_NOISE_LEVEL = 350
X4_DEFAULT_SIZE = 512  # image_size 128 (latent) x the VAE's factor 4


def x4_upscaler_config(name: str, sd: Mapping[str, object], unet_sd: StateDict, unet: UNetConfig,
                       autoencoder: AutoencoderConfig, clip: CLIPTextConfig, schedule: ScheduleConfig,
                       prediction_type: PredictionType | None) -> ModelConfig:
    """The config of an original x4 upscaler file (see the module docstring). `sd`: the file's keys (shapes; the
    low-resolution `betas` read), `unet_sd`: the UNet's (prefix stripped), `unet`: as inferred from its shapes."""
    betas = sd.get(LOW_SCALE_BETAS)
    if betas is None:
        raise CheckpointError(f"an SD x4 upscaler file (a latent + 3 channel UNet with OpenCLIP text) without "
                              f"{LOW_SCALE_BETAS}, the schedule that noises its low-resolution input")
    if unet.num_classes is None:
        raise CheckpointError("an SD x4 upscaler file whose UNet has no class embedding for the noise level "
                              "(model.diffusion_model.label_emb.weight)")
    lowres_noise = infer_schedule({"betas": betas})  # type: ignore[dict-item]  # read by the caller
    if lowres_noise.beta_schedule == "cosine":
        raise CheckpointError(f"{LOW_SCALE_BETAS} is neither a linear nor a scaled-linear schedule")
    unet = dataclasses.replace(unet, num_heads=X4_HEADS, num_head_channels=-1,
                               disable_self_attentions=_checked_self_attentions(unet_sd, unet))
    return ModelConfig(
        name=name, family="sd_v2_upscaler", unet=unet, autoencoder=autoencoder,
        schedule=dataclasses.replace(schedule, prediction_type=prediction_type or "v_prediction"),
        conditioner=ConditionerConfig(kind="clip", clip=clip), conditioning="hybrid", concat_input="lowres",
        scale_factor=X4_SCALE_FACTOR, default_size=X4_DEFAULT_SIZE, lowres_noise=lowres_noise,
        max_noise_level=X4_MAX_NOISE_LEVEL)


def _checked_self_attentions(unet_sd: StateDict, unet: UNetConfig) -> tuple[bool, ...]:
    """x4-upscaling.yaml's `disable_self_attentions`, after checking it against every level whose attn1 key width
    tells (its channels differ from the context's width)."""
    if len(unet.channel_mult) != len(X4_DISABLE_SELF_ATTENTIONS):
        raise CheckpointError(f"an SD x4 upscaler UNet of {len(unet.channel_mult)} levels: x4-upscaling.yaml has "
                              f"{len(X4_DISABLE_SELF_ATTENTIONS)}, and its per-level self-attention settings")
    per_level = unet.num_res_blocks + 1
    for level, disabled in enumerate(X4_DISABLE_SELF_ATTENTIONS):
        to_k = unet_sd.get(f"input_blocks.{1 + level * per_level}.1.transformer_blocks.0.attn1.to_k.weight")
        channels = unet.model_channels * unet.channel_mult[level]
        if to_k is None or channels == unet.context_dim:
            continue  # no attention at this level, or both settings give attn1 the same shapes
        if (to_k.shape[1] == unet.context_dim) != disabled:
            raise CheckpointError(
                f"level {level}'s attn1 takes {to_k.shape[1]}-wide keys: self-attention "
                f"{'on' if disabled else 'off'}, where x4-upscaling.yaml has disable_self_attentions {disabled}")
    return X4_DISABLE_SELF_ATTENTIONS
