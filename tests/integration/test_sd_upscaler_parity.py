"""The SD x4 upscaler (stabilityai/stable-diffusion-x4-upscaler's layout) loaded by us and run by diffusers.

diffusers builds the parts with the real structure at reduced width and random weights: a 7-channel UNet
(latent + the noised low-resolution image) whose first three levels' transformers attend to the text in attn1
too (`only_cross_attention` True, True, True, False: a loader that ignored it fails), the noise level as a
1000-row class embedding, a 3-level VAE (factor 4, scaling factor 0.08333), an OpenCLIP-style text encoder
(exact GELU, pads with "!"), a v-prediction DDIM scheduler and a DDPM `low_res_scheduler` that noises the input.
`StableDiffusionUpscalePipeline.save_pretrained` writes the folder we load. 10-step DDIM and DPM-Solver++
generations with classifier-free guidance, from the same per-item generators (each draws the input's noise first,
then the latents), must agree to 1e-4.
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

from models.checkpoints import CheckpointError, infer_model_config, load_model, save_model
from models.ldm import PREFIXES, LatentDiffusion
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.tokenizers import CLIPTokenizer
from tests.helpers import (
    TOL,
    assert_close_at_unit_scale,
    openclip_text_keys,
    random_model,
    randomize,
    torch_threads,
    toy_sr_config,
    write_clip_tokenizer,
)

SCALE = 0.08333


def upscale_pipeline(tmp: Path, *, full: bool = False) -> Any:
    """diffusers' StableDiffusionUpscalePipeline of random weights with the x4 upscaler's structure (UNet 1/8 width,
    VAE 1/4, 2 x 96 text, 96 so that attn1's key width tells self-attention (the levels' 64 / 128 channels) from
    attention to the text at every level with attention; `full`: the real sizes, OpenCLIP ViT-H text cut to 23
    blocks as the folder stores it)."""
    tokenizer_dir = write_clip_tokenizer(tmp / "tokenizer")
    vocab = CLIPTokenizer.from_dir(tokenizer_dir).vocab_size
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           pad_token="!", model_max_length=77)
    width = 1024 if full else 96
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width if full else 128,
        num_hidden_layers=23 if full else 2, num_attention_heads=16 if full else 1, hidden_act="gelu",
        max_position_embeddings=77)), seed=1)
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=128 if full else 32, in_channels=7, out_channels=4, layers_per_block=2,
        block_out_channels=(256, 512, 512, 1024) if full else (32, 64, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=[True, True, True, False], attention_head_dim=8, cross_attention_dim=width,
        use_linear_projection=True, num_class_embeds=1000, upcast_attention=False), seed=2)
    vae = randomize(diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512) if full else (32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=2 if full else 1,
        scaling_factor=SCALE), seed=3)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                        prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False,
                                        clip_sample=False, timestep_spacing="leading")  # said: from_config keeps it
    low_res = diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                      clip_sample=True, variance_type="fixed_small")
    return diffusers.StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                    low_res_scheduler=low_res, scheduler=scheduler,
                                                    max_noise_level=350)


class Twins:
    def __init__(self, tmp: Path, *, full: bool = False) -> None:
        self.pipe = upscale_pipeline(tmp, full=full)
        self.folder = tmp / "x4-upscaler"
        self.pipe.save_pretrained(str(self.folder), safe_serialization=True)
        self.ours: LatentDiffusion = load_model(self.folder)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    with torch_threads(1):
        return Twins(tmp_path_factory.mktemp("x4"))


def low_res_images(n: int, size: int = 16) -> list[Image.Image]:
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_folder_config_is_the_x4_upscaler(twins: Twins) -> None:
    config = twins.ours.config
    assert (config.family, config.concat_input, config.kind, config.tasks) == (
        "sd_v2_upscaler", "lowres", "lowres", frozenset({"upscale"}))
    assert config.scale_factor == SCALE and config.downsample_factor == 4
    assert config.unet.disable_self_attentions == (True, True, True, False) and config.unet.num_classes == 1000
    assert config.lowres_noise is not None and config.lowres_noise.beta_start == 0.0001
    assert (config.max_noise_level, config.default_noise_level) == (350, 20)
    assert config.schedule.prediction_type == "v_prediction"


def test_unet_matches_diffusers_with_noise_level_labels(twins: Twins) -> None:
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 7, 8, 8, generator=g), torch.tensor([981.0, 1.0]), torch.randn(2, 77, 96, generator=g)
    labels = torch.tensor([20, 300])
    with torch_threads(1), torch.inference_mode():
        theirs = twins.pipe.unet(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        assert theirs.abs().max() > 0.1
        assert (twins.ours.unet(x, t, ctx, y=labels) - theirs).abs().max() < TOL
        other = twins.ours.unet(x, t, ctx, y=torch.tensor([21, 300]))
        assert (other - theirs)[0].abs().max() > 1e-3  # the label matters


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_ten_step_upscale_matches_diffusers(twins: Twins, sampler: str) -> None:
    prompts, seeds, images = ["a red circle", "a blue square"], [3, 11], low_res_images(2)
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    pipe = diffusers.StableDiffusionUpscalePipeline(**{
        **twins.pipe.components, "scheduler": schedulers[sampler].from_config(twins.pipe.scheduler.config)})
    with torch_threads(1):
        expected = pipe(prompts, image=images, num_inference_steps=10, guidance_scale=7.5, noise_level=50,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
        pipeline = Pipeline(twins.ours)
        specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
        settings = RunSettings(sampler=sampler, steps=10, noise_level=50)  # type: ignore[arg-type]
        started = pipeline.start_upscale(specs, settings, images)
        latents = pipeline.run_samples(started.samples)
        assert latents.shape == (2, 4, 16, 16)
        assert_close_at_unit_scale(latents, expected)
        out = started.finish(0, latents[:1])
    assert out.size == (64, 64)  # x4


def test_noise_level_is_checked(twins: Twins) -> None:
    pipeline = Pipeline(twins.ours, optimize=False)
    with pytest.raises(ValueError, match=r"noise_level must be within 0..350"):
        pipeline.start_upscale([SampleSpec("x")], RunSettings(steps=2, noise_level=351), low_res_images(1))
    ldm_sr = Pipeline(random_model(toy_sr_config()), optimize=False)  # the CompVis kind: no noise augmentation
    with pytest.raises(ValueError, match="noise_level applies to the SD x4 upscaler only"):
        ldm_sr.start_upscale([SampleSpec()], RunSettings(steps=2, noise_level=20), low_res_images(1))


def test_saved_upscaler_round_trips(twins: Twins, tmp_path: Path) -> None:
    """`save_model` writes our config (the low-resolution schedule included) beside the weights: the file loads."""
    model = load_model(twins.folder)
    back = load_model(save_model(model, tmp_path / "x4.safetensors"))
    assert back.config == model.config and back.config.lowres_noise is not None
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))


X4_BETAS = torch.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=torch.float64).float() ** 2  # x4-upscaling.yaml's


def write_x4_file(model: LatentDiffusion, path: Path, **changed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our upscaler as Stability's code saves x4-upscaler-ema: the original layout (OpenCLIP text with its unused
    last block), the schedule's buffers and `low_scale_model.*`'s (the low-resolution noise schedule); no config.
    `changed`: keys to replace (or, given as empty tensors, to leave out)."""
    prefix = PREFIXES["conditioner"]
    state = model.original_state_dict()
    sd = {k: v.contiguous() for k, v in state.items() if not k.startswith(prefix)}
    assert model.config.conditioner is not None
    sd |= openclip_text_keys({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                             model.config.conditioner.clip)
    alphas_cumprod = torch.cumprod(1 - X4_BETAS, dim=0)
    for owner in ("", "low_scale_model."):
        sd[owner + "betas"], sd[owner + "alphas_cumprod"] = X4_BETAS.clone(), alphas_cumprod.clone()
        sd[owner + "sqrt_one_minus_alphas_cumprod"] = (1 - alphas_cumprod).sqrt()
    for key, tensor in changed.items():
        if tensor.numel():
            sd[key] = tensor
        else:
            del sd[key]
    save_file(sd, str(path))
    return sd


def test_original_single_file_matches_diffusers(twins: Twins, tmp_path: Path) -> None:
    """x4-upscaler-ema's layout: the family, the low-resolution schedule from `low_scale_model.betas`, the YAML's
    values (scale 0.08333, v, 8 heads, disable_self_attentions checked by shape) and a 3-step DDIM upscale with CFG
    as diffusers' (from the folder the file was made of)."""
    path = tmp_path / "x4-upscaler-ema.safetensors"
    write_x4_file(load_model(twins.folder), path)
    ours = load_model(path, tokenizer_dir=twins.folder / "tokenizer")
    config, folder = ours.config, twins.ours.config
    assert (config.family, config.concat_input, config.scale_factor, config.max_noise_level) == (
        "sd_v2_upscaler", "lowres", SCALE, 350)
    assert config.schedule == folder.schedule and config.lowres_noise is not None and folder.lowres_noise is not None
    betas = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")  # all that noising reads
    assert [getattr(config.lowres_noise, f) for f in betas] == [getattr(folder.lowres_noise, f) for f in betas]
    assert config.unet.disable_self_attentions == (True, True, True, False) and config.unet.heads(64) == (8, 8)
    assert config.unet == folder.unet
    prompts, seeds, images = ["a red circle", "a blue square"], [3, 11], low_res_images(2)
    with torch_threads(1):
        expected = twins.pipe(prompts, image=images, num_inference_steps=3, guidance_scale=7.5, noise_level=50,
                                  generator=[torch.Generator().manual_seed(s) for s in seeds],
                                  output_type="latent").images
        pipeline = Pipeline(ours, optimize=False)
        specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
        started = pipeline.start_upscale(specs, RunSettings(sampler="ddim", steps=3, noise_level=50), images)
        assert_close_at_unit_scale(pipeline.run_samples(started.samples), expected)


def test_single_file_upscaler_mismatches_are_refused_by_name(twins: Twins, tmp_path: Path) -> None:
    model = load_model(twins.folder)
    cases = {
        "no low-resolution schedule": ({"low_scale_model.betas": torch.empty(0)},
                                       "without low_scale_model.betas, the schedule that noises"),
        "self-attention at level 1": (
            {f"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.{w}.weight": torch.zeros(64, 64)
             for w in ("to_k", "to_v")}, "level 1's attn1 takes 64-wide keys: self-attention on, where "
                                         "x4-upscaling.yaml has disable_self_attentions True"),
    }
    for changed, message in cases.values():
        write_x4_file(model, tmp_path / "x4.safetensors", **changed)
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "x4.safetensors", tokenizer_dir=twins.folder / "tokenizer")
    sd = {k: torch.zeros(1) for k in ("low_scale_model.betas",)} | load_model(twins.folder).original_state_dict()
    with pytest.raises(CheckpointError, match=r"low-resolution noise schedule keys \(low_scale_model.betas\) in a "
                                              "file that is not the SD x4 upscaler"):
        infer_model_config(sd, "x4", prediction_type="v_prediction")


