"""Live previews on the shipped tiny-shapes model and a toy SD model: the fitted latent -> RGB map predicts the
colours the decoder makes far better than their mean does, is the same every time, and a preview is a small PNG
of the right aspect."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoints import load_model
from models.ldm import LatentDiffusion
from models.preview import MAX_PREVIEW, Previewer, fit_latent_rgb, preview_png, preview_size
from models.train.data_shapes import render, scene_at, to_model_tensor
from tests.helpers import random_model, toy_sr_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> LatentDiffusion:
    return load_model("tiny-shapes")


def test_the_map_predicts_decoded_colours_of_unseen_renders(tiny: LatentDiffusion) -> None:
    """On tiny-shapes' own kind of image (never used in the fit), the map's error against the decoder's colours
    (per latent pixel) is well under that of predicting the mean colour: previews show the shapes and colours."""
    rgb = fit_latent_rgb(tiny)
    images = torch.stack([to_model_tensor(render(scene_at(123, i))) for i in range(16)])
    with torch.inference_mode():
        latents = tiny.encode_images(images)
        decoded = torch.nn.functional.avg_pool2d(tiny.decode_latents(latents).clamp(-1, 1), 4)
        error = (rgb(latents) - decoded).abs().mean().item()
    baseline = (decoded - decoded.mean(dim=(0, 2, 3), keepdim=True)).abs().mean().item()
    assert error < 0.6 * baseline, (error, baseline)
    assert rgb.r2 > 0.5 and rgb.weight.shape == (3, 3)
    again = fit_latent_rgb(tiny)
    assert torch.equal(again.weight, rgb.weight) and torch.equal(again.bias, rgb.bias)


def test_any_loaded_model_gets_a_map() -> None:
    """A model of other latent channels and factor (LDM-SR's VQ f=4, 3 channels; random weights)."""
    model = random_model(toy_sr_config(), seed=2)
    rgb = fit_latent_rgb(model, n=4)
    assert rgb.weight.shape == (model.config.latent_channels, 3) and bool(rgb.weight.isfinite().all())


@pytest.mark.parametrize(("height", "width", "expected"), [(64, 64, (64, 64)), (512, 768, (171, 256)),
                                                           (1024, 256, (256, 64))])
def test_previews_are_small_pngs_of_the_image_aspect(tiny: LatentDiffusion, height: int, width: int,
                                                      expected: tuple[int, int]) -> None:
    size = preview_size(height, width)
    assert size == expected and max(size) <= MAX_PREVIEW
    latent = torch.randn(1, 3, height // 4, width // 4, generator=torch.Generator().manual_seed(0))
    data = preview_png(latent, fit_latent_rgb(tiny), size)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (size[1], size[0]) and image.mode == "RGB"
        assert np.asarray(image).std() > 0


def test_a_previewer_fits_once_and_makes_pngs(tiny: LatentDiffusion) -> None:
    previewer = Previewer(tiny)
    latent = torch.zeros(1, 3, 16, 16)
    first = previewer.png(latent, 64, 64)
    rgb = previewer.rgb
    assert previewer.png(latent, 64, 64) == first and previewer.rgb is rgb
    with Image.open(io.BytesIO(first)) as image:
        assert image.size == (64, 64)
