"""Random-weight CompVis zoo checkpoints and their independent twins, for tests.

Each config below is the zoo's own `config.yaml` (latent-diffusion @ a506df5, models/ldm/<name>/config.yaml,
configs/latent-diffusion/cin256-v2.yaml and txt2img-1p4B-eval.yaml) with its structure kept (targets, levels,
channel multipliers, attention placement, head rules, schedule, conditioning, first-stage kind) and its widths reduced
(model_channels 32, first stage ch 32, BERT 2 x 32, codebooks of 64). Training-only entries are kept where the
real file has them, so that the loader is seen to skip them. A checkpoint is written in the original layout,
`{"state_dict": ..., "global_step": ...}`, with the extra buffers real files carry.

The twins are diffusers' modules (UNet2DModel, UNet2DConditionModel, VQModel, AutoencoderKL) loaded strictly
from the same original-layout tensors; the key mapping for UNet2DModel's legacy attention (the fused `qkv`,
split per head first, then into q, k, v) is written here from openaimodel.py's QKVAttentionLegacy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.autoencoder import AutoencoderConfig
from models.compvis.config_yaml import model_config
from models.diffusers_layout import _resnet, autoencoder_key_map, unet_key_map
from models.ldm import LatentDiffusion
from models.unet import UNetConfig
from tests.helpers import randomize

_VQ_F4 = """
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 64
        monitor: val/rec_loss
        ddconfig:
          {attn}double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: {loss}
"""


def _vq(attn_none: bool = False, loss: str = "torch.nn.Identity") -> str:
    return _VQ_F4.format(attn="attn_type: none\n          " if attn_none else "", loss=loss)


CONFIGS: dict[str, str] = {
    "cin256-v2": """
model:
  base_learning_rate: 0.0001
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: class_label
    image_size: 8
    channels: 3
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 5]
        num_heads: 1
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 32
""" + _vq() + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.ClassEmbedder
      params:
        n_classes: 1001
        embed_dim: 32
        key: class_label
""",
    "celeba256": """
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: class_label
    image_size: 8
    channels: 3
    cond_stage_trainable: false
    concat_mode: false
    monitor: val/loss
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_head_channels: 32
""" + _vq() + """
    cond_stage_config: __is_unconditional__
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 48
""",
    "lsun_churches256": """
model:
  base_learning_rate: 5.0e-05
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: image
    image_size: 16
    channels: 4
    cond_stage_trainable: false
    concat_mode: false
    scale_by_std: true
    monitor: val/loss_simple_ema
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [10000]
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 16
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1, 2, 4, 8]
        num_res_blocks: 2
        channel_mult: [1, 2, 2, 4, 4]
        num_heads: 8
        use_scale_shift_norm: true
        resblock_updown: true
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config: '__is_unconditional__'
""",
    "text2img256": """
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: caption
    image_size: 8
    channels: 3
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 5]
        num_head_channels: 32
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 32
""" + _vq() + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 32
        n_layer: 2
""",
    "txt2img-1p4B-eval": """
model:
  base_learning_rate: 5.0e-05
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: caption
    image_size: 8
    channels: 4
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
        num_heads: 8
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: true
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 32
        n_layer: 2
""",
    "semantic_synthesis256": """
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    log_every_t: 100
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: segmentation
    image_size: 8
    channels: 3
    concat_mode: true
    cond_stage_trainable: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 6
        out_channels: 3
        model_channels: 32
        attention_resolutions: [32, 16, 8]
        num_res_blocks: 2
        channel_mult: [1, 4, 8]
        num_heads: 8
""" + _vq() + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.SpatialRescaler
      params:
        n_stages: 2
        in_channels: 182
        out_channels: 3
""",
    "inpainting_big": """
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    log_every_t: 100
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: masked_image
    image_size: 8
    channels: 3
    concat_mode: true
    monitor: val/loss
    scheduler_config:
      target: ldm.lr_scheduler.LambdaWarmUpCosineScheduler
      params:
        verbosity_interval: 0
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 7
        out_channels: 3
        model_channels: 32
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_heads: 8
        resblock_updown: true
""" + _vq(attn_none=True, loss="ldm.modules.losses.contperceptual.DummyLoss") + """
    cond_stage_config: __is_first_stage__
""",
    "bsr_sr": """
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    log_every_t: 100
    timesteps: 1000
    loss_type: l2
    first_stage_key: image
    cond_stage_key: LR_image
    image_size: 8
    channels: 3
    concat_mode: true
    cond_stage_trainable: false
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 6
        out_channels: 3
        model_channels: 32
        attention_resolutions: [16, 8]
        num_res_blocks: 2
        channel_mult: [1, 2, 2, 4]
        num_head_channels: 32
""" + _vq() + """
    cond_stage_config:
      target: torch.nn.Identity
""",
    # models/ldm/layout2img-openimages256/config.yaml: BERTEmbedder without its tokenizer, fed taming's box
    # tokens (vocab_size 8192 and max_seq_len 92 kept: they are the token space and 30 objects + the crop)
    "layout2img-openimages256": """
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    log_every_t: 100
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: coordinates_bbox
    image_size: 8
    channels: 3
    conditioning_key: crossattn
    cond_stage_trainable: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_head_channels: 32
        use_spatial_transformer: true
        transformer_depth: 3
        context_dim: 32
""" + _vq() + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 32
        n_layer: 2
        vocab_size: 8192
        max_seq_len: 92
        use_tokenizer: false
    monitor: val/loss_simple_ema
