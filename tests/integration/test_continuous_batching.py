"""Continuous batching on a toy SD v1 model (random weights, the real UNet, CLIP encoder and autoencoder): images
whose samples joined a running `StepBatch` mid-run, beside others with different samplers, step counts, seeds and
guidance scales, and left it when done, are bit-identical to the same requests run alone by the pipeline
(tests/integration/test_pipeline.py checks the static batches)."""

from collections.abc import Hashable
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from models.ldm import LatentDiffusion
from models.pipeline import Pipeline, RunSettings, SampleSpec, Started
from models.samplers import SamplerName
from models.step_batch import StepBatch
from models.tokenizers import CLIPTokenizer
from tests.helpers import random_model, toy_sd_config, write_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLERS: tuple[SamplerName, ...] = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler_a")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    tokenizer_dir = write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    config = toy_sd_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size)
    model: LatentDiffusion = random_model(config, seed=0, tokenizer_dir=tokenizer_dir)
    return Pipeline(model)


def random_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def rekeyed(started: Started, name: str) -> Started:
    """The started batch with its samples' keys made unique across requests: (name, index)."""
    return replace(started, samples=[replace(s, key=(name, s.key)) for s in started.samples])


def run_continuously(pipe: Pipeline, arrivals: dict[int, list[tuple[str, Started]]]) -> dict[str, Image.Image]:
    """Admit each request's samples before iteration k, step until every sample is done; images by name."""
    batch = StepBatch(pipe.denoiser, max_items=16)
    requests = {name: started for group in arrivals.values() for name, started in group}
    final: dict[Hashable, torch.Tensor] = {}
    iteration = 0
    while len(batch) or any(k >= iteration for k in arrivals):
        for _, started in arrivals.get(iteration, []):
            for sample in started.samples:
                batch.admit(sample)
        final |= {s.key: s.latent for s in batch.step() if s.state.done}
        iteration += 1
    return {name: started.finish(0, final[(name, 0)]) for name, started in requests.items()}


def test_joined_mid_run_beside_every_sampler_equals_alone(pipe: Pipeline) -> None:
    """Each sampler's request joins at a different step of a batch of the others; prompts, negative prompts,
    seeds, guidance scales (1 included: no unconditional rows of its own) and step counts all differ."""
    requests = {
        name: (SampleSpec(f"a {name} picture of a boat", "blurry" if k % 2 else "", seed=10 + k,
                          guidance_scale=1.0 if k == 1 else 2.0 + k),
               RunSettings(sampler=name, steps=3 + k, width=32, height=32, eta=1.0 if name == "ddim" else 0.0))
        for k, name in enumerate(SAMPLERS)
    }
    arrivals: dict[int, list[tuple[str, Started]]] = {}
    for k, (name, (spec, settings)) in enumerate(requests.items()):
        arrivals.setdefault(k % 3, []).append((name, rekeyed(pipe.start_txt2img([spec], settings), name)))
    images = run_continuously(pipe, arrivals)
    for name, (spec, settings) in requests.items():
        alone = pipe.txt2img([spec], settings).images[0]
        np.testing.assert_array_equal(np.asarray(images[name]), np.asarray(alone), err_msg=name)


def test_img2img_and_blended_inpainting_join_a_txt2img_batch(pipe: Pipeline) -> None:
    """Other tasks of one model and latent size share the model call too: their start level, after-step
    blend and pasted pixels are their own."""
    spec = SampleSpec("a red cat", "ugly", seed=3, guidance_scale=4.0)
    mask_pixels = np.zeros((32, 32), np.uint8)
    mask_pixels[4:21, 9:30] = 255
    mask = Image.fromarray(mask_pixels)
    txt = RunSettings(sampler="dpmpp_2m", steps=6, width=32, height=32)
    img = RunSettings(sampler="euler_a", steps=8, strength=0.5)
    inp = RunSettings(sampler="ddim", steps=4, strength=1.0)
    arrivals = {
        0: [("txt", rekeyed(pipe.start_txt2img([spec], txt), "txt"))],
        1: [("img", rekeyed(pipe.start_img2img([spec], img, [random_image(1)]), "img"))],
        2: [("inp", rekeyed(pipe.start_inpaint([spec], inp, [random_image(2)], [mask]), "inp"))],
    }
    images = run_continuously(pipe, arrivals)
    alone = {"txt": pipe.txt2img([spec], txt).images[0], "img": pipe.img2img([spec], img, [random_image(1)]).images[0],
             "inp": pipe.inpaint([spec], inp, [random_image(2)], [mask]).images[0]}
    for name, image in alone.items():
        np.testing.assert_array_equal(np.asarray(images[name]), np.asarray(image), err_msg=name)


def test_a_cancelled_sample_leaves_and_the_others_do_not_change(pipe: Pipeline) -> None:
    settings = RunSettings(sampler="plms", steps=5, width=32, height=32)
    specs = [SampleSpec("a dog", seed=1, guidance_scale=3.0), SampleSpec("a tree", seed=2, guidance_scale=6.0)]
    started = pipe.start_txt2img(specs, settings)
    batch = StepBatch(pipe.denoiser, max_items=2)
    for sample in started.samples:
        batch.admit(sample)
    batch.step()
    batch.step()
    assert batch.cancel(1) and [s.key for s in batch] == [0]
    final: dict[Hashable, torch.Tensor] = {}
    while len(batch):
        final |= {s.key: s.latent for s in batch.step() if s.state.done}
    assert set(final) == {0}
    alone = pipe.txt2img(specs[:1], settings).images[0]
    np.testing.assert_array_equal(np.asarray(started.finish(0, final[0])), np.asarray(alone))
