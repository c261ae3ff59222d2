"""SDXL inpainting (a 9-channel UNet: latent, mask, masked-image latent; SDXL's two text encoders and
micro-conditioning) loaded by us and run by diffusers' StableDiffusionXLInpaintPipeline: from the folder diffusers
writes and from an original-layout single file made with the inverse of our mapping (tests/sdxl_twins.py: random
weights, reduced width, the real structure). UNet output, a 3-step DDIM inpainting with classifier-free guidance
(latents to 1e-4; the decoded repainted pixels to one level of 255), and `ldm generate --task inpaint`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoints import CheckpointError, load_model
from models.pipeline import Pipeline, RunSettings, SampleSpec, UnsupportedTask
from models.text.sdxl import SDXLTextConditioner, added_vector
from tests.helpers import TOL, assert_close_at_unit_scale, torch_threads
from tests.sdxl_twins import TIME_DIM, SDXLTwins

PROMPTS, SEEDS = ["a red circle on the left", "a blue square"], [3, 11]


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> SDXLTwins:
    with torch_threads(1):
        return SDXLTwins(tmp_path_factory.mktemp("sdxl-inpainting"), inpainting=True)


def images_and_masks() -> tuple[list[Image.Image], list[Image.Image]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in PROMPTS]
    masks = []
    for top, left in ((8, 16), (24, 0)):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[top : top + 32, left : left + 40] = 255
        masks.append(Image.fromarray(mask))
    return images, masks


@pytest.mark.parametrize("source", ["folder", "file"])
def test_config_and_unet_match_diffusers(twins: SDXLTwins, source: str) -> None:
    ours = twins.model(source)
    config = ours.config
    assert (config.family, config.conditioning, config.concat_input) == ("sdxl_inpainting", "hybrid", "inpaint")
    assert config.unet.in_channels == 9 and config.tasks == frozenset({"inpaint"})
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 9, 8, 8, generator=g), torch.tensor([981.0, 1.0])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 32.0, 512.0, 512.0]])
    with torch_threads(1), torch.inference_mode():
        assert isinstance(ours.conditioner, SDXLTextConditioner)
        encoded = ours.conditioner.encode(PROMPTS)
        assert encoded.pooled is not None
        theirs = twins.pipe.unet(x, t, encoder_hidden_states=encoded.context,
                                 added_cond_kwargs={"text_embeds": encoded.pooled, "time_ids": time_ids}).sample
        assert theirs.abs().max() > 0.1
        got = ours.unet(x, t, encoded.context, added_vector(encoded.pooled, time_ids, TIME_DIM))
        assert (got - theirs).abs().max() < TOL
        # the mask and masked-image channels are used
        assert (ours.unet(x * torch.tensor([1.0] * 4 + [0.0] * 5)[:, None, None], t, encoded.context,
                          added_vector(encoded.pooled, time_ids, TIME_DIM)) - got).abs().max() > 100 * TOL


@pytest.mark.parametrize("source", ["folder", "file"])
def test_inpainting_matches_diffusers(twins: SDXLTwins, source: str) -> None:
    """3-step DDIM with CFG at strength 1 (from pure noise; each item's generator draws its noise, then its masked
    image's latent from the VAE's posterior): the latents, and the repainted pixels of the decoded image."""
    images, masks = images_and_masks()
    with torch_threads(1), torch.inference_mode():
        expected = twins.pipe(PROMPTS, image=images, mask_image=masks, strength=1.0, num_inference_steps=3,
                              guidance_scale=7.5, height=64, width=64, output_type="latent",
                              generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
        vae = twins.pipe.vae
        decoded = twins.pipe.image_processor.postprocess(vae.decode(expected / vae.config.scaling_factor).sample,
                                                         output_type="pil")
    pipeline = Pipeline(twins.model(source), optimize=False)
    specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(PROMPTS, SEEDS, strict=True)]
    settings = RunSettings(sampler="ddim", steps=3, width=64, height=64)
    with torch_threads(1):
        started = pipeline.start_inpaint(specs, settings, images, masks)
        latents = pipeline.run_samples(started.samples)
        out = [started.finish(k, latents[k : k + 1]) for k in range(len(specs))]
    assert_close_at_unit_scale(latents, expected)
    for k in range(len(specs)):
        inside = np.asarray(masks[k]) > 127
        ours_px, theirs_px = (np.asarray(im).astype(np.int16) for im in (out[k], decoded[k]))
        assert np.abs(ours_px[inside] - theirs_px[inside]).max() <= 1  # the repainted region: diffusers' pixels
        assert np.array_equal(ours_px[~inside], np.asarray(images[k])[~inside])  # the rest: the input, exactly


def test_ldm_generate_inpaints_with_an_sdxl_inpainting_folder(twins: SDXLTwins, tmp_path: Path) -> None:
    """`ldm generate --task inpaint` on the folder writes the image our pipeline makes; txt2img is refused by name."""
    from service.cli import main

    images, masks = images_and_masks()
    images[0].save(tmp_path / "in.png")
    masks[0].save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    with torch_threads(1):
        assert main(["generate", "a red circle", "--model", str(twins.folder), "--task", "inpaint",
                     "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "2",
                     "--sampler", "ddim", "--seed", "4", "-o", str(out)]) == 0
        settings = RunSettings(sampler="ddim", steps=2)
        expected = Pipeline(twins.ours, optimize=False).inpaint([SampleSpec("a red circle", seed=4)], settings,
                                                                images[:1], masks[:1]).images[0]
    written = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert np.abs(written - np.asarray(expected).astype(np.int16)).max() <= 1  # the CLI optimises for the CPU
    with pytest.raises(UnsupportedTask, match="is an inpainting model: use inpaint"):
        Pipeline(twins.ours, optimize=False).txt2img([SampleSpec("x")], settings)


def test_other_unet_input_widths_are_refused_by_name(twins: SDXLTwins, tmp_path: Path) -> None:
    folder = tmp_path / "xl"
    shutil.copytree(twins.folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "in_channels": 7}))
    with pytest.raises(CheckpointError, match=r"an SDXL UNet with 7 input channels: expected 4 \(base, refiner\) or 9"):
        load_model(folder)