def test_ldm_generate_upscales_with_a_prompt_and_noise_level(twins: Twins, tmp_path: Path) -> None:
    """`ldm generate --task upscale --image lr.png PROMPT --noise-level 50`: the PNG diffusers decodes (within one
    level of rounding on a few pixels: the VAE decodes latents of a random UNet, |x| ~ 30)."""
    from service.cli import main

    image = low_res_images(1)[0]
    image.save(tmp_path / "lr.png")
    out = tmp_path / "x4.png"
    with torch_threads(1):
        expected = twins.pipe("a red circle", image=image, num_inference_steps=10, guidance_scale=7.5, noise_level=50,
                              generator=[torch.Generator().manual_seed(3)], output_type="np").images[0]
        assert main(["generate", "a red circle", "--task", "upscale", "--image", str(tmp_path / "lr.png"),
                     "--noise-level", "50", "--model", str(twins.folder), "--sampler", "ddim", "--steps", "10",
                     "--seed", "3", "--prompt-syntax", "plain", "--device", "cpu", "-o", str(out)]) == 0
    with Image.open(out) as png:
        ours = np.asarray(png.convert("RGB")).astype(np.int16)
    theirs = (expected * 255).round().astype(np.int16)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
    with pytest.raises(SystemExit, match="--noise-level is for --task upscale"):
        main(["generate", "x", "--noise-level", "5", "--model", str(twins.folder)])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_size_upscaler_folder_matches_diffusers(tmp_path: Path) -> None:
    """The real x4 upscaler shapes (UNet 256..1024 channels, OpenCLIP ViT-H text, the 3-level VAE), 16 px in."""
    twins = Twins(tmp_path, full=True)
    assert twins.ours.config.unet.disable_self_attentions == (True, True, True, False)
    image, specs = low_res_images(1), [SampleSpec("a red circle", seed=5, guidance_scale=7.5)]
    expected = twins.pipe(["a red circle"], image=image, num_inference_steps=10, guidance_scale=7.5,
                          generator=[torch.Generator().manual_seed(5)], output_type="latent").images
    pipeline = Pipeline(twins.ours)
    ours = pipeline.run_samples(pipeline.start_upscale(specs, RunSettings(sampler="ddim", steps=10), image).samples)
    assert_close_at_unit_scale(ours, expected)
