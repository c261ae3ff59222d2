"""The CompVis latent-diffusion zoo (compvis-zoo-contract.md): random-weight checkpoints built from each zoo
config's structure (tests/compvis_zoo.py) load with every key consumed, and their DDIM images (10 steps, eta 0,
x_T from a CPU generator seeded with the seed) match an independent implementation within the contract's
tolerance (mean |diff| <= 1/255, max <= 24/255)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.checkpoints import CheckpointError, load_model
from models.compvis.config_yaml import CompVisConfigError, model_config
from models.pipeline import Pipeline, RunSettings, SampleSpec
from tests.compvis_zoo import (
    CHURCHES_SCALE,
    CONFIGS,
    assert_close_images,
    cond_unet,
    ddim_scheduler,
    first_stage,
    original_alphas_cumprod,
    original_ddim,
    part,
    to_uint8,
    unet2d,
    write_checkpoint,
)

SEED, STEPS = 7, 10
DDIM = RunSettings(sampler="ddim", steps=STEPS, eta=0.0)
UNET, FIRST, COND = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."


def _x_T(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(SEED))


def _load(tmp_path: Path, name: str, **kwargs: object) -> tuple[object, dict[str, torch.Tensor]]:
    sd = write_checkpoint(tmp_path / name, name, **kwargs)  # type: ignore[arg-type]
    return load_model(tmp_path / name / "model.ckpt"), sd


# ------------------------------------------------------------------------------------------- config reading


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_reads(name: str) -> None:
    scale = CHURCHES_SCALE if name == "lsun_churches256" else None
    config = model_config(yaml.safe_load(CONFIGS[name]), name, scale)
    assert config.unet.legacy and config.schedule.beta_schedule == "scaled_linear"


def test_heads_follow_the_legacy_rule() -> None:
    """cin256-v2: num_heads 1 -> one full-width head everywhere; text2img: num_head_channels 32 -> ch / 32."""
    cin = model_config(yaml.safe_load(CONFIGS["cin256-v2"]), "cin").unet
    assert [cin.heads(c) for c in (64, 96, 160)] == [(1, 64), (1, 96), (1, 160)]
    t2i = model_config(yaml.safe_load(CONFIGS["text2img256"]), "t2i").unet
    assert [t2i.heads(c) for c in (64, 96, 160)] == [(2, 32), (3, 32), (5, 32)]


def test_unknown_target_and_parameter_are_named() -> None:
    data = yaml.safe_load(CONFIGS["celeba256"])
    data["model"]["params"]["unet_config"]["target"] = "my.own.UNet"
    with pytest.raises(CompVisConfigError, match="my.own.UNet"):
        model_config(data, "x")
    data = yaml.safe_load(CONFIGS["celeba256"])
    data["model"]["params"]["unet_config"]["params"]["use_new_attention_order"] = True
    with pytest.raises(CompVisConfigError, match="use_new_attention_order"):
        model_config(data, "x")
    data = yaml.safe_load(CONFIGS["celeba256"])
    data["model"]["params"]["mystery"] = 3
    with pytest.raises(CompVisConfigError, match="mystery"):
        model_config(data, "x")


def test_scale_by_std_needs_the_buffer() -> None:
    with pytest.raises(CompVisConfigError, match="scale_factor"):
        model_config(yaml.safe_load(CONFIGS["lsun_churches256"]), "churches")


# ------------------------------------------------------------------------------------------- loading


def test_every_key_consumed_and_extras_tolerated(tmp_path: Path) -> None:
    model, sd = _load(tmp_path, "celeba256", ema=True, ddim_buffers=True)
    loaded = model.original_state_dict()  # type: ignore[attr-defined]
    weights = {k for k in sd if k.startswith((UNET, FIRST, COND))}
    assert set(loaded) == weights
    assert all(torch.equal(loaded[k], sd[k]) for k in weights)


def test_ema_weights_only_when_asked(tmp_path: Path) -> None:
    sd = write_checkpoint(tmp_path / "m", "celeba256", ema=True)
    ema = load_model(tmp_path / "m" / "model.ckpt", use_ema=True).unet.state_dict()
    key = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(ema[key], sd["model_ema.diffusion_model" + key.replace(".", "")])
    assert not torch.equal(ema[key], sd[UNET + key])
    write_checkpoint(tmp_path / "n", "cin256-v2")
    with pytest.raises(CheckpointError, match="EMA"):
        load_model(tmp_path / "n" / "model.ckpt", use_ema=True)


def test_unexpected_and_missing_keys_are_named(tmp_path: Path) -> None:
    sd = write_checkpoint(tmp_path / "m", "celeba256")
    sd["first_stage_model.extra.weight"] = torch.zeros(1)
    del sd[UNET + "out.2.bias"]
    torch.save({"state_dict": sd}, tmp_path / "m" / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"out\.2\.bias.*extra\.weight|extra\.weight.*out\.2\.bias"):
        load_model(tmp_path / "m" / "model.ckpt")


def test_explicit_config_path(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m", "cin256-v2")
    (tmp_path / "m" / "model.ckpt").rename(tmp_path / "weights.ckpt")
    (tmp_path / "m" / "config.yaml").rename(tmp_path / "cin.yaml")
    model = load_model(tmp_path / "weights.ckpt", config=tmp_path / "cin.yaml")
    assert model.config.conditioner is not None and model.config.conditioner.n_classes == 1000


# ------------------------------------------------------------------------------------------- images


def test_celeba256_matches_ldm_pipeline(tmp_path: Path) -> None:
    """Unconditional, VQ-f4, legacy attention with ch/32 heads: diffusers' LDMPipeline (UNet2DModel + VQModel)."""
    import diffusers

    model, sd = _load(tmp_path, "celeba256")
    config = model.config  # type: ignore[attr-defined]
    ours = Pipeline(model).unconditional([SampleSpec(seed=SEED)], dataclasses.replace(DDIM, width=32, height=32))  # type: ignore[arg-type]
    pipe = diffusers.LDMPipeline(vqvae=first_stage(part(sd, FIRST), config.autoencoder, 1.0),
                                 unet=unet2d(part(sd, UNET), config.unet), scheduler=ddim_scheduler(0.0015, 0.0195))
    pipe.unet.config.sample_size = 8
    theirs = pipe(batch_size=1, generator=torch.Generator("cpu").manual_seed(SEED), eta=0.0,
                  num_inference_steps=STEPS, output_type="np").images[0]
    assert_close_images(np.asarray(ours.images[0]), (theirs * 255).round().astype(np.uint8))


