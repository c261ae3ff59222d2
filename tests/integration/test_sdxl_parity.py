"""SDXL base loaded by us and run by diffusers' StableDiffusionXLPipeline: a diffusers folder and an original
single file.

Random weights with SDXL's structure at reduced width, built with diffusers and transformers in
tests/sdxl_twins.py: a 3-level UNet (no attention at the first level, 1 / 2 / 3 transformer blocks per level and
the middle block's 3, 64-channel heads, linear projections, the `text_time` added embedding of a pooled text
vector and 6 Fourier-embedded micro-conditioning numbers), CLIP ViT-L-like (quick_gelu) and bigG-like (gelu, pads
with "!", projected pooled output) text encoders of 3 blocks each (their penultimate outputs are the context),
a KL VAE. diffusers' `save_pretrained` writes the folder; the single file is our loaded model written back with
the inverse of the loader's mapping (`sdxl_conditioner_to_original`). Text encoders (pooled included), UNet and
10-step DDIM and DPM-Solver++ generations with classifier-free guidance must agree to 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from PIL import Image

from models.checkpoints import CheckpointError, load_model, read_model_config, save_model
from models.config import ModelConfig, from_dict, to_dict
from models.pipeline import Pipeline, RunSettings, SampleSpec, UnsupportedTask
from models.text.clip import MissingTokenizerError
from models.text.sdxl import SDXLTextConditioner, added_vector
from models.tokenizers import CLIPTokenizer
from tests.helpers import (
    TOL,
    assert_close_at_unit_scale,
    random_model,
    torch_threads,
    toy_sd_config,
)
from tests.sdxl_twins import PROJECTION, TIME_DIM, SDXLTwins, refiner_unet, scheduler_config, write_sdxl_file


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> SDXLTwins:
    with torch_threads(1):
        return SDXLTwins(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("source", ["folder", "file"])
def test_config_is_sdxl_base(twins: SDXLTwins, source: str) -> None:
    config = twins.model(source).config
    assert (config.family, config.scale_factor, config.schedule.prediction_type) == ("sdxl", 0.13025, "epsilon")
    assert config.unet.level_depths == (1, 2, 3) and config.unet.depth(2) == 3
    assert config.unet.adm_in_channels == PROJECTION + 6 * TIME_DIM and config.unet.context_dim == 192
    assert config.unet.heads(128) == (2, 64) and config.unet.use_linear_in_transformer
    assert config.conditioner is not None
    text = config.conditioner.sdxl
    assert [e.hidden_act for e in text.encoders] == ["quick_gelu", "gelu"]
    assert (text.projection_dim, text.micro, text.force_zeros_for_empty_prompt) == (PROJECTION, "size", True)
    assert read_model_config(twins.path) == twins.from_file.config if source == "file" else True


@pytest.mark.parametrize("source", ["folder", "file"])
def test_text_encoders_and_unet_match_diffusers(twins: SDXLTwins, source: str) -> None:
    ours = twins.model(source)
    prompts = ["a red circle on the left", "a blue square"]
    with torch_threads(1), torch.inference_mode():
        ctx, neg, pooled, neg_pooled = twins.pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
        assert isinstance(ours.conditioner, SDXLTextConditioner)
        encoded = ours.conditioner.encode(prompts)
        assert encoded.context.shape == (2, 77, 192) and encoded.pooled is not None
        assert (encoded.context - ctx).abs().max() < TOL and ctx.abs().max() > 0.1
        assert (encoded.pooled - pooled).abs().max() < TOL and pooled.abs().max() > 0.1
        assert neg.abs().max() == 0 and neg_pooled.abs().max() == 0  # force_zeros_for_empty_prompt
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([981.0, 1.0])
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 32.0, 512.0, 512.0]])
        theirs = twins.pipe.unet(x, t, encoder_hidden_states=ctx,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        y = added_vector(encoded.pooled, time_ids, TIME_DIM)
        assert theirs.abs().max() > 0.1
        assert (ours.unet(x, t, encoded.context, y) - theirs).abs().max() < TOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("source", ["folder", "file"])
def test_ten_step_generation_matches_diffusers(twins: SDXLTwins, source: str, sampler: str) -> None:
    """With the empty negative prompt as zeros (force_zeros_for_empty_prompt) and the default micro-conditioning
    (original = target = the image's size, no crop)."""
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    twins.pipe.scheduler = schedulers[sampler].from_config(scheduler_config())
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    with torch_threads(1):
        expected = twins.pipe(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                              generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
        specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
        settings = RunSettings(sampler=sampler, steps=10, width=64, height=64)  # type: ignore[arg-type]
        latents, _ = Pipeline(twins.model(source), optimize=False).sample_latents(specs, settings, (64, 64))
    assert_close_at_unit_scale(latents, expected)


def test_negative_prompt_and_micro_conditioning_match_diffusers(twins: SDXLTwins) -> None:
    """A written negative prompt (encoded, not zeros) and micro-conditioning other than the defaults."""
    twins.pipe.scheduler = diffusers.DDIMScheduler.from_config(scheduler_config())
    micro = {"original_size": (1024, 768), "crops_coords_top_left": (16, 32), "target_size": (512, 512)}
    with torch_threads(1):
        expected = twins.pipe("a cat", negative_prompt="a dog", num_inference_steps=4, guidance_scale=5.0,
                              height=64, width=64, generator=torch.Generator().manual_seed(2), output_type="latent",
                              **micro).images
        spec = SampleSpec("a cat", negative_prompt="a dog", seed=2, guidance_scale=5.0, **micro)  # type: ignore[arg-type]
        settings = RunSettings(sampler="ddim", steps=4, width=64, height=64)
        latents, _ = Pipeline(twins.ours, optimize=False).sample_latents([spec], settings, (64, 64))
    assert_close_at_unit_scale(latents, expected)


def test_missing_parts_are_named(twins: SDXLTwins, tmp_path: Path) -> None:
    half = load_model(twins.path, tokenizer_dir=twins.folder / "tokenizer")
    with pytest.raises(MissingTokenizerError, match=r"encoder\(s\) \[2\] have no tokenizer: give --tokenizer-2 DIR"):
        assert half.conditioner is not None
        half.conditioner.encode(["x"])
    folder = tmp_path / "xl"
    shutil.copytree(twins.folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "some_new_flag": True}))
    with pytest.raises(CheckpointError, match=r"model_index.json has fields this loader does not know: \['some_new"):
        load_model(folder)
    unet_cfg = json.loads((twins.folder / "unet" / "config.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "addition_time_embed_dim": 16}))
    with pytest.raises(CheckpointError, match="added vector is 112 wide, but .* make 160"):
        load_model(folder)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_cfg))
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="SDXL's added embedding .* but the folder is a StableDiffusionPipeline"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------------- refiner