""",
    # models/ldm/cin256/config.yaml (= configs/latent-diffusion/cin-ldm-vq-f8.yaml): ClassEmbedder with the default
    # 1000 rows (no null class), VQ-f8 with decoder attention at the lowest level
    "cin256": """
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: class_label
    image_size: 4
    channels: 4
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 4
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 32
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 32
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 4
        n_embed: 64
        ddconfig:
          double_z: false
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 2, 4]
          num_res_blocks: 2
          attn_resolutions: [32]
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.ClassEmbedder
      params:
        embed_dim: 32
        key: class_label
""",
}

#: models/first_stage_models/{kl-f8, vq-f4-noattn}/config.yaml at reduced width
FIRST_STAGE_KL_F8 = """
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    monitor: val/rec_loss
    embed_dim: 4
    lossconfig:
      target: ldm.modules.losses.LPIPSWithDiscriminator
      params:
        disc_start: 50001
    ddconfig:
      double_z: true
      z_channels: 4
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2, 4, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
"""
FIRST_STAGE_KL_F16 = """
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    monitor: val/rec_loss
    embed_dim: 16
    lossconfig:
      target: ldm.modules.losses.LPIPSWithDiscriminator
      params:
        disc_start: 50001
    ddconfig:
      double_z: true
      z_channels: 16
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
"""
FIRST_STAGE_VQ_F8 = """
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 4
    n_embed: 64
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 4
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [32]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 0
"""
FIRST_STAGE_VQ_F4_NOATTN = """
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 3
    n_embed: 64
    monitor: val/rec_loss
    ddconfig:
      attn_type: none
      double_z: false
      z_channels: 3
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 0
"""

#: the extra buffers of a real file (DDPM's register_schedule, LitEma's counters, ddim sampler leftovers)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
CHURCHES_SCALE = 0.7


def original_alphas_cumprod(start: float, end: float, timesteps: int = 1000) -> torch.Tensor:
    """ddpm.py register_schedule with make_beta_schedule("linear"): float64 betas, cumprod, stored as float32."""
    betas = np.linspace(start**0.5, end**0.5, timesteps, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


def write_checkpoint(folder: Path, name: str, *, seed: int = 0, ema: bool = False, ddim_buffers: bool = False,
                     first_stage_copy: bool = False, yaml_text: str | None = None) -> dict[str, torch.Tensor]:
    """folder/model.ckpt + folder/config.yaml for zoo model `name` with random weights; returns the state dict."""
    text = CONFIGS[name] if yaml_text is None else yaml_text
    scale = CHURCHES_SCALE if "scale_by_std: true" in text else None
    config = model_config(yaml.safe_load(text), name, scale)
    model = randomize(LatentDiffusion(config), seed)
    sd = {k: v.clone() for k, v in model.original_state_dict().items()}
    for key in SCHEDULE_BUFFERS:
        sd[key] = torch.rand(1000)
    if scale is not None:
        sd["scale_factor"] = torch.tensor(scale)
    if ema:
        g = torch.Generator().manual_seed(seed + 1)
        for key, tensor in list(sd.items()):
            if key.startswith("model.diffusion_model."):
                ema_key = "model_ema." + key[len("model."):].replace(".", "")
                sd[ema_key] = tensor + 0.05 * torch.randn(tensor.shape, generator=g)
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(100, dtype=torch.int)
    if ddim_buffers:
        for key in ("ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"):
            sd[key] = torch.rand(50)
    if first_stage_copy:
        for key, tensor in list(sd.items()):
            if key.startswith("first_stage_model."):
                sd["cond_stage_model." + key[len("first_stage_model."):]] = tensor.clone()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(text, encoding="utf-8")
    torch.save({"state_dict": sd, "global_step": 1234}, folder / "model.ckpt")
    return sd


class ZooFiles:
    """Checkpoints written once per test module and shared by the tests that only read them (`write_checkpoint`
    is deterministic in its arguments, so a shared file is the file each test would write). The state dicts are
    shared too: a test that changes one writes its own checkpoint instead."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, tuple[tuple[str, bool], ...]], tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(self, name: str, **options: bool) -> tuple[Path, dict[str, torch.Tensor]]:
        """(folder with model.ckpt and config.yaml, its state dict) for zoo model `name`."""
        key = (name, tuple(sorted(options.items())))
        if key not in self.made:
            folder = self.root / str(len(self.made)) / name  # the folder names the model, as the zoo's do
            self.made[key] = (folder, write_checkpoint(folder, name, **options))  # type: ignore[arg-type]
        return self.made[key]

    def ckpt(self, name: str, **options: bool) -> Path:
        return self.get(name, **options)[0] / "model.ckpt"


