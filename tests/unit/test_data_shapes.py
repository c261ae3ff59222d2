"""The captioned-shapes dataset against its grammar contract (an outside evaluation depends on it): captions,
colours, sizes, positions, backgrounds and pair layout, checked from the Scene fields *and* from the pixels."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from models.train.data_shapes import (
    IMAGE_SIZE,
    Scene,
    ShapeObject,
    ShapesDataset,
    all_captions,
    render,
    scene_at,
)

# The contract, written out again here on purpose: the test must not read it from the module it checks.
PALETTE = {"red": (230, 25, 25), "green": (30, 180, 50), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "purple": (140, 40, 200), "orange": (250, 140, 20)}
BACKGROUND_RGB = {None: (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPE_NAMES = ("circle", "square", "triangle")
SIZE_RANGE = {None: (0.20, 0.64), "small": (0.20, 0.32), "large": (0.50, 0.64)}
PAIR_RANGE = (0.25, 0.40)
JITTER = 10
S = IMAGE_SIZE
#: a shape's area as a fraction of its bounding box's
AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}

_C = "|".join(PALETTE)
_SH = "|".join(SHAPE_NAMES)
# "an" exactly before a vowel: the lookaheads make a wrong article a non-match.
_ART = r"(?:an (?=[aeiou])|a (?=[^aeiou]))"
_BG = r"(?: on a (?P<bg>black|gray) background)?"
SINGLE = re.compile(rf"{_ART}(?:(?P<size>small|large) )?(?P<colour>{_C}) (?P<shape>{_SH})"
                    rf"(?: on the (?P<side>left|right|top|bottom)| (?P<center>in the center))?{_BG}")
PAIR = re.compile(rf"{_ART}(?P<colour>{_C}) (?P<shape>{_SH}) and {_ART}(?P<colour2>{_C}) (?P<shape2>{_SH}){_BG}")

N_SCENES = 2000
N_RENDERED = 300


def parse(caption: str) -> dict[str, str | None]:
    """The caption's attributes, or an assertion error if it is outside the grammar."""
    if m := SINGLE.fullmatch(caption):
        attrs = m.groupdict()
        center, side = attrs.pop("center"), attrs.pop("side")
        attrs["position"] = "center" if center else side
        return attrs
    m = PAIR.fullmatch(caption)
    assert m is not None, f"caption outside the grammar: {caption!r}"
    return m.groupdict()


def image_of(item: dict[str, torch.Tensor | str]) -> torch.Tensor:
    image = item["image"]
    assert isinstance(image, torch.Tensor)
    return image


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [scene_at(0, i) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def rendered(scenes: list[Scene]) -> list[tuple[Scene, np.ndarray]]:
    return [(scene, render(scene)) for scene in scenes[:N_RENDERED]]


# --- determinism and tensors -----------------------------------------------------------------------------------


def test_same_seed_and_index_give_the_same_scene() -> None:
    for index in (0, 7, 123_456):
        a, b = scene_at(3, index), scene_at(3, index)
        assert a == b and np.array_equal(render(a), render(b))
        x, y = ShapesDataset(seed=3)[index], ShapesDataset(seed=3)[index]
        assert x["text"] == y["text"] and torch.equal(image_of(x), image_of(y))


def test_different_seeds_and_indices_differ() -> None:
    assert [scene_at(0, i) for i in range(20)] != [scene_at(1, i) for i in range(20)]
    assert sum(not np.array_equal(render(scene_at(0, i)), render(scene_at(1, i))) for i in range(20)) >= 18
    assert len({scene_at(0, i).objects for i in range(20)}) == 20


def test_image_and_tensor_format() -> None:
    scene = scene_at(0, 1)
    image = render(scene)
    assert image.shape == (S, S, 3) and image.dtype == np.uint8
    ds = ShapesDataset(seed=0)
    item = ds[1]
    tensor = image_of(item)
    assert item["text"] == scene.caption
    assert tensor.shape == (3, S, S) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), image / 127.5 - 1, atol=1e-6)


def test_tensor_range_reaches_both_ends() -> None:
    """White backgrounds map to exactly 1 and black ones to exactly -1: [-1, 1], not [0, 1] or [-1, 0.99]."""
    ds = ShapesDataset(seed=0)
    by_bg = {scene_at(0, i).background: i for i in range(40)}
    assert image_of(ds[by_bg[None]]).max() == 1.0
    assert image_of(ds[by_bg["black"]]).min() == -1.0


