"""SD 2.x loaded by us and by diffusers: an original-layout single file and a diffusers folder.

The weights are random with SD 2's structure at reduced width: OpenCLIP's text transformer (exact GELU,
output of the penultimate block, OpenCLIP key names with fused q/k/v in the file, padding with "!"),
a UNet with 64-channel heads (1, 2, 4, 4 heads per level: a loader that used the first level's count
everywhere fails), linear projections in the transformers, both prediction types. The file is written
with the inverse of our OpenCLIP mapping; diffusers reads it with its own single-file converters, and
its pipeline's `save_pretrained` writes the folder. Text encoder, UNet and 10-step DDIM and DPM-Solver++
generations with classifier-free guidance must agree to 1e-4.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils
from safetensors.torch import save_file

from models.autoencoder import AutoencoderConfig
from models.checkpoints import CheckpointError, load_model
from models.conditioners import ConditionerConfig
from models.config import ModelConfig
from models.diffusers_layout import (
    UnsupportedConfigError,
    schedule_config_from_diffusers,
    unet_config_from_diffusers,
)
from models.diffusion import PredictionType, ScheduleConfig
from models.ldm import PREFIXES, LatentDiffusion
from models.openclip_layout import clip_to_openclip, openclip_to_clip
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.text.clip import CLIPTextConfig
from models.tokenizers import CLIPTokenizer
from models.unet import UNetConfig
from tests.helpers import (
    TOL,
    assert_close_at_unit_scale,
    diffusers_unet,
    diffusers_vae,
    openclip_text_keys,
    randomize,
    torch_threads,
    write_clip_tokenizer,
)

TEXT_LAYERS = 2  # run; the file holds one more, unused (the penultimate layer's output is the context)


def sd2_scheduler(prediction: PredictionType, spacing: str = "leading") -> dict[str, Any]:
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": spacing,
            "prediction_type": prediction}


def sd2_config(vocab_size: int, prediction: PredictionType, *, full: bool = False, in_channels: int = 4) -> ModelConfig:
    """SD 2 structure: UNet 1/5 width (64-channel heads, linear projections), VAE 1/4, 2 x 128 OpenCLIP;
    `full`: the real sizes (UNet 865.91 M, OpenCLIP ViT-H text, 23 of its 24 blocks run)."""
    clip = CLIPTextConfig(vocab_size=vocab_size, hidden_size=1024 if full else 128,
                          intermediate_size=4096 if full else 256, num_layers=23 if full else TEXT_LAYERS,
                          num_heads=16 if full else 2, hidden_act="gelu", pad_token="!")
    inpainting = in_channels == 9
    return ModelConfig(
        name="sd2-test", family="sd_v2_inpainting" if inpainting else "sd_v2",
        conditioning="hybrid" if inpainting else "crossattn", concat_input="inpaint" if inpainting else "none",
        unet=UNetConfig(in_channels=in_channels, model_channels=320 if full else 64, num_heads=-1,
                        num_head_channels=64, use_linear_in_transformer=True, context_dim=clip.hidden_size),
        autoencoder=AutoencoderConfig(ch=128 if full else 32), conditioner=ConditionerConfig(kind="clip", clip=clip),
        schedule=ScheduleConfig(prediction_type=prediction),
    )


def write_sd2_file(config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """A random SD 2 file as the original code saves one: OpenCLIP keys, an unused last block, the
    contrastive head, betas; no config."""
    with torch.device("meta"):
        model = LatentDiffusion(config)
    randomize(model, seed=2)
    prefix = PREFIXES["conditioner"]
    sd = {k: v.contiguous() for k, v in model.original_state_dict().items() if not k.startswith(prefix)}
    text = {k[len(prefix):]: v for k, v in model.original_state_dict().items() if k.startswith(prefix)}
    assert config.conditioner is not None
    sd.update(openclip_text_keys(text, config.conditioner.clip))
    sd["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).float() ** 2
    save_file(sd, str(path))
    return sd


def diffusers_text_encoder(checkpoint: dict[str, torch.Tensor], clip: CLIPTextConfig) -> Any:
    """transformers' CLIPTextModel from the file by diffusers' OpenCLIP converter (which assumes ViT-H's 24
    blocks when it drops the unused last one; the reduced file has TEXT_LAYERS + 1, so its last is dropped here)."""
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads, hidden_act="gelu",
        max_position_embeddings=clip.max_positions,
    )).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(text, checkpoint)
    strip = "" if "text_model.final_layer_norm.weight" in text.state_dict() else "text_model."
    weights = {k.removeprefix(strip): v for k, v in converted.items()
               if f"encoder.layers.{clip.num_layers}." not in k and not k.startswith("text_projection")}
    text.load_state_dict(weights, strict=True)
    return text


class SD2Twins:
    """Our model from an SD 2 file (and from the folder diffusers saved), diffusers' pipeline parts."""

    def __init__(self, tmp: Path, prediction: PredictionType, *, full: bool = False) -> None:
        self.tokenizer_dir = write_clip_tokenizer(tmp / "tokenizer")  # SD 1 style: pads with end-of-text
        vocab = CLIPTokenizer.from_dir(self.tokenizer_dir).vocab_size
        self.config = sd2_config(vocab, prediction, full=full)
        self.path = tmp / "sd2.safetensors"
        sd = write_sd2_file(self.config, self.path)
        self.ours = load_model(self.path, tokenizer_dir=self.tokenizer_dir, prediction_type=prediction)
        self.unet = diffusers_unet({k: v for k, v in sd.items() if k.startswith("model.")}, self.config.unet)
        self.vae = diffusers_vae({k: v for k, v in sd.items() if k.startswith("first_stage_model.")},
                                 self.config.autoencoder)
        assert self.config.conditioner is not None
        self.text = diffusers_text_encoder(sd, self.config.conditioner.clip)
        self.hf_tokenizer = transformers.CLIPTokenizer(  # SD 2's tokenizer folders pad with "!"
            str(self.tokenizer_dir / "vocab.json"), str(self.tokenizer_dir / "merges.txt"), pad_token="!",
            model_max_length=77)
        self.prediction = prediction
        self.tmp = tmp
        self._folders: dict[str, LatentDiffusion] = {}

    def pipeline(self, scheduler: Any) -> Any:
        return diffusers.StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text, tokenizer=self.hf_tokenizer, unet=self.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def folder_path(self, spacing: str) -> Path:
        """The diffusers folder diffusers writes of the same weights (its DDIM scheduler with `spacing`)."""
        folder = self.tmp / f"sd2-folder-{spacing}"
        if not folder.is_dir():
            scheduler = diffusers.DDIMScheduler.from_config(sd2_scheduler(self.prediction, spacing))
            self.pipeline(scheduler).save_pretrained(str(folder), safe_serialization=True)
        return folder

    def folder(self, spacing: str) -> LatentDiffusion:
        """Our model loaded from `folder_path(spacing)`."""
        if spacing not in self._folders:
            self._folders[spacing] = load_model(self.folder_path(spacing))
        return self._folders[spacing]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def twins(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SD2Twins:
    with torch_threads(1):
        return SD2Twins(tmp_path_factory.mktemp(f"sd2-{request.param}"), request.param)


def test_file_config_is_sd2(twins: SD2Twins) -> None:
    config = twins.ours.config
    assert config.family == "sd_v2"
    assert config.schedule.prediction_type == twins.prediction
    assert config.default_size == (768 if twins.prediction == "v_prediction" else 512)
    assert config.unet.heads(64) == (1, 64) and config.unet.heads(256) == (4, 64)
    assert config.unet.use_linear_in_transformer
    assert config.conditioner is not None and config.conditioner.clip.hidden_act == "gelu"
    assert config.conditioner.clip.num_layers == TEXT_LAYERS


@pytest.mark.parametrize("source", ["file", "folder"])
def test_components_match_diffusers(twins: SD2Twins, source: str) -> None:
    with torch_threads(1):
        ours = twins.ours if source == "file" else twins.folder("leading")
        assert ours.config.family == "sd_v2" and ours.config.schedule.prediction_type == twins.prediction
        prompts = ["a red circle", ""]
        ids = twins.hf_tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([981.0, 1.0])
        with torch.inference_mode():
            assert ours.conditioner is not None
            ctx_ours = ours.conditioner.encode(prompts).context
            ctx_theirs = twins.text(ids).last_hidden_state
            assert (ctx_ours - ctx_theirs).abs().max() < TOL
            eps_theirs = twins.unet(x, t, encoder_hidden_states=ctx_theirs).sample
            assert eps_theirs.abs().max() > 0.1
            assert (ours.unet(x, t, ctx_ours) - eps_theirs).abs().max() < TOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("source", ["file", "folder"])
def test_ten_step_generation_matches_diffusers(twins: SD2Twins, source: str, sampler: str) -> None:
    """The folder of the v-prediction model asks for "trailing" timesteps; the file has SD 2's "leading"."""
    spacing = "trailing" if source == "folder" and twins.prediction == "v_prediction" else "leading"
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    pipe = twins.pipeline(schedulers[sampler].from_config(sd2_scheduler(twins.prediction, spacing)))
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    with torch_threads(1):
        ours = twins.ours if source == "file" else twins.folder(spacing)
        assert ours.config.schedule.timestep_spacing == spacing
        expected = pipe(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
        specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
        settings = RunSettings(sampler=sampler, steps=10, width=64, height=64)  # type: ignore[arg-type]
        latents, _ = Pipeline(ours).sample_latents(specs, settings, (64, 64))
    assert_close_at_unit_scale(latents, expected)


def test_openclip_mapping_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    clip = {f"transformer.text_model.encoder.layers.0.{k}": torch.randn(4, generator=g)
            for k in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "mlp.fc1.bias",
                      "layer_norm2.weight")}
    clip["transformer.text_model.embeddings.position_embedding.weight"] = torch.randn(3, 4, generator=g)
    openclip = clip_to_openclip(clip)
    assert openclip["model.transformer.resblocks.0.attn.in_proj_bias"].shape == (12,)
    extra = {"model.transformer.resblocks.1.ln_1.weight": torch.ones(4), "model.logit_scale": torch.ones(())}
    back = openclip_to_clip({**openclip, **extra})
    assert back.keys() == clip.keys() and all(torch.equal(back[k], clip[k]) for k in clip)
    with pytest.raises(ValueError, match="no known meaning.*model.visual.proj"):
        openclip_to_clip({**openclip, **extra, "model.visual.proj": torch.ones(1)})


def test_other_pipelines_are_refused_by_name(twins: SD2Twins, tmp_path: Path) -> None:
    folder = tmp_path / "xl"
    shutil.copytree(twins.folder_path("leading"), folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(CheckpointError, match="a KandinskyPipeline folder; supported are StableDiffusion"):
        load_model(folder)


def test_prediction_type_is_never_guessed(twins: SD2Twins) -> None:
    """An SD 2 file says nothing about it: refused without one; a folder's scheduler config says it."""
    with pytest.raises(CheckpointError, match="do not record whether the UNet predicts epsilon"):
        load_model(twins.path, tokenizer_dir=twins.tokenizer_dir)
    other = "epsilon" if twins.prediction == "v_prediction" else "v_prediction"
    with pytest.raises(CheckpointError, match=f"prediction type '{other}' asked, but the model's config says"):
        load_model(twins.folder_path("leading"), prediction_type=other)  # type: ignore[arg-type]


SD2_UNET = {"sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 1024,
            "use_linear_projection": True, "upcast_attention": True, "act_fn": "silu"}


def test_diffusers_unet_fields_read_or_refused_by_name() -> None:
    unet = unet_config_from_diffusers(SD2_UNET)
    assert (unet.num_heads, unet.num_head_channels) == (-1, 64) and unet.use_linear_in_transformer
    assert [unet.heads(c)[0] for c in (320, 640, 1280)] == [5, 10, 20]
    assert unet_config_from_diffusers({**SD2_UNET, "attention_head_dim": 8}).heads(640) == (8, 80)
    deeper = unet_config_from_diffusers({**SD2_UNET, "transformer_layers_per_block": [1, 2, 10, 10]})
    assert deeper.level_depths == (1, 2, 10, 10) and deeper.depth(3) == 10
    refused = [({"attention_head_dim": [5, 10, 10, 20]}, "neither one count for every level nor one head width"),
               ({"addition_embed_type": "image"}, "addition_embed_type='image' is not supported"),
               ({"addition_embed_type": "text_time"}, "'text_time' but no addition_time_embed_dim"),
               ({"addition_time_embed_dim": 256}, "addition_time_embed_dim=256 is not supported"),
               ({"act_fn": "gelu"}, "act_fn='gelu'"),
               ({"only_cross_attention": [True] * 3}, "only_cross_attention has 3 entries for 4 levels"),
               ({"transformer_layers_per_block": [[1, 1], 2, 10, 10]}, "transformer_layers_per_block"),
               ({"some_future_field": 3}, r"fields this loader does not know: \['some_future_field'\]")]
    for change, message in refused:
        with pytest.raises(UnsupportedConfigError, match=message):
            unet_config_from_diffusers({**SD2_UNET, **change})


def test_scheduler_fields_read_or_refused_by_name() -> None:
    schedule = schedule_config_from_diffusers(sd2_scheduler("v_prediction", "trailing"))
    assert (schedule.prediction_type, schedule.timestep_spacing) == ("v_prediction", "trailing")
    for change, message in (({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
                            ({"trained_betas": [0.1] * 1000}, "trained_betas"),
                            ({"prediction_type": "sample"}, "prediction_type='sample'"),
                            ({"thresholding": True}, "thresholding=True")):
        with pytest.raises(UnsupportedConfigError, match=message):
            schedule_config_from_diffusers({**sd2_scheduler("epsilon"), **change})


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_full_size_sd2_file_matches_diffusers(tmp_path: Path, prediction: PredictionType) -> None:
    """The real SD 2 shapes (UNet 865.91 M, VAE 83.65 M, OpenCLIP ViT-H text 24 x 1024) in one file, 64 px."""
    twins = SD2Twins(tmp_path, prediction, full=True)
    assert sum(p.numel() for p in twins.ours.unet.parameters()) == 865_910_724
    pipe = twins.pipeline(diffusers.DPMSolverMultistepScheduler.from_config(sd2_scheduler(prediction)))
    expected = pipe(["a red circle"], num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                    generator=[torch.Generator().manual_seed(5)], output_type="latent").images
    settings = RunSettings(sampler="dpmpp_2m", steps=10, width=64, height=64)
    ours, _ = Pipeline(twins.ours).sample_latents([SampleSpec("a red circle", seed=5)], settings, (64, 64))
    assert_close_at_unit_scale(ours, expected)


def test_sd2_inpainting_file_matches_diffusers(tmp_path: Path) -> None:
    """The 9-channel SD 2 inpainting UNet (latent + mask + masked-image latent) from an original file."""
    tokenizer_dir = write_clip_tokenizer(tmp_path / "tokenizer")
    config = sd2_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size, "epsilon", in_channels=9)
    sd = write_sd2_file(config, tmp_path / "sd2-inpainting.safetensors")
    with torch_threads(1):
        ours = load_model(tmp_path / "sd2-inpainting.safetensors", tokenizer_dir=tokenizer_dir,
                          prediction_type="epsilon")
        assert (ours.config.family, ours.config.concat_input) == ("sd_v2_inpainting", "inpaint")
        theirs = diffusers_unet({k: v for k, v in sd.items() if k.startswith("model.")}, config.unet)
        g = torch.Generator().manual_seed(1)
        x, t, ctx = torch.randn(1, 9, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 128, generator=g)
        with torch.inference_mode():
            assert (ours.unet(x, t, ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max() < TOL


def zero_snr_folder(twins: SD2Twins, tmp_path: Path) -> Path:
    """The twins' trailing-spacing folder with a zero-terminal-SNR scheduler config."""
    folder = tmp_path / "zero-snr"
    shutil.copytree(twins.folder_path("trailing"), folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rescale_betas_zero_snr": True}))
    return folder


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_zero_terminal_snr_matches_diffusers(twins: SD2Twins, tmp_path: Path, sampler: str) -> None:
    """`rescale_betas_zero_snr` with "trailing" spacing: the first step is at alpha-bar exactly 0 (DDIM; 2^-24 for
    DPM-Solver, as diffusers), where x0 = -v and epsilon = x_T; an epsilon model is refused by name."""
    folder = zero_snr_folder(twins, tmp_path)
    if twins.prediction == "epsilon":
        with pytest.raises(CheckpointError, match="rescale_betas_zero_snr=True with prediction_type='epsilon'"):
            load_model(folder)
        return
    ours = load_model(folder)
    assert ours.config.schedule.rescale_betas_zero_snr and float(ours.schedule.alphas_cumprod[-1]) == 0.0
    schedulers = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    pipe = twins.pipeline(schedulers[sampler].from_config(
        {**sd2_scheduler("v_prediction", "trailing"), "rescale_betas_zero_snr": True}))
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    with torch_threads(1):
        expected = pipe(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
        specs = [SampleSpec(p, seed=s, guidance_scale=7.5) for p, s in zip(prompts, seeds, strict=True)]
        settings = RunSettings(sampler=sampler, steps=10, width=64, height=64)  # type: ignore[arg-type]
        latents, _ = Pipeline(ours).sample_latents(specs, settings, (64, 64))
    assert torch.isfinite(latents).all()
    assert_close_at_unit_scale(latents, expected)
    with pytest.raises(ValueError, match="sampler 'plms' cannot sample a zero-terminal-SNR schedule"):
        Pipeline(ours).sample_latents(specs, RunSettings(sampler="plms", steps=10, width=64, height=64), (64, 64))
