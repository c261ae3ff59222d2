"""The shipped tiny-shapes model, as a newcomer meets it: `ldm generate PROMPT -o out.png` with every
default, on a fresh checkout. The judge (validated on ground-truth renders) reads the image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from models.checkpoints import ZOO_DIR, load_model
from models.eval.judge import judge
from models.eval.prompts import parse_prompt
from tests.e2e.test_generate_cli import png_text, run_ldm

PROMPT = "a red circle on a black background"


def test_default_generate_shows_what_the_prompt_asks(tmp_path: Path) -> None:
    done = run_ldm("generate", PROMPT, "-o", tmp_path / "out.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert png_text(tmp_path / "out.png")["model"] == "tiny-shapes"
    with Image.open(tmp_path / "out.png") as image:
        verdict = judge(image.convert("RGB"), parse_prompt(PROMPT))
    assert verdict.correct, verdict.attributes()


def test_shipped_files() -> None:
    folder = ZOO_DIR / "tiny-shapes"
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 60 * 2**20  # autoencoder + UNet within the 60 MB budget
    card = (folder / "MODEL_CARD.md").read_text()
    assert "ldm train autoencoder" in card and "ldm train ldm" in card and "PSNR" in card
    model = load_model("tiny-shapes")
    assert model.config.name == "tiny-shapes" and model.config.default_size == 64
    assert model.config.conditioner is not None and model.config.conditioner.kind == "minilm"
