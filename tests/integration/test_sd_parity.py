"""One SD v1 checkpoint file in the original single-file layout, loaded by us and by diffusers.

The file has random weights with the SD v1 structure (reduced width in the fast tests, the real
SD-1.5 size in the slow one) and no config of ours: we infer family and architecture from it, and
diffusers builds its StableDiffusionPipeline with its own converters. UNet output, VAE encode and
decode, CLIP hidden states, and whole 10-step DDIM and DPM-Solver++ generations must agree to 1e-4.
"""

from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from models.autoencoder import AutoencoderConfig, DiagonalGaussian
from models.checkpoints import load_model
from models.conditioners import ConditionerConfig
from models.config import ModelConfig
from models.cpu_inference import optimize_for_cpu_inference
from models.diffusion import ScheduleConfig
from models.ldm import LatentDiffusion
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.text.clip import CLIPTextConfig
from models.tokenizers import CLIPTokenizer
from models.unet import UNetConfig
from tests.helpers import (
    TOL,
    assert_close_at_unit_scale,
    diffusers_unet,
    diffusers_vae,
    randomize,
    torch_threads,
    write_clip_tokenizer,
)

SD_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def sd_config(vocab_size: int, *, full: bool = False, in_channels: int = 4) -> ModelConfig:
    """SD v1 structure; reduced: 1/10 width UNet, 1/4 width VAE, 2-layer 128-wide CLIP."""
    clip = CLIPTextConfig(vocab_size=vocab_size) if full else CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2)
    return ModelConfig(
        name="sd-test", family="sd_v1" if in_channels == 4 else "sd_v1_inpainting",
        unet=UNetConfig(in_channels=in_channels) if full else UNetConfig(
            in_channels=in_channels, model_channels=32, context_dim=clip.hidden_size),
        autoencoder=AutoencoderConfig() if full else AutoencoderConfig(ch=32),
        conditioner=ConditionerConfig(kind="clip", clip=clip),
        conditioning="crossattn" if in_channels == 4 else "hybrid",
        concat_input="none" if in_channels == 4 else "inpaint",
        schedule=ScheduleConfig(),
    )


def write_checkpoint(config: ModelConfig, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight model saved like an original SD file: prefixes, betas, position_ids, no config."""
    with torch.device("meta"):
        model = LatentDiffusion(config)
    randomize(model, seed)
    sd = {k: v.contiguous() for k, v in model.original_state_dict().items()}
    sd["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).float() ** 2
    positions = config.conditioner.clip.max_positions if config.conditioner else 77
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(sd, str(path))
    return sd


class Twins:
    """Our model and diffusers' pipeline loaded from the same file."""

    def __init__(self, tmp: Path, *, full: bool = False, in_channels: int = 4) -> None:
        self.tokenizer_dir = write_clip_tokenizer(tmp / "tokenizer")
        vocab = CLIPTokenizer.from_dir(self.tokenizer_dir).vocab_size
        config = sd_config(vocab, full=full, in_channels=in_channels)
        self.path = tmp / "sd-test.safetensors"
        sd = write_checkpoint(config, self.path)
        self.ours = load_model(self.path, tokenizer_dir=self.tokenizer_dir)
        self.fast = optimize_for_cpu_inference(load_model(self.path, tokenizer_dir=self.tokenizer_dir))
        # the eager model stays eager: pipelines are built with optimize=False below
        self.unet = diffusers_unet({k: v for k, v in sd.items() if k.startswith("model.")}, config.unet)
        self.vae = diffusers_vae({k: v for k, v in sd.items() if k.startswith("first_stage_model.")},
                                 config.autoencoder)
        clip = config.conditioner.clip if config.conditioner else CLIPTextConfig()
        self.text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
            num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads,
            max_position_embeddings=clip.max_positions, hidden_act="quick_gelu",
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        )).eval()
        # transformers >= 5 drops the `text_model.` level of the original key names
        strip = "cond_stage_model.transformer." + ("" if "text_model.final_layer_norm.weight"
                                                   in self.text.state_dict() else "text_model.")
        text_sd = {k[len(strip):]: v for k, v in sd.items() if k.startswith(strip) and "position_ids" not in k}
        self.text.load_state_dict(text_sd, strict=True)
        self.hf_tokenizer = transformers.CLIPTokenizer(
            str(self.tokenizer_dir / "vocab.json"), str(self.tokenizer_dir / "merges.txt"), model_max_length=77)

    def pipeline(self, scheduler: Any) -> Any:
        return diffusers.StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text, tokenizer=self.hf_tokenizer, unet=self.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    return Twins(tmp_path_factory.mktemp("sd"))


