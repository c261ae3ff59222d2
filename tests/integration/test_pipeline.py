"""The pipelines on toy models with the real structures (SD v1 txt2img, SD inpainting, LDM-SR), random weights.

Nothing here checks beauty: the properties are the ones a service promises. A request's image does not
depend on its batch; seeds reproduce; every sampler and step count runs; inpainting returns the unmasked
pixels exactly; super-resolution multiplies the size by f; bad settings are clear errors; guidance 1 does
not pay for the unconditional branch; truncation warnings reach the caller; progress and cancellation work.
"""

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoints import load_model, save_model
from models.images import to_pil, to_tensor
from models.ldm import LatentDiffusion
from models.names import SAMPLERS, SamplerName
from models.pipeline import Pipeline, RunSettings, SampleSpec, UnsupportedTask
from models.tokenizers import CLIPTokenizer
from tests.helpers import random_model, toy_sd_config, toy_sr_config, write_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ME = SampleSpec("a red cat on a windowsill", "blurry", seed=7, guidance_scale=5.0)
SMALL = RunSettings(steps=4, width=32, height=32)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def sd(tokenizer_dir: Path) -> LatentDiffusion:
    """A toy SD v1 txt2img model (f=8 KL autoencoder, CLIP text encoder)."""
    config = toy_sd_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size)
    return random_model(config, seed=0, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def pipe(sd: LatentDiffusion) -> Pipeline:
    return Pipeline(sd)


@pytest.fixture(scope="module")
def inpainting(tokenizer_dir: Path) -> LatentDiffusion:
    """A toy SD inpainting model: 9-channel UNet input (latent, mask, masked-image latent)."""
    config = toy_sd_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size, in_channels=9)
    return random_model(config, seed=1, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def upscaler() -> LatentDiffusion:
    """A toy LDM-SR model: VQ f=4 autoencoder, low-res RGB image concatenated to the 3-channel latent."""
    return random_model(toy_sr_config(), seed=2)


def unet_batch_sizes(model: LatentDiffusion, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the UNet: the batch size of every call (the real forward runs)."""
    sizes: list[int] = []
    forward = model.unet.forward

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    return sizes


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ batches and seeds


@pytest.mark.parametrize(("sampler", "eta"), [("dpmpp_2m", 0.0), ("ddim", 1.0), ("euler_a", 0.0)])
def test_request_gives_the_same_image_alone_and_in_a_batch_of_four(pipe: Pipeline, sampler: SamplerName,
                                                                   eta: float) -> None:
    """Per-item generators (an item's initial latent and ancestral noise come from its own seed) and
    batch-invariant layers (models/layers.py: one GEMM per item) make an item's image bit-identical
    alone and in any batch: its neighbours' prompts, seeds and guidance scales (1 included) never leak in.
    """
    settings = RunSettings(sampler=sampler, steps=4, width=32, height=32, eta=eta)
    batch_a = [SampleSpec("a dog", seed=1, guidance_scale=1.0), ME,
               SampleSpec("a castle", seed=2, guidance_scale=9.0), SampleSpec("", seed=3)]
    batch_b = [SampleSpec("a horse", "ugly", seed=5, guidance_scale=3.0), ME,
               SampleSpec("", seed=8, guidance_scale=1.0), SampleSpec("a boat at sea", seed=31, guidance_scale=12.0)]
    alone = pixels(pipe.txt2img([ME], settings).images[0])
    in_a = [pixels(im) for im in pipe.txt2img(batch_a, settings).images]
    in_b = [pixels(im) for im in pipe.txt2img(batch_b, settings).images]
    np.testing.assert_array_equal(alone, in_a[1])
    np.testing.assert_array_equal(alone, in_b[1])
    assert all(np.abs(alone - other).mean() > 10 for other in (in_a[0], in_a[2], in_a[3]))

    latent_alone, _ = pipe.sample_latents([ME], settings, (32, 32))
    latent_batch, _ = pipe.sample_latents(batch_a, settings, (32, 32))
    assert torch.equal(latent_alone[0], latent_batch[1])


def test_same_seed_same_image_different_seeds_differ(pipe: Pipeline) -> None:
    first, second = (pixels(pipe.txt2img([ME], SMALL).images[0]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    other = pixels(pipe.txt2img([dataclasses.replace(ME, seed=ME.seed + 1)], SMALL).images[0])
    assert np.abs(first - other).mean() > 10


# ------------------------------------------------------------------------------------------ samplers and img2img


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_for_1_3_and_9_steps(pipe: Pipeline, sampler: SamplerName) -> None:
    """3 and 9 are step counts the original DDIM crashes on."""
    for steps in (1, 3, 9):
        settings = RunSettings(sampler=sampler, steps=steps, width=32, height=32)
        latents, _ = pipe.sample_latents([ME], settings, (32, 32))
        assert latents.shape == (1, 4, 4, 4) and bool(latents.isfinite().all())
    assert pipe.txt2img([ME], settings).images[0].size == (32, 32)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_at_strength_one_and_a_half(pipe: Pipeline, sampler: SamplerName) -> None:
    image = random_image(32, 32)
    out = {}
    for strength in (1.0, 0.5):
        settings = RunSettings(sampler=sampler, steps=6, strength=strength)
        result = pipe.img2img([ME], settings, [image])
        assert result.images[0].size == (32, 32)
        out[strength] = pixels(result.images[0])
    assert np.abs(out[1.0] - out[0.5]).mean() > 1


def test_img2img_with_a_tiny_strength_returns_the_encoded_decoded_image(pipe: Pipeline, sd: LatentDiffusion) -> None:
    """int(10 * 0.01) = 0 steps: the image goes through the autoencoder only."""
    image = random_image(32, 32)
    steps_seen: list[tuple[int, int]] = []
    result = pipe.img2img([ME], RunSettings(steps=10, strength=0.01), [image],
                          progress=lambda i, n: steps_seen.append((i, n)))
    with torch.inference_mode():
        expected = to_pil(sd.decode_latents(sd.encode_images(to_tensor([image]))))[0]
    np.testing.assert_array_equal(pixels(result.images[0]), pixels(expected))
    assert steps_seen == []


# ------------------------------------------------------------------------------------------ inpainting


def inpaint_inputs() -> tuple[Image.Image, Image.Image, np.ndarray]:
    """A 32x32 image and a mask whose edges do not fall on the latent grid (white = repaint)."""
    mask = np.zeros((32, 32), np.uint8)
    mask[5:19, 9:27] = 255
    return random_image(32, 32, seed=1), Image.fromarray(mask), mask > 0


def test_inpainting_with_a_nine_channel_model_keeps_unmasked_pixels_exactly(inpainting: LatentDiffusion) -> None:
    image, mask, inside = inpaint_inputs()
    out = pixels(Pipeline(inpainting).inpaint([ME], RunSettings(steps=4), [image], [mask]).images[0])
    np.testing.assert_array_equal(out[~inside], pixels(image)[~inside])
    assert np.abs(out[inside] - pixels(image)[inside]).mean() > 10


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("dpmpp_2m", 1.0), ("euler_a", 0.6), ("plms", 0.6)])
def test_inpainting_by_blending_with_a_txt2img_model(pipe: Pipeline, sampler: SamplerName, strength: float) -> None:
    image, mask, inside = inpaint_inputs()
    settings = RunSettings(sampler=sampler, steps=5, strength=strength)
    out = pixels(pipe.inpaint([ME], settings, [image], [mask]).images[0])
    np.testing.assert_array_equal(out[~inside], pixels(image)[~inside])
    assert np.abs(out[inside] - pixels(image)[inside]).mean() > 10


def test_inpainting_mask_of_another_size_is_an_error(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match=r"mask size \(16, 16\) differs from image size \(32, 32\)"):
        pipe.inpaint([ME], SMALL, [random_image(32, 32)], [Image.new("L", (16, 16))])


# ------------------------------------------------------------------------------------------ super-resolution


def test_upscale_with_an_ldm_sr_model_multiplies_the_size_by_f(upscaler: LatentDiffusion,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert upscaler.config.downsample_factor == 4
    batch_sizes = unet_batch_sizes(upscaler, monkeypatch)
    low = random_image(12, 16)  # 12 wide, 16 high
    result = Pipeline(upscaler).upscale([SampleSpec(seed=0, guidance_scale=7.5)], RunSettings(steps=3), [low])
    assert result.images[0].size == (48, 64)
    assert batch_sizes == [1, 1, 1]  # no prompt, so no guidance: the batch is not doubled for nothing


def test_upscale_with_a_txt2img_model_is_unsupported(pipe: Pipeline) -> None:
    with pytest.raises(UnsupportedTask, match="is not a super-resolution model"):
        pipe.upscale([ME], SMALL, [random_image(16, 16)])


def test_models_with_concat_inputs_refuse_the_tasks_that_lack_them(inpainting: LatentDiffusion,
                                                                   upscaler: LatentDiffusion) -> None:
    image = random_image(32, 32)
    with pytest.raises(UnsupportedTask, match="is an inpainting model: use inpaint"):
        Pipeline(inpainting).txt2img([ME], SMALL)
    with pytest.raises(UnsupportedTask, match="is an inpainting model: use inpaint"):
        Pipeline(inpainting).img2img([ME], RunSettings(steps=4, strength=1.0), [image])
    with pytest.raises(UnsupportedTask, match="is a super-resolution model: use upscale"):
        Pipeline(upscaler).txt2img([ME], SMALL)
    with pytest.raises(UnsupportedTask, match="is a super-resolution model: use upscale"):
        Pipeline(upscaler).inpaint([ME], SMALL, [image], [Image.new("L", (32, 32), 255)])


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("width", "height", "message"), [
    (36, 32, "width must be a positive multiple of 8 for this model, got 36"),
    (32, 20, "height must be a positive multiple of 8 for this model, got 20"),
    (0, 32, "width must be a positive multiple of 8 for this model, got 0"),
])
def test_size_not_a_multiple_of_f_is_an_error(pipe: Pipeline, width: int, height: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.txt2img([ME], RunSettings(steps=1, width=width, height=height))


def test_odd_latent_sizes_work(pipe: Pipeline) -> None:
    """72x40 px = 9x5 latents: odd sizes at every UNet level (skip connections must be cropped/padded)."""
    result = pipe.txt2img([ME], RunSettings(steps=2, width=72, height=40))
    assert result.images[0].size == (72, 40)
    assert pipe.img2img([ME], RunSettings(steps=2, strength=0.5), [random_image(72, 40)]).images[0].size == (72, 40)


@pytest.mark.parametrize("steps", [0, 1001, -3])
def test_step_count_out_of_range_is_an_error(pipe: Pipeline, steps: int) -> None:
    with pytest.raises(ValueError, match=rf"steps must be within 1\.\.1000, got {steps}"):
        pipe.txt2img([ME], dataclasses.replace(SMALL, steps=steps))


def test_empty_batch_is_an_error(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match="at least one item"):
        pipe.txt2img([], SMALL)


def test_negative_prompt_changes_the_image(pipe: Pipeline) -> None:
    with_negative = pixels(pipe.txt2img([ME], SMALL).images[0])
    without = pixels(pipe.txt2img([dataclasses.replace(ME, negative_prompt="")], SMALL).images[0])
    assert np.abs(with_negative - without).mean() > 1


def test_guidance_one_skips_the_unconditional_branch(pipe: Pipeline, sd: LatentDiffusion,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    batch_sizes = unet_batch_sizes(sd, monkeypatch)
    two = [dataclasses.replace(ME, guidance_scale=1.0), SampleSpec("a dog", seed=1, guidance_scale=1.0)]
    pipe.txt2img(two, SMALL)
    assert batch_sizes == [2] * SMALL.steps
    batch_sizes.clear()
    pipe.txt2img([two[0], dataclasses.replace(two[1], guidance_scale=7.5)], SMALL)
    assert batch_sizes == [4] * SMALL.steps  # one scale != 1: the batch is doubled once, for everyone


def test_prompt_longer_than_the_encoder_limit_is_truncated_with_a_warning(pipe: Pipeline) -> None:
    long = "a red cat sitting on a windowsill watching the rain " * 12
    result = pipe.txt2img([SampleSpec("a dog"), SampleSpec(long)], SMALL)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("prompt 1 truncated to 77 tokens: dropped")
    result = pipe.txt2img([SampleSpec("a dog", negative_prompt=long)], SMALL)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("negative prompt 0 truncated to 77 tokens: dropped")


# ------------------------------------------------------------------------------------------ progress


def test_progress_is_called_once_per_step(pipe: Pipeline) -> None:
    calls: list[tuple[int, int]] = []
    pipe.txt2img([ME], RunSettings(steps=5, width=32, height=32), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)]
    calls.clear()  # img2img runs the last int(10 * 0.5) steps only
    pipe.img2img([ME], RunSettings(steps=10, strength=0.5), [random_image(32, 32)],
                 progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)]


class Cancelled(Exception):
    pass


def test_raising_in_progress_cancels_the_run(pipe: Pipeline) -> None:
    calls: list[int] = []

    def cancel_after_two(i: int, total: int) -> None:
        calls.append(i)
        if i == 2:
            raise Cancelled("job cancelled")

    with pytest.raises(Cancelled, match="job cancelled"):
        pipe.txt2img([ME], RunSettings(steps=6, width=32, height=32), progress=cancel_after_two)
    assert calls == [1, 2]


# ------------------------------------------------------------------------------------------ dtypes


def test_bf16_model_runs_txt2img_on_cpu(sd: LatentDiffusion, tmp_path: Path, tokenizer_dir: Path) -> None:
    path = save_model(random_model(sd.config, seed=0, tokenizer_dir=tokenizer_dir), tmp_path / "toy.safetensors")
    model = load_model(path, tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16)
    pipe = Pipeline(model)
    latents, _ = pipe.sample_latents([ME], SMALL, (32, 32))
    assert latents.dtype == torch.bfloat16 and bool(latents.isfinite().all())
    image = pixels(pipe.txt2img([ME], SMALL).images[0])
    assert image.shape == (32, 32, 3) and image.std() > 10