def part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------ diffusers twins


def legacy_heads(config: UNetConfig, ch: int) -> int:
    """openaimodel.py's head count of a legacy AttentionBlock at `ch` channels."""
    return config.num_heads if config.num_head_channels == -1 else ch // config.num_head_channels


def _level_channels(config: UNetConfig) -> list[int]:
    return [config.model_channels * m for m in config.channel_mult]


def unet2d(unet_sd: dict[str, torch.Tensor], config: UNetConfig) -> Any:
    """diffusers UNet2DModel (LDMPipeline's UNet) holding an original legacy-attention UNet's weights."""
    import diffusers

    chans, levels = _level_channels(config), len(config.channel_mult)
    attn = [2**i in config.attention_resolutions for i in range(levels)]
    # without attention, only the Resnet*sample blocks resample with ResBlocks (resblock_updown)
    plain_down = "ResnetDownsampleBlock2D" if config.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if config.resblock_updown else "UpBlock2D"
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel(
            in_channels=config.in_channels, out_channels=config.out_channels,
            down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn)),
            block_out_channels=tuple(chans), layers_per_block=config.num_res_blocks, attention_head_dim=4,
            norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
            resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
            downsample_type="resnet" if config.resblock_updown else "conv",
            upsample_type="resnet" if config.resblock_updown else "conv",
        )
    per_level = config.num_res_blocks + 1
    base = unet_key_map(list(unet_sd), config)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in unet_sd.items():
        new = base[key]
        if m := re.match(r"input_blocks\.(\d+)\.0\.(in_layers|emb_layers|out_layers|skip_connection)\.(.*)", key):
            i = int(m[1])
            if i > 0 and (i - 1) % per_level == config.num_res_blocks:  # a ResBlock that downsamples
                new = f"down_blocks.{(i - 1) // per_level}.downsamplers.0.{_resnet(m[2] + '.' + m[3])}"
        if m := re.match(r"output_blocks\.(\d+)\.([12])\.(in_layers|emb_layers|out_layers|skip_connection)\.(.*)", key):
            new = f"up_blocks.{int(m[1]) // per_level}.upsamplers.0.{_resnet(m[3] + '.' + m[4])}"
        if m := re.match(r"(.*)\.(norm|qkv|proj_out)\.(weight|bias)$", new):
            if "attentions" not in m[1]:
                converted[new] = tensor
                continue
            level = _attention_level(key, config)
            ch = chans[level]
            if m[2] == "norm":
                converted[f"{m[1]}.group_norm.{m[3]}"] = tensor
            elif m[2] == "proj_out":
                converted[f"{m[1]}.to_out.0.{m[3]}"] = tensor.squeeze(-1)
            else:  # legacy order: [heads, (q, k, v), d] along the output channels
                heads = legacy_heads(config, ch)
                qkv = tensor.squeeze(-1).reshape(heads, 3, ch // heads, *tensor.shape[1:-1] if tensor.ndim > 1 else ())
                for j, name in enumerate("qkv"):
                    converted[f"{m[1]}.to_{name}.{m[3]}"] = qkv[:, j].reshape(ch, *qkv.shape[3:])
            continue
        converted[new] = tensor
    theirs.load_state_dict(converted, strict=True, assign=True)
    _set_heads(theirs, config)
    return theirs.eval()


def _attention_level(key: str, config: UNetConfig) -> int:
    per_level, levels = config.num_res_blocks + 1, len(config.channel_mult)
    if key.startswith("middle_block."):
        return levels - 1
    index = int(key.split(".")[1])
    if key.startswith("input_blocks."):
        return (index - 1) // per_level
    return levels - 1 - index // per_level


def _set_heads(theirs: Any, config: UNetConfig) -> None:
    """UNet2DModel takes one head width for every level; the original's rule fixes a count per level."""
    chans = _level_channels(config)
    for i, block in enumerate(theirs.down_blocks):
        for a in getattr(block, "attentions", []):
            a.heads = legacy_heads(config, chans[i])
    for i, block in enumerate(theirs.up_blocks):
        for a in getattr(block, "attentions", []):
            a.heads = legacy_heads(config, chans[len(chans) - 1 - i])
    for a in theirs.mid_block.attentions:
        a.heads = legacy_heads(config, chans[-1])


def cond_unet(unet_sd: dict[str, torch.Tensor], config: UNetConfig) -> Any:
    """diffusers UNet2DConditionModel (a SpatialTransformer UNet) with one head count per level, by diffusers'
    own single-file converter."""
    import diffusers
    from diffusers.loaders import single_file_utils

    chans, levels = _level_channels(config), len(config.channel_mult)
    params: dict[str, Any] = {
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "model_channels": config.model_channels, "channel_mult": list(config.channel_mult),
        "num_res_blocks": config.num_res_blocks, "attention_resolutions": list(config.attention_resolutions),
        "transformer_depth": config.transformer_depth, "context_dim": config.context_dim, "num_heads": 1,
    }
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4]}}}}}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    cfg = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint)
    cfg["attention_head_dim"] = [config.heads(c)[0] for c in chans]  # diffusers' misnomer: heads per level
    assert len(cfg["attention_head_dim"]) == levels
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, cfg)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**cfg)
    theirs.load_state_dict(converted, strict=True, assign=True)
    return theirs.eval()


