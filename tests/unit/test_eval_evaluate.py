"""`evaluate` end to end: the plumbing with a random-weight model, the figures with a perfect generator,
and the `ldm eval` subcommand."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.eval.cli import add_eval_parser, parse_samplers, run_eval
from models.eval.evaluate import (
    EvalReport,
    compare_samplers,
    evaluate,
    format_table,
    reference_features,
    reference_images,
    write_report,
)
from models.eval.features import extract_features, frechet_distance, load_feature_net
from models.eval.prompts import random_prompts
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.resolve import resolve_model


@pytest.fixture(scope="module")
def random_report() -> EvalReport:
    model = resolve_model("random:tiny-sd", tokenizer=None, device=torch.device("cpu"), dtype=torch.float32)
    return evaluate(Pipeline(model), random_prompts(4, seed=0), steps=2, batch_size=3, recon_images=4,
                    progress=False)


def test_random_model_report_has_every_figure(random_report: EvalReport, tmp_path: Path) -> None:
    r = random_report
    assert (r.n, r.sampler, r.steps, len(r.results), len(r.images)) == (4, "dpmpp_2m", 2, 4, 4)
    assert [res.seed for res in r.results] == [0, 1, 2, 3]
    assert 0.0 <= r.accuracy <= 1.0 and r.fd is not None and r.fd_reference is not None
    assert r.recon_psnr is not None and 0.0 < r.recon_psnr < 60.0
    n_pair = sum(res.pair for res in r.results)
    assert (r.pair_accuracy is None) == (n_pair == 0) and (r.single_accuracy is None) == (n_pair == 4)
    assert set(r.attribute_accuracy) <= {"colour", "shape", "size", "position", "background", "count"}
    written = write_report(r, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["n"] == 4 and len(data["results"]) == 4 and "images" not in data
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * 68, 68) and len(written) == 2


def test_real_vs_real_is_closer_than_real_vs_noise(random_report: EvalReport) -> None:
    """The random model's images are noise: FD to the real renders exceeds the real-vs-real floor."""
    assert random_report.fd_reference is not None and random_report.fd is not None
    assert random_report.fd_reference < random_report.fd
    prompts = random_prompts(4, seed=0)
    net = load_feature_net()
    noise = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    real = reference_features(prompts, net)
    assert frechet_distance(reference_features(prompts, net, seed=99), real) < frechet_distance(
        extract_features(net, noise), real)


def perfect(specs: Sequence[SampleSpec], settings: RunSettings) -> list[np.ndarray]:
    """A generator that draws exactly what it is asked (a real render of each prompt)."""
    return list(reference_images([s.prompt for s in specs]))


def test_a_perfect_generator_scores_full_marks() -> None:
    prompts = random_prompts(12, seed=3)
    reports = compare_samplers(perfect, prompts, ["ddim", "euler_a"], steps=5, batch_size=12, progress=False)
    assert [r.sampler for r in reports] == ["ddim", "euler_a"] and all(r.steps == 5 for r in reports)
    for r in reports:
        # one batch holds every prompt, so `perfect` draws exactly the reference renders: FD 0 (up to the
        # eps that 12 samples in 128 dimensions, a singular covariance, put on the diagonals)
        assert r.accuracy == 1.0 and all(v == 1.0 for v in r.attribute_accuracy.values())
        assert r.fd == pytest.approx(0.0, abs=1e-2) and r.recon_psnr is None
    table = format_table(reports)
    assert len(table.splitlines()) == 3 and "100.0" in table


def test_bad_input_is_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="outside the captioned-shapes grammar"):
        evaluate(perfect, ["a photo of a cat"], progress=False)
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate(perfect, [], progress=False)
    with pytest.raises(ValueError, match="returned 0 images"):
        evaluate(lambda specs, settings: [], ["a red circle"], progress=False)


def test_eval_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ldm")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--model", "random:tiny-sd", "--n", "2", "--steps", "1", "--sampler",
                              "ddim,dpmpp_2m", "--recon", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert args.func(args) == 0 and args.func is run_eval
    out = capsys.readouterr().out
    assert "ddim" in out and "dpmpp_2m" in out
    assert len(json.loads((tmp_path / "report.json").read_text())["reports"]) == 2
    assert (tmp_path / "grid-ddim.png").is_file() and (tmp_path / "grid-dpmpp_2m.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    assert "--guidance" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown sampler"):
        parse_samplers("ddim,heun")
    with pytest.raises(ValueError, match="twice"):
        parse_samplers("ddim,ddim")