def test_batch_and_iteration_match_indexing() -> None:
    ds = ShapesDataset(seed=2)
    images, texts = ds.batch(5, 3)
    assert images.shape == (3, 3, S, S)
    for k in range(3):
        assert texts[k] == ds[5 + k]["text"] and torch.equal(images[k], image_of(ds[5 + k]))
    first = next(iter(ShapesDataset(seed=2, start=5)))
    assert first["text"] == texts[0] and torch.equal(image_of(first), images[0])


# --- captions ----------------------------------------------------------------------------------------------------


def test_all_captions() -> None:
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 1782
    parsed = [parse(c) for c in captions]
    pairs = [p for p in parsed if "colour2" in p]
    # singles: 3 sizes x 6 colours x 3 shapes x 6 positions x 3 backgrounds; pairs: 18 x 15 x 3 backgrounds
    assert len(pairs) == 810 and len(parsed) - len(pairs) == 972
    assert all(p["colour"] != p["colour2"] for p in pairs)
    assert captions == all_captions()  # a fixed order: it keys the text-encoder cache


def test_articles() -> None:
    captions = set(all_captions())
    assert "an orange circle" in captions and "a large orange circle" in captions and "a small red square" in captions
    assert "a red triangle and an orange square on a gray background" in captions
    assert not any(re.search(r"\ba orange\b|\ban (?!orange)", c) for c in captions)


def test_sampled_captions_are_in_the_grammar_and_cover_it(scenes: list[Scene]) -> None:
    vocabulary = set(all_captions())
    seen: dict[str, Counter[str | None]] = {k: Counter() for k in ("colour", "shape", "size", "position", "bg")}
    n_pairs = 0
    for scene in scenes:
        attrs = parse(scene.caption)
        assert scene.caption in vocabulary
        assert attrs["bg"] == scene.background
        if "colour2" in attrs:
            n_pairs += 1
            assert len(scene.objects) == 2 and scene.size is None and scene.position is None
            colours = [attrs["colour"], attrs["colour2"]]
            shapes = [attrs["shape"], attrs["shape2"]]
        else:
            assert len(scene.objects) == 1
            assert (attrs["size"], attrs["position"]) == (scene.size, scene.position)
            colours, shapes = [attrs["colour"]], [attrs["shape"]]
            seen["size"][attrs["size"]] += 1
            seen["position"][attrs["position"]] += 1
        assert [o.colour for o in scene.objects] == colours and [o.shape for o in scene.objects] == shapes
        seen["colour"].update(colours)
        seen["shape"].update(shapes)
        seen["bg"][attrs["bg"]] += 1
    assert set(seen["colour"]) == set(PALETTE)
    assert set(seen["shape"]) == set(SHAPE_NAMES)
    assert set(seen["size"]) == {None, "small", "large"}
    assert set(seen["position"]) == {None, "left", "right", "top", "bottom", "center"}
    assert set(seen["bg"]) == {None, "black", "gray"}
    assert 0.3 * N_SCENES < n_pairs < 0.5 * N_SCENES  # about 40 % two-object scenes
    assert min(c for counter in seen.values() for c in counter.values()) > 50  # roughly uniform, none starved


# --- geometry from the Scene fields ------------------------------------------------------------------------------


def check_colour(obj: ShapeObject) -> None:
    assert obj.colour in PALETTE and obj.shape in SHAPE_NAMES
    assert all(abs(c - p) <= JITTER for c, p in zip(obj.rgb, PALETTE[obj.colour], strict=True)), obj


def check_inside(obj: ShapeObject) -> None:
    (cx, cy), half = obj.centre, obj.side / 2
    assert half <= cx <= S - half and half <= cy <= S - half, obj


def check_position(obj: ShapeObject, position: str | None) -> None:
    x, y = obj.centre[0] / S, obj.centre[1] / S
    if position == "center":
        assert 0.45 <= x <= 0.55 and 0.45 <= y <= 0.55, obj
    elif position is not None:
        along, across = (x, y) if position in ("left", "right") else (y, x)
        assert (along <= 0.38) if position in ("left", "top") else (along >= 0.62), (position, obj)
        assert 0.40 <= across <= 0.60, (position, obj)


def test_scene_geometry(scenes: list[Scene]) -> None:
    for scene in scenes:
        for obj in scene.objects:
            check_colour(obj)
            check_inside(obj)
        if len(scene.objects) == 1:
            obj = scene.objects[0]
            lo, hi = SIZE_RANGE[scene.size]
            assert lo * S <= obj.side <= hi * S, (scene.size, obj)
            check_position(obj, scene.position)
        else:
            first, second = scene.objects
            assert first.colour != second.colour
            for obj in scene.objects:
                assert PAIR_RANGE[0] * S <= obj.side <= PAIR_RANGE[1] * S, obj
            # first entirely in the left half, second entirely in the right half: no overlap
            assert first.centre[0] + first.side / 2 <= S / 2 <= second.centre[0] - second.side / 2, scene