def first_stage(ae_sd: dict[str, torch.Tensor], config: AutoencoderConfig, scale: float) -> Any:
    """diffusers VQModel or AutoencoderKL with the original first stage's weights."""
    import diffusers

    levels = len(config.ch_mult)
    attn = [config.resolution // 2**i in config.attn_resolutions for i in range(levels)]
    common: dict[str, Any] = {
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        "block_out_channels": tuple(config.ch * m for m in config.ch_mult),
        "layers_per_block": config.num_res_blocks, "latent_channels": config.z_channels, "norm_num_groups": 32,
        "scaling_factor": scale, "mid_block_add_attention": config.mid_attention,
    }
    with torch.device("meta"):
        if config.kind == "vq":
            theirs = diffusers.VQModel(**common, num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim)
        else:
            theirs = diffusers.AutoencoderKL(**common)
    names = autoencoder_key_map(list(ae_sd), config)
    converted = {}
    renames = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    for key, tensor in ae_sd.items():
        new = names[key]
        if m := re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)$", key):
            level = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
            new = f"{m[1].replace('down', 'down_blocks').replace('up', 'up_blocks')}.{level}.attentions.{m[3]}." \
                  f"{renames[m[4]]}.{m[5]}"
        squeeze = (".mid.attn_1." in key or ".attn." in key) and tensor.ndim == 4
        converted[new] = tensor[:, :, 0, 0] if squeeze else tensor
    theirs.load_state_dict(converted, strict=True, assign=True)
    return theirs.eval()


def ddim_scheduler(start: float, end: float) -> Any:
    """diffusers' DDIM with the CompVis conventions (ldm-facts §5.3)."""
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1)


def original_ddim(eps: Any, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """ddim.py, eta 0, step by step: make_ddim_timesteps("uniform") = range(0, 1000, 1000 // S) + 1;
    ddim_alphas = alphas_cumprod[those]; ddim_alphas_prev = [alphas_cumprod[0], ddim_alphas[:-1]];
    per step (highest first): pred_x0 = (x - sqrt(1 - a) e) / sqrt(a); x = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev) e."""
    ts = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    a = alphas_cumprod[ts].double()
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]]).double()
    for i, step in enumerate(np.flip(ts)):
        index = len(ts) - i - 1
        e = eps(x, torch.full((x.shape[0],), int(step), dtype=torch.long))
        pred_x0 = (x - (1 - a[index]).sqrt().float() * e) / a[index].sqrt().float()
        x = a_prev[index].sqrt().float() * pred_x0 + (1 - a_prev[index]).sqrt().float() * e
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> the contract's PNG values round(255 clamp((x + 1) / 2))."""
    return (((x.float() + 1) / 2).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy().astype(np.uint8)


def assert_close_images(ours: np.ndarray, theirs: np.ndarray) -> None:
    """The contract's tolerance: mean |diff| <= 1/255 and max <= 24/255 (in 0..255 units: 1 and 24); and the
    reference is a real image, not a saturated or flat one that anything would match."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    inside = ((theirs > 0) & (theirs < 255)).mean()
    assert theirs.std() > 5 and inside > 0.2, f"degenerate reference image: std {theirs.std():.1f}, {inside:.0%} inside"
    assert diff.mean() <= 1.0 and diff.max() <= 24.0, f"mean {diff.mean():.3f}, max {diff.max():.0f} (of 255)"
