"""The zoo's first stages alone (models/first_stage_models/{kl-f4..f32, vq-f4..f16}/model.ckpt + config.yaml):
load one, reconstruct images with it, score the reconstruction (the paper's Table 8 reports PSNR of these).

A first-stage checkpoint holds the autoencoder's keys without a prefix (`encoder.*`, `decoder.*`,
`quant_conv.*`, `post_quant_conv.*`, VQ: `quantize.embedding.weight`) and the training loss's networks under
`loss.*` (LPIPS and the patch discriminator: the config's `lossconfig`, training-only, dropped). Everything else
must match, as in models/checkpoints.py.

Reconstruction is the original's forward pass without its randomness: KL decodes the posterior's mean (the
original's `forward` samples it by default; the mean is what a deterministic score needs), VQ quantises the
encoding to the nearest codebook entries and decodes them (`VQModel.forward`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from models.checkpoints import _shown, read_state_dict
from models.compvis.config_yaml import KL_TARGET, VQ_TARGETS, CompVisConfigError, first_stage_config, read_yaml
from models.images import to_pil, to_tensor
from models.tensor_files import CheckpointError

#: a whole-model checkpoint's first stage sits under this prefix; a first-stage file has none
PREFIX = "first_stage_model."


def first_stage_from_yaml(config_path: Path) -> AutoencoderConfig:
    """A first stage's config.yaml (`model.target` = AutoencoderKL / VQModel), or a whole LDM's (its
    `first_stage_config`)."""
    data = read_yaml(config_path)
    model = data.get("model")
    try:
        if isinstance(model, dict) and model.get("target") in (*VQ_TARGETS, KL_TARGET):
            return first_stage_config(model)
        params = model.get("params") if isinstance(model, dict) else None
        if isinstance(params, dict) and "first_stage_config" in params:
            return first_stage_config(params["first_stage_config"])
    except CompVisConfigError as err:
        raise CompVisConfigError(f"{config_path}: {err}") from None
    raise CompVisConfigError(f"{config_path}: neither a first stage (model.target AutoencoderKL / VQModel) nor a "
                             "latent diffusion model with a first_stage_config")


def load_first_stage(path: Path, config_path: Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> Autoencoder:
    """The autoencoder of `path` as `config_path` describes it (strict but for `loss.*` and a whole model's
    other parts)."""
    config = first_stage_from_yaml(config_path)
    sd, _ = read_state_dict(path)
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    with torch.device("meta"):
        model = Autoencoder(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    misshaped = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{path}: does not fit {config_path}: missing {_shown(missing)}; unexpected "
                              f"{_shown(unexpected)}; misshaped {_shown(misshaped)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.inference_mode()
def reconstruct(autoencoder: Autoencoder, image: Image.Image) -> Image.Image:
    """Encode and decode one RGB image (its sides multiples of the first stage's factor)."""
    f = autoencoder.config.downsample_factor
    if image.width % f or image.height % f:
        raise ValueError(f"image size {image.width}x{image.height} is not a multiple of {f}, the first stage's factor")
    param = next(autoencoder.parameters())
    x = to_tensor([image]).to(param.device, param.dtype)
    encoded = autoencoder.encode(x)
    z = encoded.mode() if isinstance(encoded, DiagonalGaussian) else encoded
    return to_pil(autoencoder.decode(z))[0]


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two RGB images of one size, on [0, 1] pixel values (inf when identical)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64) / 255.0
    y = np.asarray(b.convert("RGB"), dtype=np.float64) / 255.0
    if x.shape != y.shape:
        raise ValueError(f"images of different sizes: {a.size} and {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
