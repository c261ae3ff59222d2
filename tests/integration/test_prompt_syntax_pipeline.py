"""A1111-syntax prompts through the pipeline: prompts of different chunk counts (a long prompt beside short ones,
a prompt longer than its negative prompt) in one batch each give the image they give alone."""

from pathlib import Path

import torch

from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.tokenizers import CLIPTokenizer
from tests.helpers import random_model, torch_threads, toy_sd_config, write_clip_tokenizer


def test_long_and_short_prompts_share_a_batch_and_keep_their_solo_images(tmp_path: Path) -> None:
    tokenizer_dir = write_clip_tokenizer(tmp_path / "tok")
    with torch_threads(1):
        model = random_model(toy_sd_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size), seed=0,
                             tokenizer_dir=tokenizer_dir)
        pipe = Pipeline(model, prompt_syntax="a1111")
        settings = RunSettings(sampler="ddim", steps=2, width=64, height=64)
        long = "a red circle, " * 30  # > 75 tokens: several chunks
        specs = [SampleSpec("a (red:1.4) circle", seed=1), SampleSpec(long, seed=2),
                 SampleSpec("a [blue] square BREAK on the left", "blurry", seed=3)]
        started = pipe.start_txt2img(specs, settings)
        lengths = [(s.cond.context.shape[1], s.uncond.context.shape[1])  # type: ignore[union-attr]
                   for s in started.samples]
        assert lengths[0] == (77, 77) and lengths[2] == (154, 77)  # BREAK: two chunks
        assert lengths[1][0] > 77 and lengths[1][0] % 77 == 0 and lengths[1][1] == 77
        batch = pipe.sample_latents(specs, settings, (64, 64))[0]
        solos = [pipe.sample_latents([spec], settings, (64, 64))[0] for spec in specs]
        plain = Pipeline(model, prompt_syntax="plain").sample_latents(specs[:1], settings, (64, 64))[0]
    for i, solo in enumerate(solos):
        assert torch.equal(batch[i : i + 1], solo), f"item {i} differs from its solo run"
    assert (plain - solos[0]).abs().max() > 1e-3  # the weighting changes the image
