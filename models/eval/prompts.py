"""Captions of the captioned-shapes grammar as data: what a prompt asks for, random prompts, and a
reference scene for a prompt.

The grammar (models/train/data_shapes.py) is the contract; this module reads it back. Every caption
`all_captions()` lists parses, and `PromptSpec.caption` writes it out again word for word, so the
judge and the dataset cannot drift apart silently. "on a white background" is accepted too (white is
the unnamed background), and case and runs of spaces are forgiven; anything else outside the
grammar is a ValueError that names the offending part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.train.data_shapes import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    PAIR_SIZE_RANGE,
    POSITIONS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    Scene,
    Shape,
    ShapeObject,
    _centre_range,  # the grammar's own placement rule: one definition of "left", "center", ...
    _jittered,
    article,
    pair_caption,
    single_caption,
)

Side = Literal["left", "right"]
_NAMED_BACKGROUNDS = tuple(b for b in BACKGROUNDS if b is not None)
_POSITION_WORDS = {"on the left": "left", "on the right": "right", "on the top": "top",
                   "on the bottom": "bottom", "in the center": "center"}
_OBJECT = rf"(?P<art>an?) (?:(?P<size>{'|'.join(s for s in SIZES if s)}) )?(?P<colour>\w+) (?P<shape>\w+)"
_SINGLE = re.compile(rf"{_OBJECT}(?: (?P<where>{'|'.join(_POSITION_WORDS)}))?")
_PAIR_OBJECT = re.compile(r"(?P<art>an?) (?P<colour>\w+) (?P<shape>\w+)")
_BACKGROUND = re.compile(r"(?P<body>.+) on an? (?P<bg>\w+) background")
_GRAMMAR = (
    "expected 'a|an [small|large] <colour> <shape> [on the left|on the right|on the top|on the bottom|"
    "in the center] [on a <background> background]' or 'a|an <colour> <shape> and a|an <colour> <shape> "
    f"[on a <background> background]' with colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; "
    f"backgrounds white, {', '.join(_NAMED_BACKGROUNDS)}"
)


@dataclass(frozen=True)
class ExpectedObject:
    """One object a prompt asks for; None = the prompt leaves that attribute free."""

    colour: str
    shape: Shape
    size: str | None = None
    position: str | None = None
    #: two-object prompts: the half of the image the object must be in
    side: Side | None = None


@dataclass(frozen=True)
class PromptSpec:
    """Everything a grammar caption asks for. `background` None = white (the unnamed background)."""

    background: str | None
    objects: tuple[ExpectedObject, ...]

    @property
    def is_pair(self) -> bool:
        return len(self.objects) == 2

    @property
    def caption(self) -> str:
        """The canonical caption (as the dataset writes it)."""
        if self.is_pair:
            a, b = self.objects
            return pair_caption((a.colour, a.shape), (b.colour, b.shape), self.background)
        (obj,) = self.objects
        return single_caption(obj.colour, obj.shape, obj.size, obj.position, self.background)


def parse_prompt(text: str) -> PromptSpec:
    """The attributes a grammar caption asks for; ValueError for text outside the grammar."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt is a str, got {type(text).__name__}")
    norm = " ".join(text.lower().split())
    background: str | None = None
    if match := _BACKGROUND.fullmatch(norm):
        norm, bg = match["body"], match["bg"]
        if bg not in ("white", *_NAMED_BACKGROUNDS):
            raise ValueError(f"{text!r}: unknown background {bg!r}; {_GRAMMAR}")
        background = None if bg == "white" else bg
        _check_article(text, "a", bg)
    if " and " in norm:
        first, _, second = norm.partition(" and ")
        a, b = _pair_object(text, first, "left"), _pair_object(text, second, "right")
        if a.colour == b.colour:
            raise ValueError(f"{text!r}: the two objects of a prompt have different colours in the grammar")
        return PromptSpec(background, (a, b))
    match = _SINGLE.fullmatch(norm)
    if match is None:
        raise ValueError(f"{text!r} is outside the captioned-shapes grammar: {_GRAMMAR}")
    colour, shape = _colour_shape(text, match["colour"], match["shape"])
    _check_article(text, match["art"], match["size"] or colour)
    position = _POSITION_WORDS[match["where"]] if match["where"] else None
    return PromptSpec(background, (ExpectedObject(colour, shape, match["size"], position),))


def _pair_object(text: str, part: str, side: Side) -> ExpectedObject:
    match = _PAIR_OBJECT.fullmatch(part)
    if match is None:
        raise ValueError(f"{text!r}: {part!r} is not 'a|an <colour> <shape>' (two-object prompts name no size or "
                         f"position); {_GRAMMAR}")
    colour, shape = _colour_shape(text, match["colour"], match["shape"])
    _check_article(text, match["art"], colour)
    return ExpectedObject(colour, shape, side=side)


def _colour_shape(text: str, colour: str, shape: str) -> tuple[str, Shape]:
    if colour not in COLOURS:
        raise ValueError(f"{text!r}: unknown colour {colour!r}; {_GRAMMAR}")
    for known in SHAPES:
        if shape == known:
            return colour, known
    raise ValueError(f"{text!r}: unknown shape {shape!r}; {_GRAMMAR}")


def _check_article(text: str, given: str, word: str) -> None:
    if given != article(word):
        raise ValueError(f"{text!r}: the grammar writes {article(word)!r} before {word!r}, not {given!r}")


def random_prompts(n: int, seed: int, pair_probability: float = 0.5) -> list[str]:
    """`n` captions, each attribute uniform over the grammar's options (as `sample_scene` draws them), a
    two-object caption with probability `pair_probability`. Deterministic from `seed`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= pair_probability <= 1.0:
        raise ValueError(f"pair_probability must be within [0, 1], got {pair_probability}")
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    out = []
    for _ in range(n):
        background = backgrounds[rng.integers(len(backgrounds))]
        if rng.random() < pair_probability:
            c1, c2 = rng.choice(len(colours), size=2, replace=False)
            s1, s2 = (SHAPES[rng.integers(len(SHAPES))] for _ in range(2))
            out.append(pair_caption((colours[c1], s1), (colours[c2], s2), background))
        else:
            colour = colours[rng.integers(len(colours))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            size = SIZES[rng.integers(len(SIZES))]
            position = POSITIONS[rng.integers(len(POSITIONS))]
            out.append(single_caption(colour, shape, size, position, background))
    return out


def scene_for_prompt(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """A random scene that the prompt describes, drawn as `sample_scene` draws scenes with that caption:
    the real images a perfect model would produce for these prompts (the Fréchet reference)."""
    if spec.is_pair:
        objects = []
        for obj, (x_lo, x_hi) in zip(spec.objects, ((0.0, size / 2), (size / 2, float(size))), strict=True):
            side = rng.uniform(*PAIR_SIZE_RANGE) * size
            cx = rng.uniform(x_lo + side / 2, x_hi - side / 2)
            cy = rng.uniform(side / 2, size - side / 2)
            objects.append(ShapeObject(obj.colour, obj.shape, _jittered(rng, obj.colour), (cx, cy), side))
        return Scene(spec.caption, spec.background, tuple(objects))
    (obj,) = spec.objects
    side = rng.uniform(*SIZE_RANGES[obj.size]) * size
    cx = rng.uniform(*_centre_range(obj.position, 0, side / 2, size))
    cy = rng.uniform(*_centre_range(obj.position, 1, side / 2, size))
    shape_object = ShapeObject(obj.colour, obj.shape, _jittered(rng, obj.colour), (cx, cy), side)
    return Scene(spec.caption, spec.background, (shape_object,), obj.size, obj.position)
