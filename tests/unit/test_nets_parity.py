"""Parity with diffusers: our UNet / autoencoder with random weights, their state dict in the original
CompVis layout converted by diffusers' own single-file converters, loaded strictly into
UNet2DConditionModel / AutoencoderKL; outputs must agree to 1e-4 in fp32 (ldm-facts §4.2)."""

from typing import Any

import pytest
import torch

from models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from models.unet import UNet, UNetConfig
from tests.helpers import diffusers_unet, diffusers_vae, randomize

TOL = 1e-4


def _diffusers_unet(ours: UNet) -> Any:
    return diffusers_unet({"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}, ours.config)


def _diffusers_vae(ours: Autoencoder) -> Any:
    return diffusers_vae({"first_stage_model." + k: v for k, v in ours.state_dict().items()}, ours.config)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_unet(config: UNetConfig, size: int = 32, seed: int = 0) -> None:
    ours = randomize(UNet(config), seed)
    theirs = _diffusers_unet(ours)
    x, t = _randn(2, config.in_channels, size, size, seed=seed + 1), torch.tensor([10.0, 999.0])
    context = None if config.context_dim is None else _randn(2, 7, config.context_dim, seed=seed + 2)
    y = None if config.num_classes is None else torch.tensor([1, config.num_classes - 1])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, class_labels=y).sample
        actual = ours(x, t, context, y)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero outputs
    assert (actual - expected).abs().max() < TOL


TOY = UNetConfig(model_channels=32, context_dim=32)  # SD v1 structure at 1/10 width, 8 heads


@pytest.mark.parametrize(
    "config",
    [
        TOY,
        UNetConfig(in_channels=9, model_channels=32, context_dim=32),  # SD v1 inpainting input
        UNetConfig(model_channels=32, context_dim=32, num_classes=10),  # label_emb -> class_embedding
        UNetConfig(model_channels=32, num_heads=-1, num_head_channels=8, context_dim=24,
                   use_linear_in_transformer=True),  # SD2-style linear proj_in / proj_out
    ],
    ids=["sd-v1", "inpainting-9ch", "class-conditional", "linear-proj"],
)
def test_unet_matches_diffusers(config: UNetConfig) -> None:
    _check_unet(config)


def _check_vae(config: AutoencoderConfig, image_size: int, seed: int = 0) -> None:
    ours = randomize(Autoencoder(config), seed)
    theirs = _diffusers_vae(ours)
    x = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    z = _randn(1, config.embed_dim, image_size // 8, image_size // 8, seed=seed + 2)
    with torch.no_grad():
        posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
        assert isinstance(posterior, DiagonalGaussian)
        assert (posterior.mean - reference.mean).abs().max() < TOL
        assert (posterior.std - reference.std).abs().max() < TOL
        decoded, expected = ours.decode(z), theirs.decode(z).sample
    assert expected.abs().max() > 0.1
    assert (decoded - expected).abs().max() < TOL


def test_vae_matches_diffusers() -> None:
    _check_vae(AutoencoderConfig(ch=32), image_size=32)


@pytest.mark.slow
def test_full_size_sd_v1_matches_diffusers() -> None:
    """SD v1 UNet (859.5M) on a 32x32 latent and the kl-f8 VAE at 256 px, random weights."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    ours = randomize(unet, seed=0)
    theirs = _diffusers_unet(ours)
    x, t, context = _randn(1, 4, 32, 32, seed=1), torch.tensor([500.0]), _randn(1, 77, 768, seed=2)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context).sample
        actual = ours(x, t, context)
    assert (actual - expected).abs().max() < TOL
    del ours, theirs, unet
    _check_vae(AutoencoderConfig(), image_size=256)
