"""The judge: right on ground truth, robust to generated-looking damage, and it rejects wrong captions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.eval.judge import (
    analyse,
    classify_shape,
    degrade,
    judge,
    mismatched_captions,
    position_matches,
    size_matches,
    validate_judge,
)
from models.eval.prompts import parse_prompt
from models.train.data_shapes import COLOURS, Scene, ShapeObject, render, scene_at


def scene(*objects: tuple[str, str, float, float, float], background: str | None = None) -> np.ndarray:
    """Render objects given as (colour, shape, cx, cy, side) in pixels."""
    shapes = tuple(ShapeObject(c, s, COLOURS[c], (x, y), side) for c, s, x, y, side in objects)  # type: ignore[arg-type]
    return render(Scene("", background, shapes))


def test_validation_on_ground_truth_and_mismatches() -> None:
    report = validate_judge(250, seed=99, progress=False)
    assert report.accuracy >= 0.99
    assert report.degraded_accuracy >= 0.97
    assert report.rejection["colour"] >= 0.95 and report.rejection["shape"] >= 0.95
    assert report.rejection["size"] >= 0.95 and report.rejection["position"] >= 0.95
    assert report.mismatches["colour"] == 250 and report.mismatches["size"] > 0


def test_attributes_are_reported_one_by_one() -> None:
    image = scene(("red", "circle", 16, 32, 16))  # small, on the left, white background
    right = judge(image, parse_prompt("a small red circle on the left"))
    assert right.correct and right.attributes() == {"background": True, "count": True, "colour": True,
                                                    "shape": True, "size": True, "position": True}
    for caption, wrong in [("a large red circle on the left", "size"), ("a small red circle on the right", "position"),
                           ("a small red square on the left", "shape"), ("a small blue circle on the left", "colour"),
                           ("a small red circle on the left on a gray background", "background")]:
        verdict = judge(image, parse_prompt(caption))
        assert not verdict.correct
        assert [k for k, ok in verdict.attributes().items() if not ok] == [wrong], caption


def test_unasked_attributes_are_not_judged() -> None:
    verdict = judge(scene(("green", "triangle", 50, 12, 20)), parse_prompt("a green triangle"))
    assert verdict.correct and set(verdict.attributes()) == {"background", "count", "colour", "shape"}


def test_two_objects_must_be_in_their_halves() -> None:
    image = scene(("yellow", "square", 14, 40, 20), ("purple", "triangle", 46, 20, 22), background="black")
    assert judge(image, parse_prompt("a yellow square and a purple triangle on a black background")).correct
    swapped = judge(image, parse_prompt("a purple triangle and a yellow square on a black background"))
    assert not swapped.correct and swapped.attributes()["position"] is False
    assert swapped.attributes()["colour"] and swapped.attributes()["shape"]


def test_missing_and_extra_objects_fail_the_count() -> None:
    one = scene(("blue", "square", 20, 30, 18))
    verdict = judge(one, parse_prompt("a blue square and an orange circle"))
    assert not verdict.correct and not verdict.count and not verdict.objects[1].colour
    two = scene(("blue", "square", 20, 30, 18), ("orange", "circle", 48, 30, 18))
    verdict = judge(two, parse_prompt("a blue square"))
    assert not verdict.correct and not verdict.count and verdict.objects[0].correct
    empty = judge(scene(background="gray"), parse_prompt("a red circle on a gray background"))
    assert not empty.correct and empty.background and empty.objects[0].found is None


def test_specks_and_edge_fringes_are_not_objects() -> None:
    image = scene(("purple", "circle", 32, 32, 24), background="gray").copy()
    image[5:8, 5:8] = COLOURS["red"]  # a 9-pixel speck: noise
    ring = (np.hypot(*np.mgrid[:64, :64] - 31.5) > 11.5) & (np.hypot(*np.mgrid[:64, :64] - 31.5) < 13.0)
    image[ring] = COLOURS["blue"]  # a 1-pixel off-colour rim round the circle: fringe
    verdict = judge(image, parse_prompt("a purple circle in the center on a gray background"))
    assert verdict.correct, verdict.attributes()
    image[40:52, 4:16] = COLOURS["yellow"]  # a solid 12x12 blob is an object
    assert not judge(image, parse_prompt("a purple circle in the center on a gray background")).count


def test_generated_looking_damage_keeps_the_verdicts() -> None:
    rng = np.random.default_rng(0)
    for index in range(60):
        truth = scene_at(21, index)
        damaged = degrade(render(truth), rng, blur=1.2, noise=10)
        shifted = np.clip(damaged.astype(int) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)
        assert judge(shifted, parse_prompt(truth.caption)).correct, truth.caption


def test_noise_is_rejected_and_analysed_without_error() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not judge(noise, parse_prompt("a red circle")).correct


def test_mismatched_captions_differ_in_one_attribute() -> None:
    rng = np.random.default_rng(1)
    for index in range(50):
        truth = scene_at(5, index)
        spec = parse_prompt(truth.caption)
        for kind, caption in mismatched_captions(truth, rng).items():
            other = parse_prompt(caption)
            assert caption != truth.caption and other.background == spec.background, kind


def test_inputs_are_checked_and_pil_is_accepted() -> None:
    image = scene(("orange", "triangle", 32, 32, 36))
    assert judge(Image.fromarray(image), parse_prompt("a large orange triangle in the center")).correct
    for bad in (image.astype(np.float32), image[:, :40], image[..., :2], np.zeros((4, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            analyse(bad)


def test_rules_at_their_bounds() -> None:
    assert size_matches(0.32 + 2.9 / 64, "small") and not size_matches(0.32 + 3.1 / 64, "small")
    assert size_matches(0.5, None) and not size_matches(0.15, None)
    assert position_matches((0.40 * 64, 0.5 * 64), 64, "left") and not position_matches((0.42 * 64, 32), 64, "left")
    assert position_matches((32, 0.63 * 64), 64, "center") is False
    with pytest.raises(ValueError, match="unknown position"):
        position_matches((32, 32), 64, "middle")
    assert classify_shape(0.5, 0.2, 1.0) == "triangle"
    assert classify_shape(0.97, 1.0, 1.0) == "square" and classify_shape(0.78, 1.0, 1.0) == "circle"
    assert classify_shape(0.5, 1.0, 1.0) is None and classify_shape(1.0, 1.0, 0.3) is None


def test_an_object_without_soft_coverage_is_measured_on_its_mask() -> None:
    """A faint smudge (coverage under the noise floor everywhere) once divided by a zero width (seen on a
    sampler's output); it is measured on its thresholded mask instead."""
    from models.eval.judge import _describe

    mask = np.zeros((64, 64), dtype=bool)
    mask[20:30, 20:30] = True
    found = _describe("red", mask, np.zeros((64, 64)))
    assert found.extent == (10.0, 10.0) and found.centre == (25.0, 25.0) and found.fill == 1.0