def test_lsun_churches256_matches_ldm_pipeline(tmp_path: Path) -> None:
    """Unconditional, KL-f8 with the checkpoint's scale_factor, scale-shift norm, ResBlock resampling, 8 heads
    at every level: LDMPipeline with UNet2DModel + AutoencoderKL."""
    import diffusers

    model, sd = _load(tmp_path, "lsun_churches256")
    config = model.config  # type: ignore[attr-defined]
    assert config.scale_factor == pytest.approx(CHURCHES_SCALE)
    ours = Pipeline(model).unconditional([SampleSpec(seed=SEED)], dataclasses.replace(DDIM, width=128, height=128))  # type: ignore[arg-type]
    pipe = diffusers.LDMPipeline(vqvae=first_stage(part(sd, FIRST), config.autoencoder, CHURCHES_SCALE),
                                 unet=unet2d(part(sd, UNET), config.unet), scheduler=ddim_scheduler(0.0015, 0.0155))
    pipe.unet.config.sample_size = 16
    theirs = pipe(batch_size=1, generator=torch.Generator("cpu").manual_seed(SEED), eta=0.0,
                  num_inference_steps=STEPS, output_type="np").images[0]
    assert_close_images(np.asarray(ours.images[0]), (theirs * 255).round().astype(np.uint8))


def _cin_reference(sd: dict[str, torch.Tensor], config: object, label: int, scale: float) -> np.ndarray:
    """No pipeline exists for cin256-v2; the original's arithmetic (notebook + ddim.py), step by step, with
    diffusers' UNet2DConditionModel (one head per level, converted by diffusers) and VQModel:
    c = embedding[label][:, None], uc = embedding[1000][:, None]; e = e_u + s (e_c - e_u) from one doubled
    batch; DDIM eta 0 (tests/compvis_zoo.original_ddim); z / scale_factor (1.0), quantise, decode."""
    unet = cond_unet(part(sd, UNET), config.unet)  # type: ignore[attr-defined]
    vq = first_stage(part(sd, FIRST), config.autoencoder, 1.0)  # type: ignore[attr-defined]
    table = sd[COND + "embedding.weight"]
    c, uc = table[[label]][:, None], table[[1000]][:, None]

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e_u, e_c = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
        return e_u + scale * (e_c - e_u)

    with torch.no_grad():
        z = original_ddim(eps, _x_T((1, 3, 8, 8)), original_alphas_cumprod(0.0015, 0.0195), STEPS)
        return to_uint8(vq.decode(z / 1.0).sample)


def test_cin256_v2_matches_the_original_arithmetic(tmp_path: Path) -> None:
    model, sd = _load(tmp_path, "cin256-v2")
    config = model.config  # type: ignore[attr-defined]
    settings = dataclasses.replace(DDIM, width=32, height=32)
    ours = Pipeline(model).class2img([SampleSpec(seed=SEED, guidance_scale=3.0)], settings, [207])  # type: ignore[arg-type]
    assert_close_images(np.asarray(ours.images[0]), _cin_reference(sd, config, 207, 3.0))


def test_cin256_v2_heads_are_read_not_assumed(tmp_path: Path) -> None:
    """The same weights with 8 heads (the SD convention a shape-based loader assumes) give another image."""
    model, _ = _load(tmp_path, "cin256-v2")
    text = CONFIGS["cin256-v2"].replace("num_heads: 1", "num_heads: 8")
    write_checkpoint(tmp_path / "eight", "cin256-v2", yaml_text=text)
    eight = load_model(tmp_path / "eight" / "model.ckpt")
    assert eight.unet.config.heads(64) == (8, 8) and model.unet.config.heads(64) == (1, 64)  # type: ignore[attr-defined]
    settings = dataclasses.replace(DDIM, width=32, height=32)
    spec = [SampleSpec(seed=SEED, guidance_scale=3.0)]
    one = np.asarray(Pipeline(model).class2img(spec, settings, [207]).images[0], dtype=np.float64)  # type: ignore[arg-type]
    many = np.asarray(Pipeline(eight).class2img(spec, settings, [207]).images[0], dtype=np.float64)
    assert np.abs(one - many).mean() > 2.0
