"""The captioned-shapes grammar read back: every caption parses and round-trips, the rest is refused."""

from __future__ import annotations

import numpy as np
import pytest

from models.eval.prompts import ExpectedObject, PromptSpec, parse_prompt, random_prompts, scene_for_prompt
from models.train.data_shapes import (
    BACKGROUNDS,
    COLOURS,
    PAIR_SIZE_RANGE,
    POSITIONS,
    SHAPES,
    SIZE_RANGES,
    all_captions,
    scene_at,
)


def test_every_grammar_caption_parses_and_round_trips() -> None:
    for caption in all_captions():
        assert parse_prompt(caption).caption == caption


def test_dataset_captions_parse_to_their_scenes() -> None:
    for index in range(200):
        scene = scene_at(3, index)
        spec = parse_prompt(scene.caption)
        assert spec.background == scene.background
        assert [(o.colour, o.shape) for o in spec.objects] == [(o.colour, o.shape) for o in scene.objects]
        if len(scene.objects) == 1:
            assert (spec.objects[0].size, spec.objects[0].position) == (scene.size, scene.position)


def test_single_object_attributes() -> None:
    spec = parse_prompt("a large orange triangle in the center on a black background")
    assert spec == PromptSpec("black", (ExpectedObject("orange", "triangle", "large", "center"),))
    assert not spec.is_pair
    assert parse_prompt("a red circle").objects == (ExpectedObject("red", "circle"),)
    assert parse_prompt("a small blue square on the bottom").objects[0].position == "bottom"


def test_two_objects_get_their_sides() -> None:
    spec = parse_prompt("an orange circle and a green square on a gray background")
    assert spec.is_pair and spec.background == "gray"
    assert spec.objects == (ExpectedObject("orange", "circle", side="left"),
                            ExpectedObject("green", "square", side="right"))


def test_white_background_case_and_spaces_are_accepted() -> None:
    assert parse_prompt("a red circle on a white background") == parse_prompt("a red circle")
    assert parse_prompt("  A  Small RED circle   on the LEFT ") == parse_prompt("a small red circle on the left")


@pytest.mark.parametrize(("text", "message"), [
    ("a pink circle", "unknown colour 'pink'"),
    ("a red hexagon", "unknown shape 'hexagon'"),
    ("a red circle on a blue background", "unknown background 'blue'"),
    ("an red circle", "'a' before 'red'"),
    ("a orange circle", "'an' before 'orange'"),
    ("a red circle and a red square", "different colours"),
    ("a small red circle and a blue square", "name no size or position"),
    ("a red circle on the left and a blue square", "name no size or position"),
    ("a red circle in the middle", "outside the captioned-shapes grammar"),
    ("two red circles", "outside the captioned-shapes grammar"),
    ("", "outside the captioned-shapes grammar"),
])
def test_text_outside_the_grammar_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prompt(text)


def test_random_prompts_are_deterministic_grammar_captions_over_every_choice() -> None:
    prompts = random_prompts(3000, seed=1)
    assert prompts == random_prompts(3000, seed=1) and prompts != random_prompts(3000, seed=2)
    specs = [parse_prompt(p) for p in prompts]
    pairs = sum(s.is_pair for s in specs)
    assert 0.45 < pairs / len(specs) < 0.55
    singles = [s.objects[0] for s in specs if not s.is_pair]
    assert {o.colour for o in singles} == set(COLOURS) and {o.shape for o in singles} == set(SHAPES)
    assert {o.position for o in singles} == set(POSITIONS)
    assert {o.size for o in singles} == set(SIZE_RANGES)
    assert {s.background for s in specs} == set(BACKGROUNDS)
    assert all(parse_prompt(p).is_pair for p in random_prompts(20, 0, pair_probability=1.0))
    assert not any(parse_prompt(p).is_pair for p in random_prompts(20, 0, pair_probability=0.0))


@pytest.mark.parametrize(("n", "probability"), [(-1, 0.5), (3, 1.5), (3, -0.1)])
def test_random_prompts_reject_bad_arguments(n: int, probability: float) -> None:
    with pytest.raises(ValueError):
        random_prompts(n, 0, pair_probability=probability)


def test_scene_for_prompt_obeys_the_grammar() -> None:
    for i, prompt in enumerate(random_prompts(300, seed=4)):
        spec = parse_prompt(prompt)
        scene = scene_for_prompt(spec, np.random.default_rng(i))
        assert scene.caption == prompt and scene.background == spec.background
        for obj, expected in zip(scene.objects, spec.objects, strict=True):
            assert (obj.colour, obj.shape) == (expected.colour, expected.shape)
            x, y = (c / 64 for c in obj.centre)
            half = obj.side / 2
            assert half <= obj.centre[0] <= 64 - half and half <= obj.centre[1] <= 64 - half
            if expected.side is not None:
                assert PAIR_SIZE_RANGE[0] <= obj.side / 64 <= PAIR_SIZE_RANGE[1]
                assert (x < 0.5) == (expected.side == "left")
                continue
            lo, hi = SIZE_RANGES[expected.size]
            assert lo <= obj.side / 64 <= hi
            if expected.position == "left":
                assert x <= 0.38 and 0.4 <= y <= 0.6
            elif expected.position == "center":
                assert 0.45 <= x <= 0.55 and 0.45 <= y <= 0.55
