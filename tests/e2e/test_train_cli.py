"""`ldm train autoencoder`, `ldm train ldm`, then `ldm generate` with the result: the console scripts in
subprocesses, on a tiny image folder and on the shapes stream; bad inputs end with exit 2 and a message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.e2e.test_generate_cli import png_text, run_ldm

AE_CONFIG = {
    "autoencoder": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 3, "embed_dim": 3,
                    "resolution": 64, "mid_attention": False},
    "batch_size": 2, "crop_size": 32, "eval_images": 4, "disc_start": 1, "disc_width": 16, "checkpoint_every": 1,
}
LDM_CONFIG = {
    "name": "toy-shapes",
    "unet": {"in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
             "num_res_blocks": 1, "attention_resolutions": [2], "num_heads": 2, "context_dim": 384},
    "conditioner": {"kind": "minilm", "max_length": 12},
    "batch_size": 4, "latent_pool": 8, "scale_images": 8, "sample_steps": 2, "sample_every": 2,
    "sample_prompts": ["a red circle"],
}


def write_yaml(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def image_folder(root: Path, count: int = 6) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_train_both_stages_then_generate(tmp_path: Path) -> None:
    ae_yaml = write_yaml(tmp_path / "ae.yaml", AE_CONFIG)
    folder = image_folder(tmp_path / "images")
    done = run_ldm("train", "autoencoder", "--config", ae_yaml, "--data", folder, "--steps", "2",
                   "--out", tmp_path / "ae", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "perceptual loss OFF" in done.stderr and "PSNR" in done.stdout
    assert yaml.safe_load((tmp_path / "ae" / "config.yaml").read_text())["perceptual_loss"] is False

    ldm_yaml = write_yaml(tmp_path / "ldm.yaml", LDM_CONFIG)
    done = run_ldm("train", "ldm", "--config", ldm_yaml, "--autoencoder", tmp_path / "ae" / "autoencoder.safetensors",
                   "--steps", "2", "--out", tmp_path / "ldm", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load((tmp_path / "ldm" / "config.yaml").read_text())
    assert resolved["steps"] == 2 and resolved["measured_scale_factor"] > 0
    assert (tmp_path / "ldm" / "log.csv").read_text().startswith("step,loss")

    done = run_ldm("generate", "a red circle", "--model", tmp_path / "ldm" / "model.safetensors", "--steps", "2",
                   "-o", tmp_path / "out.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert png_text(tmp_path / "out.png")["prompt"] == "a red circle"
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("case", ["missing folder", "corrupt image", "missing autoencoder", "unknown key"])
def test_bad_inputs_give_clear_errors(tmp_path: Path, case: str) -> None:
    ae_yaml = write_yaml(tmp_path / "ae.yaml", AE_CONFIG)
    if case == "missing folder":
        args = ["train", "autoencoder", "--config", ae_yaml, "--data", tmp_path / "nowhere", "--out", tmp_path / "r"]
        expected = "nowhere"
    elif case == "corrupt image":
        folder = image_folder(tmp_path / "images")
        (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
        args = ["train", "autoencoder", "--config", ae_yaml, "--data", folder, "--steps", "4", "--out", tmp_path / "r"]
        expected = "3.png"
    elif case == "missing autoencoder":
        args = ["train", "ldm", "--autoencoder", tmp_path / "none.safetensors", "--out", tmp_path / "r"]
        expected = "none.safetensors"
    else:
        args = ["train", "autoencoder", "--config", write_yaml(tmp_path / "bad.yaml", {"stepz": 3}),
                "--out", tmp_path / "r"]
        expected = "stepz"
    done = run_ldm(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "error" in done.stderr and expected in done.stderr
    assert "Traceback" not in done.stderr