def test_positions_use_their_whole_range(scenes: list[Scene]) -> None:
    """Sizes and positions are spread over their ranges, not stuck at one value."""
    singles = [s for s in scenes if len(s.objects) == 1]
    for size, (lo, hi) in SIZE_RANGE.items():
        sides = [s.objects[0].side / S for s in singles if s.size == size]
        assert min(sides) < lo + 0.05 and max(sides) > hi - 0.05, size
    xs = [s.objects[0].centre[0] / S for s in singles if s.position is None]
    assert min(xs) < 0.25 and max(xs) > 0.75


# --- geometry from the pixels ------------------------------------------------------------------------------------


def coverage_from_pixels(image: np.ndarray, obj: ShapeObject, bg: tuple[int, int, int]) -> np.ndarray:
    """Per-pixel fraction of `obj` (0 = background, 1 = its colour), inverted from the alpha blend."""
    direction = np.array(obj.rgb, float) - bg
    return ((image.astype(float) - bg) @ direction) / (direction @ direction)


def check_pixels(image: np.ndarray, obj: ShapeObject, bg: tuple[int, int, int], x0: int) -> None:
    """`image` is the part of the scene holding only `obj` (columns x0..)."""
    (cx, cy), side = obj.centre, obj.side
    changed = np.any(image != bg, axis=-1)
    ys, xs = np.nonzero(changed)
    # bounding box of the changed pixels: the object's side and centre (anti-aliased edges: 1-2 px slack)
    assert abs((xs.max() - xs.min() + 1) - side) <= 2 and abs((ys.max() - ys.min() + 1) - side) <= 2, obj
    assert abs(x0 + (xs.max() + xs.min() + 1) / 2 - cx) <= 1 and abs((ys.max() + ys.min() + 1) / 2 - cy) <= 1, obj
    # a pixel well inside the shape has the object's colour: the palette's within the jitter (+1 for rounding)
    inner_y = cy + side / 4 if obj.shape == "triangle" else cy
    pixel = image[int(inner_y), int(cx) - x0].astype(int)
    assert np.all(np.abs(pixel - PALETTE[obj.colour]) <= JITTER + 1), (obj, pixel)
    # the area identifies the shape: square = side^2, circle = pi/4 side^2, triangle = side^2 / 2
    alpha = coverage_from_pixels(image, obj, bg)
    assert abs(alpha.sum() / (AREA[obj.shape] * side**2) - 1) < 0.05, (obj, alpha.sum())
    if obj.shape == "triangle":
        rows = np.arange(image.shape[0]) + 0.5
        cols = np.arange(image.shape[1]) + 0.5 + x0
        top = alpha[rows < cy].sum() / alpha.sum()
        left = alpha[:, cols < cx].sum() / alpha.sum()
        assert top < 0.35, (obj, top)  # apex up: the top half holds a quarter of the area (apex down: 3/4)
        assert abs(left - 0.5) < 0.1, (obj, left)  # isosceles: symmetric about the vertical through the centre
    if obj.shape == "square":  # axis-aligned: every pixel one in from the bbox edge is fully covered
        x_lo, x_hi = int(np.ceil(cx - side / 2)) + 1, int(cx + side / 2) - 1
        y_lo, y_hi = int(np.ceil(cy - side / 2)) + 1, int(cy + side / 2) - 1
        assert np.all(image[y_lo:y_hi, x_lo - x0:x_hi - x0] == obj.rgb), obj


def test_rendered_geometry(rendered: list[tuple[Scene, np.ndarray]]) -> None:
    kinds: Counter[tuple[str, int]] = Counter()
    for scene, image in rendered:
        bg = BACKGROUND_RGB[scene.background]
        assert image.shape == (S, S, 3) and image.dtype == np.uint8
        assert np.all(image == bg, axis=-1).mean() > 0.5  # the background is the named (or white) one
        if len(scene.objects) == 1:
            check_pixels(image, scene.objects[0], bg, 0)
        else:  # each half holds exactly one object
            check_pixels(image[:, : S // 2], scene.objects[0], bg, 0)
            check_pixels(image[:, S // 2 :], scene.objects[1], bg, S // 2)
        kinds.update((o.shape, len(scene.objects)) for o in scene.objects)
    assert len(kinds) == 6  # every shape checked, alone and in pairs