def test_family_and_architecture_inferred(twins: Twins) -> None:
    assert twins.ours.config.family == "sd_v1"
    assert twins.ours.config.unet.model_channels == 32
    assert twins.ours.config.unet.channel_mult == (1, 2, 4, 4)
    assert twins.ours.config.unet.attention_resolutions == (4, 2, 1)
    assert twins.ours.config.unet.context_dim == 128
    assert twins.ours.config.autoencoder.ch == 32


def test_components_match_diffusers(twins: Twins) -> None:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([981.0, 1.0])
    ids = CLIPTokenizer.from_dir(twins.tokenizer_dir).tokenize(["a red circle", ""]).ids
    with torch.inference_mode():
        ctx_ours = twins.ours.conditioner.encode(["a red circle", ""]).context  # type: ignore[union-attr]
        ctx_theirs = twins.text(ids).last_hidden_state
        assert (ctx_ours - ctx_theirs).abs().max() < TOL
        eps_theirs = twins.unet(x, t, encoder_hidden_states=ctx_theirs).sample
        assert eps_theirs.abs().max() > 0.1
        assert (twins.ours.unet(x, t, ctx_ours) - eps_theirs).abs().max() < TOL
        assert (twins.fast.unet(x, t, ctx_ours) - eps_theirs).abs().max() < TOL
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        post = twins.ours.autoencoder.encode(image)
        assert isinstance(post, DiagonalGaussian)
        ref = twins.vae.encode(image).latent_dist
        assert (post.mean - ref.mean).abs().max() < TOL and (post.std - ref.std).abs().max() < TOL
        decoded = twins.vae.decode(x[:1] / 0.18215).sample
        assert (twins.ours.decode_latents(x[:1]) - decoded).abs().max() < TOL
        assert (twins.fast.decode_latents(x[:1]) - decoded).abs().max() < TOL


@pytest.mark.parametrize("optimized", [False, True], ids=["eager", "cpu-optimized"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_ten_step_generation_matches_diffusers(twins: Twins, sampler: str, optimized: bool) -> None:
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    pipe = twins.pipeline(schedulers[sampler].from_config(SD_SCHEDULER))
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    expected = pipe(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
    settings = RunSettings(sampler=sampler, steps=10, width=64, height=64)  # type: ignore[arg-type]
    pipeline = Pipeline(twins.fast if optimized else twins.ours, optimize=False)
    ours, _ = pipeline.sample_latents(specs, settings, (64, 64))
    assert_close_at_unit_scale(ours, expected)


def test_inpainting_unet_matches_diffusers(tmp_path: Path) -> None:
    """The 9-channel UNet, and a 3-step DDIM inpainting with CFG against StableDiffusionInpaintPipeline (each item's
    generator draws its noise, then its masked image's latent from the VAE's posterior, as diffusers does)."""
    twins = Twins(tmp_path, in_channels=9)
    assert twins.ours.config.family == "sd_v1_inpainting"
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 9, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 128, generator=g)
    with torch.inference_mode():
        assert (twins.ours.unet(x, t, ctx) - twins.unet(x, t, encoder_hidden_states=ctx).sample).abs().max() < TOL
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=twins.vae, text_encoder=twins.text, tokenizer=twins.hf_tokenizer, unet=twins.unet,
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 16:56] = 255
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    with torch_threads(1), torch.inference_mode():
        expected = pipe(prompts, image=[image] * 2, mask_image=[Image.fromarray(mask)] * 2, num_inference_steps=3,
                        guidance_scale=7.5, height=64, width=64, output_type="latent",
                        generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        pipeline = Pipeline(twins.ours, optimize=False)
        specs = [SampleSpec(p, seed=s) for p, s in zip(prompts, seeds, strict=True)]
        started = pipeline.start_inpaint(specs, RunSettings(sampler="ddim", steps=3), [image] * 2,
                                         [Image.fromarray(mask)] * 2)
        latents = pipeline.run_samples(started.samples)
    assert_close_at_unit_scale(latents, expected)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_full_size_sd15_file_matches_diffusers(tmp_path: Path, sampler: str) -> None:
    """The real SD-1.5 shapes (UNet 859.52 M, VAE 83.65 M, CLIP 12 x 768) in one 4 GB file, 64 px."""
    twins = Twins(tmp_path, full=True)
    assert sum(p.numel() for p in twins.ours.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in twins.ours.autoencoder.parameters()) == 83_653_863
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    pipe = twins.pipeline(schedulers[sampler].from_config(SD_SCHEDULER))
    expected = pipe(["a red circle"], num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                    generator=[torch.Generator().manual_seed(5)], output_type="latent").images
    settings = RunSettings(sampler=sampler, steps=10, width=64, height=64)  # type: ignore[arg-type]
    ours, _ = Pipeline(twins.ours).sample_latents([SampleSpec("a red circle", seed=5)], settings, (64, 64))
    assert_close_at_unit_scale(ours, expected)
