"""The latent factor study (bench/latent_factor_bench.py): each first stage downsamples by its factor, a study
continues only with the settings it was started with (factors may join it), and its figures come out as a table
and a plot."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import latent_factor_bench as study
from models.autoencoder import Autoencoder, DiagonalGaussian
from models.train.autoencoder_trainer import AutoencoderTrainConfig
from models.train.common import load_train_config
from models.unet import UNet


def args_for(tmp_path: Path, **changes: object) -> argparse.Namespace:
    values = {"factors": "1,4,32", "width": 16, "batch_size": 4, "lr": 5e-4, "pool": 64, "ae_steps": 2,
              "ae_decay_from": None, "n": 4, "steps": 2, "work": tmp_path, "device": "cpu"} | changes
    return argparse.Namespace(**values)


@pytest.mark.parametrize("f", sorted(study.FIRST_STAGES))
def test_each_first_stage_downsamples_by_its_factor_and_its_unet_takes_the_latent(f: int) -> None:
    base = load_train_config(AutoencoderTrainConfig, study.AE_CONFIG)
    mult, channels = study.FIRST_STAGES[f]
    ae = Autoencoder(replace(base.autoencoder, ch=8, ch_mult=mult, z_channels=channels, embed_dim=channels))
    with torch.no_grad():
        posterior = ae.encode(torch.zeros(1, 3, 64, 64))
        assert isinstance(posterior, DiagonalGaussian)
        latent = posterior.mode()
        assert latent.shape == (1, channels, 64 // f, 64 // f)
        assert study.latent_shape(f) == f"{64 // f}x{64 // f}x{channels}"
        unet = UNet(study.ldm_config(f, "pixel", args_for(Path("."))).unet)
        out = unet(latent, torch.tensor([500]), context=torch.zeros(1, 1, unet.config.context_dim or 1))
    assert out.shape == latent.shape  # even a 2x2 latent goes down and up the UNet's levels


def test_a_study_continues_only_with_its_own_settings(tmp_path: Path) -> None:
    args = args_for(tmp_path)
    state = study.load_state(args)
    state["rates"]["4"] = {"samples_per_s": 100.0, "gflop_per_sample": 0.5, "params_m": 1.0}
    study.save_state(args, state)
    assert study.load_state(args)["rates"]["4"]["samples_per_s"] == 100.0
    with pytest.raises(SystemExit, match="width"):
        study.load_state(args_for(tmp_path, width=24))


def test_a_factor_joins_a_study_later(tmp_path: Path) -> None:
    args = args_for(tmp_path, factors="4")
    study.save_state(args, study.load_state(args))
    later = study.load_state(args_for(tmp_path, factors="8,2"))  # other factors, the same study
    assert later["setup"] == study.setup_of(args)
    with pytest.raises(SystemExit, match="ae_steps"):
        study.load_state(args_for(tmp_path, factors="16", ae_steps=3))


def test_the_report_has_a_row_per_factor_and_compute_and_a_plot(tmp_path: Path) -> None:
    args = argparse.Namespace(**(vars(args_for(tmp_path)) | {"out": tmp_path / "lf.json", "plot": tmp_path / "lf.png"}))
    state = study.load_state(args)
    for f, rate in ((1, 5.0), (4, 120.0)):
        state["rates"][str(f)] = {"samples_per_s": rate, "gflop_per_sample": 8.0 / f**2, "params_m": 1.7}
        for seconds, fd in ((100.0, 9000.0 / f), (200.0, 5000.0 / f)):
            state["evals"][f"{f}@{seconds:g}"] = {"f": f, "compute_s": seconds, "steps": int(seconds * rate / 64),
                                                  "accuracy": 0.1 * f, "fd": fd, "fd_reference": 900.0,
                                                  **({"sample_images_per_s": 0.5 * f} if seconds == 100 else {})}
    state["first_stages"]["4"] = {"psnr": 27.5, "train_s": 60.0, "latent": "16x16x3", "ceiling_accuracy": 0.32,
                                  "ceiling_fd": 2212.0}
    study.report(state, args)
    published = json.loads((tmp_path / "lf.json").read_text())
    assert published["setup"]["factors"] == "1,4"  # the setup records every factor the study has run
    table = published["table_markdown"]
    assert "| 4 | 16x16x3 | 27.5 dB | 32 %, 2212 | 120.0 |" in table
    assert "| 1 | 64x64x3 | pixels | 100 %, 0 (the renders) | 5.0 |" in table
    assert "Real-vs-real Fréchet distance at this N: 900" in table
    with Image.open(tmp_path / "lf.png") as image:
        assert image.width == 3 * 360 and image.format == "PNG"


def test_the_first_stage_ceiling_is_the_judge_on_its_reconstructions(tmp_path: Path) -> None:
    """Pixels pass through untouched and score as the real renders do; an untrained autoencoder's grey blur
    draws no class right."""
    base = load_train_config(AutoencoderTrainConfig, study.AE_CONFIG)
    args = args_for(tmp_path, n=6)
    perfect = study.first_stage_ceiling(Autoencoder(replace(base.autoencoder, kind="identity", ch_mult=(1,))), args)
    assert perfect["ceiling_accuracy"] == 1.0
    assert perfect["ceiling_fd"] is not None and abs(perfect["ceiling_fd"]) < 1e-3
    torch.manual_seed(0)
    untrained = Autoencoder(replace(base.autoencoder, ch=8, ch_mult=(1, 2, 2)))
    blurred = study.first_stage_ceiling(untrained, args)
    assert blurred["ceiling_accuracy"] == 0.0 and (blurred["ceiling_fd"] or 0.0) > 100.0


def test_the_training_rate_counts_a_factors_flops_and_samples(tmp_path: Path) -> None:
    """Deeper compression, fewer FLOPs per sample (the UNet is the same; its input shrinks with f)."""
    args = args_for(tmp_path)
    f4, f32 = study.measure_rate(4, args), study.measure_rate(32, args)
    assert f4["samples_per_s"] > 0 and f32["samples_per_s"] > 0
    assert f4["gflop_per_sample"] > 10 * f32["gflop_per_sample"] > 0
    assert f4["params_m"] == pytest.approx(f32["params_m"], rel=0.01)
