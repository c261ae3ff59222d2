"""The Latent Diffusion Model as one object: autoencoder, UNet, conditioner and noise schedule.

Parts keep their own clean names; `PREFIXES` maps them to the original CompVis single-file
layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), which is also the
layout this project saves in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from models.autoencoder import Autoencoder
from models.conditioners import build_conditioner
from models.config import ModelConfig
from models.diffusion import NoiseSchedule
from models.unet import UNet

PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "autoencoder": "first_stage_model.",
    "conditioner": "cond_stage_model.",
}


class LatentDiffusion(nn.Module):
    """Holds the trained parts; pipelines (models/pipeline.py) decide how to run them."""

    def __init__(self, config: ModelConfig, tokenizer_dir: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.autoencoder = Autoencoder(config.autoencoder)
        self.conditioner = (
            build_conditioner(config.conditioner, tokenizer_dir) if config.conditioner is not None else None
        )
        with torch.device("cpu"):  # plain tensors, not parameters: never on the meta device of a lazy build
            self.schedule = NoiseSchedule.from_config(config.schedule)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_images(
        self, images: torch.Tensor, generators: Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """[N,3,H,W] in [-1,1] -> scaled latents [N,C,H/f,W/f].

        KL: the posterior mean unless `generators` are given (then a per-item sample, as in training).
        VQ: the pre-quantisation latent (the decoder quantises), not rescaled beyond `scale_factor`.
        """
        encoded = self.autoencoder.encode(images)
        if isinstance(encoded, torch.Tensor):
            latents = encoded
        else:
            latents = encoded.sample(generators) if generators is not None else encoded.mode()
        return latents * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [N,3,H,W] in [-1,1] (not clamped)."""
        return self.autoencoder.decode(latents / self.config.scale_factor)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under the original single-file key names (but a packaged text encoder's)."""
        out: dict[str, torch.Tensor] = {}
        for part, prefix in PREFIXES.items():
            module = getattr(self, part)
            if module is None or getattr(module, "weights_from_package", False):
                continue  # absent, or frozen weights an installed package ships (MiniLM)
            for key, tensor in module.state_dict().items():
                out[prefix + key] = tensor
        return out
