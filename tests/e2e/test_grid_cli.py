"""`ldm grid`: the README's and model cards' pictures. One run of the console script on the shipped tiny-shapes (2
steps, one seed row), checked against `ldm generate` of the same prompt and seed; the conditions of the other kinds
checked without a model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.grid import CLASSES, COLUMNS, PROMPTS, GridOptions, columns, make_grid, shipped_models
from tests.e2e.test_generate_cli import run_ldm

ROOT = Path(__file__).resolve().parents[2]
GAP, SCALE = 4, 2


def test_the_grid_holds_the_images_ldm_generate_makes(tmp_path: Path) -> None:
    how = ("--steps", "2", "--sampler", "ddim", "--guidance", "4")
    done = run_ldm("grid", "--model", "tiny-shapes", *how, "--seeds", "5", "-o", "g.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "g.png") as opened:
        grid = np.asarray(opened.convert("RGB"))
    cell = 64 * SCALE
    assert grid.shape[1] == COLUMNS * (cell + GAP) + GAP
    top = grid.shape[0] - GAP - cell  # one row of images, below the captions
    cells = [grid[top:top + cell, GAP + k * (cell + GAP):GAP + k * (cell + GAP) + cell] for k in range(COLUMNS)]
    # the third prompt's image is `ldm generate`'s for that prompt and seed, enlarged (nearest neighbour)
    made = run_ldm("generate", PROMPTS[2], *how, "--seed", "5", "-o", "one.png", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    with Image.open(tmp_path / "one.png") as opened:
        alone = np.asarray(opened.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST))
    assert (cells[2] == alone).all()
    assert len({c.tobytes() for c in cells}) == COLUMNS  # six prompts, six pictures


def test_each_kind_gets_its_conditions() -> None:
    assert [c.caption for c in columns("text")] == list(PROMPTS)
    assert [c.condition for c in columns("class")] == list(CLASSES)
    layout, semantic = columns("layout"), columns("semantic")
    assert len(layout) == len(semantic) == COLUMNS
    assert all(c.picture is not None and c.picture.size == (64, 64) for c in layout + semantic)
    assert [c.caption for c in layout] == [c.caption for c in semantic]  # the same held-out scenes
    assert columns("none", seeds=(0, 1))[1].caption == f"seeds 1, {COLUMNS + 1}"
    with pytest.raises(ValueError, match="inpaint"):
        columns("inpaint")


def test_every_shipped_model_has_its_grid_in_its_card() -> None:
    for name in shipped_models():
        card = (ROOT / "models" / "zoo" / name / "MODEL_CARD.md").read_text()
        link = re.search(r"!\[[^]]*\]\(([^)]+\.png)\)", card)
        assert link is not None, name
        picture = (ROOT / "models" / "zoo" / name / link[1]).resolve()
        assert picture == ROOT / "docs" / f"grid-{name}.png" and picture.stat().st_size < 200_000


def test_an_unconditional_model_refuses_a_guidance_scale() -> None:
    with pytest.raises(ValueError, match="unguided"):
        make_grid("shapes-uncond", GridOptions(steps=1, seeds=(0,), guidance=3.0))