class RefinerTwins:
    """diffusers' SDXL refiner (bigG alone, aesthetic score, 4-deep transformers) and ours from its folder."""

    def __init__(self, base: SDXLTwins, tmp: Path) -> None:
        self.pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base.pipe.vae, text_encoder=None, text_encoder_2=base.text_2, tokenizer=None,
            tokenizer_2=base.pipe.tokenizer_2, unet=refiner_unet(),
            scheduler=diffusers.DDIMScheduler.from_config(scheduler_config()), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
        self.folder = tmp / "refiner-folder"
        self.pipe.save_pretrained(str(self.folder), safe_serialization=True)
        self.ours = load_model(self.folder)
        self.path = tmp / "refiner.safetensors"
        write_sdxl_file(self.ours, self.path, pooled_embedder=0)


@pytest.fixture(scope="module")
def refiner(twins: SDXLTwins, tmp_path_factory: pytest.TempPathFactory) -> RefinerTwins:
    with torch_threads(1):
        return RefinerTwins(twins, tmp_path_factory.mktemp("refiner"))


def test_refiner_config_and_components_match_diffusers(refiner: RefinerTwins) -> None:
    from_file = load_model(refiner.path, tokenizer_2_dir=refiner.folder / "tokenizer_2")
    for ours in (refiner.ours, from_file):
        config = ours.config
        assert config.family == "sdxl_refiner" and config.conditioner is not None
        assert (config.conditioner.sdxl.micro, config.conditioner.sdxl.force_zeros_for_empty_prompt) == (
            "aesthetic", False)
        assert config.unet.adm_in_channels == PROJECTION + 5 * TIME_DIM and config.unet.context_dim == 128
    prompts = ["a red circle", "a blue square"]
    with torch_threads(1), torch.inference_mode():
        ctx, neg, pooled, neg_pooled = refiner.pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                  do_classifier_free_guidance=True)
        assert neg.abs().max() > 0.1  # the refiner encodes "" (no force_zeros_for_empty_prompt)
        for ours in (refiner.ours, from_file):
            assert isinstance(ours.conditioner, SDXLTextConditioner)
            encoded, empty = ours.conditioner.encode(prompts), ours.conditioner.encode(["", ""])
            assert encoded.pooled is not None and empty.pooled is not None
            assert (encoded.context - ctx).abs().max() < TOL and (encoded.pooled - pooled).abs().max() < TOL
            assert (empty.context - neg).abs().max() < TOL and (empty.pooled - neg_pooled).abs().max() < TOL
            g = torch.Generator().manual_seed(0)
            x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([150.0, 1.0])
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0], [1024.0, 768.0, 16.0, 32.0, 2.5]])
            theirs = refiner.pipe.unet(x, t, encoder_hidden_states=ctx,
                                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            y = added_vector(encoded.pooled, time_ids, TIME_DIM)
            assert (ours.unet(x, t, encoded.context, y) - theirs).abs().max() < TOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_base_then_refiner_in_one_run_matches_diffusers(twins: SDXLTwins, refiner: RefinerTwins,
                                                        sampler: str) -> None:
    """diffusers' ensemble of expert denoisers: base(denoising_end=0.7) -> latents -> refiner(denoising_start=0.7),
    against one run of ours with `refiner_switch=0.7` (the base does 7 of the 10 steps, the refiner 3)."""
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    twins.pipe.scheduler = schedulers[sampler].from_config(scheduler_config())
    refiner.pipe.scheduler = schedulers[sampler].from_config(scheduler_config())
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    with torch_threads(1):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        handed = twins.pipe(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                            denoising_end=0.7, generator=generators, output_type="latent").images
        expected = refiner.pipe(prompts, image=handed, num_inference_steps=10, denoising_start=0.7,
                                guidance_scale=7.5, generator=generators, output_type="latent").images
        specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
        settings = RunSettings(sampler=sampler, steps=10, width=64, height=64,  # type: ignore[arg-type]
                               refiner_switch=0.7)
        pipeline = Pipeline(twins.ours, optimize=False, refiner=refiner.ours)
        seen: list[tuple[int, int]] = []
        latents, _ = pipeline.sample_latents(specs, settings, (64, 64), progress=lambda i, n: seen.append((i, n)))
    assert_close_at_unit_scale(latents, expected)
    assert seen == [(i, 10) for i in range(1, 11)]
    with pytest.raises(UnsupportedTask, match="needs a pipeline with a refiner"):
        Pipeline(twins.ours, optimize=False).start_txt2img(specs, settings)


def test_ldm_generate_takes_both_tokenizers_for_a_single_file(twins: SDXLTwins, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`ldm generate --tokenizer DIR --tokenizer-2 DIR` on an original SDXL file writes the image our pipeline makes;
    without the second folder it stops before any work, naming the flag."""
    from service.cli import main

    out = tmp_path / "xl.png"
    common = ["generate", "a red circle", "--model", str(twins.path), "--tokenizer", str(twins.folder / "tokenizer"),
              "--steps", "2", "--width", "64", "--height", "64", "--seed", "4", "--sampler", "ddim"]
    with torch_threads(1):
        assert main([*common, "--tokenizer-2", str(twins.folder / "tokenizer_2"), "-o", str(out)]) == 0
        settings = RunSettings(sampler="ddim", steps=2, width=64, height=64)
        image = Pipeline(twins.from_file, optimize=False).txt2img([SampleSpec("a red circle", seed=4)], settings)
    written = torch.tensor(list(Image.open(out).convert("RGB").getdata()), dtype=torch.float32)
    expected = torch.tensor(list(image.images[0].getdata()), dtype=torch.float32)
    assert (written - expected).abs().max() <= 1  # the CLI optimises for the CPU: rounding may move a level
    assert main([*common, "-o", str(tmp_path / "no.png")]) == 2
    assert "SDXL text encoder(s) [2] have no tokenizer: give --tokenizer-2 DIR" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


def test_saved_sdxl_model_round_trips(twins: SDXLTwins, tmp_path: Path) -> None:
    """`save_model` writes our layout with the config (encoders included) in the metadata; it loads back the same,
    both tokenizers given as for an original file."""
    path = save_model(twins.ours, tmp_path / "ours.safetensors")
    back = load_model(path, tokenizer_dir=twins.folder / "tokenizer", tokenizer_2_dir=twins.folder / "tokenizer_2")
    assert back.config == twins.ours.config
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(back.config)))) == back.config
    with torch_threads(1), torch.inference_mode():
        assert isinstance(back.conditioner, SDXLTextConditioner)
        assert isinstance(twins.ours.conditioner, SDXLTextConditioner)
        ours, theirs = back.conditioner.encode(["a cat"]), twins.ours.conditioner.encode(["a cat"])
        assert torch.equal(ours.context, theirs.context) and ours.pooled is not None and theirs.pooled is not None
        assert torch.equal(ours.pooled, theirs.pooled)


def test_micro_conditioning_is_per_sample_in_a_batch(twins: SDXLTwins, tmp_path: Path) -> None:
    """Two items with different micro-conditioning in one batch each get the latents they get alone; other models
    refuse the fields by name, and the base refuses the refiner's aesthetic score."""
    specs = [SampleSpec("a cat", seed=1, original_size=(1024, 1024), crops_coords_top_left=(64, 0)),
             SampleSpec("a cat", seed=1, target_size=(256, 256))]
    settings = RunSettings(sampler="ddim", steps=3, width=64, height=64)
    with torch_threads(1):
        pipeline = Pipeline(twins.ours, optimize=False)
        together, _ = pipeline.sample_latents(specs, settings, (64, 64))
        alone = [pipeline.sample_latents([s], settings, (64, 64))[0] for s in specs]
    assert (together[0] - together[1]).abs().max() > 1e-3  # the conditioning is used
    for k in range(2):
        assert (together[k : k + 1] - alone[k]).abs().max() <= 1e-5 * max(1.0, float(alone[k].abs().max()))
    with pytest.raises(UnsupportedTask, match="not conditioned on aesthetic_score"):
        pipeline.start_txt2img([SampleSpec("a cat", aesthetic_score=7.0)], settings)
    sd = random_model(toy_sd_config(CLIPTokenizer.from_dir(twins.tokenizer_dir).vocab_size),
                      tokenizer_dir=twins.tokenizer_dir)
    with pytest.raises(UnsupportedTask, match="original_size is SDXL micro-conditioning; model 'toy-sd' is not"):
        Pipeline(sd, optimize=False).start_txt2img([specs[0]], settings)
