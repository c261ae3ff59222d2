"""The procedural *captioned shapes* dataset: 64x64 RGB scenes of filled circles, squares and triangles
with captions in a fixed grammar, deterministic from (seed, index) and infinite.

The grammar is a contract (an outside evaluation depends on it):

- one object: ``a|an [small|large] <colour> <shape> [on the left|on the right|on the top|on the bottom|
  in the center] [on a <bg> background]``;
- two objects: ``a|an <colour> <shape> and a|an <colour> <shape> [on a <bg> background]``, different
  colours, the first in the left half and the second in the right half, no overlap, each 25-40 % of the side;
- <bg> is ``black`` or ``gray``; an unnamed background is white.

Sizes are the side of the shape's bounding box as a fraction of the image side: small 0.20-0.32, large
0.50-0.64, unsized anything in 0.20-0.64. A positioned object's centre lies at <= 0.38 of the width
(``left``; ``right``, ``top``, ``bottom`` alike) and within 0.40-0.60 on the other axis; ``in the center``
is within 0.45-0.55 on both. Every object lies fully inside the image. Edges are anti-aliased by 4x4
supersampling, which keeps the first stage's job (and its PSNR) about shape, not aliasing.

Every scene also comes with the conditions of the paper's other tasks, from its exact geometry
(`scene_conditions`): a class label (colour x shape; single-object scenes only), a layout (each object's
bounding box in [0, 1] image coordinates with its class) and a semantic label map (0 = background, class
+ 1 where the object covers at least half the pixel, i.e. where the render is at least half way from the
background to the object's colour). The label numbering is defined once, here (`CLASS_NAMES`). The
background colour is part of the image but not of any condition: a model conditioned on a map or layout
chooses the background itself, as it does for an unnamed attribute of a caption.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset

from models.conditioning import Box

Shape = Literal["circle", "square", "triangle"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 50),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 200),
    "orange": (250, 140, 20),
}
SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle")
#: background name -> sRGB; `None` is the unnamed (white) background
BACKGROUNDS: dict[str | None, tuple[int, int, int]] = {
    None: (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
}
POSITIONS: tuple[str | None, ...] = (None, "left", "right", "top", "bottom", "center")
SIZES: tuple[str | None, ...] = (None, "small", "large")
SIZE_RANGES: dict[str | None, tuple[float, float]] = {None: (0.20, 0.64), "small": (0.20, 0.32), "large": (0.50, 0.64)}
PAIR_SIZE_RANGE = (0.25, 0.40)
#: probability of a two-object scene in the stream
PAIR_PROBABILITY = 0.4
COLOUR_JITTER = 10
IMAGE_SIZE = 64
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape; `centre` and `side` in pixels (side = bounding-box side)."""

    colour: str
    shape: Shape
    rgb: tuple[int, int, int]
    centre: tuple[float, float]
    side: float


@dataclass(frozen=True)
class Scene:
    caption: str
    background: str | None
    objects: tuple[ShapeObject, ...]
    #: attributes the caption asked for (None where it left them free)
    size: str | None = None
    position: str | None = None


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def single_caption(colour: str, shape: str, size: str | None, position: str | None, background: str | None) -> str:
    words = [w for w in (size, colour, shape) if w]
    text = f"{article(words[0])} {' '.join(words)}"
    if position is not None:
        text += " in the center" if position == "center" else f" on the {position}"
    return text + _background_suffix(background)


def pair_caption(first: tuple[str, str], second: tuple[str, str], background: str | None) -> str:
    (c1, s1), (c2, s2) = first, second
    return f"{article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}" + _background_suffix(background)


def _background_suffix(background: str | None) -> str:
    return "" if background is None else f" on a {background} background"


def all_captions() -> list[str]:
    """Every caption the grammar can produce (1782), in a fixed order: the text-encoder cache's keys."""
    out = [
        single_caption(c, s, size, pos, bg)
        for size, c, s, pos, bg in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS)
    ]
    for (c1, s1), (c2, s2), bg in itertools.product(
        itertools.product(COLOURS, SHAPES), itertools.product(COLOURS, SHAPES), BACKGROUNDS
    ):
        if c1 != c2:
            out.append(pair_caption((c1, s1), (c2, s2), bg))
    return out


def _jittered(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour])
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    r, g, b = np.clip(base + jitter, 0, 255).tolist()
    return (r, g, b)


def _centre_range(position: str | None, axis: int, half: float, size: int) -> tuple[float, float]:
    """Allowed centre interval along `axis` (0 = x, 1 = y), kept fully inside the image."""
    lo, hi = half, size - half
    along = {"left": (0, "low"), "right": (0, "high"), "top": (1, "low"), "bottom": (1, "high")}
    if position == "center":
        lo, hi = max(lo, 0.45 * size), min(hi, 0.55 * size)
    elif position in along:
        main_axis, end = along[position]
        if axis == main_axis:
            if end == "low":
                hi = min(hi, 0.38 * size)
            else:
                lo = max(lo, 0.62 * size)
        else:
            lo, hi = max(lo, 0.40 * size), min(hi, 0.60 * size)
    return lo, hi


def sample_scene(rng: np.random.Generator, size: int = IMAGE_SIZE, pair_probability: float = PAIR_PROBABILITY) -> Scene:
    """One random scene from the grammar: attributes uniform over their options."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = list(COLOURS)
    if rng.random() < pair_probability:
        c1, c2 = rng.choice(len(colours), size=2, replace=False)
        objects = []
        for colour, (x_lo, x_hi) in ((colours[c1], (0.0, size / 2)), (colours[c2], (size / 2, float(size)))):
            shape = SHAPES[rng.integers(len(SHAPES))]
            side = rng.uniform(*PAIR_SIZE_RANGE) * size
            cx = rng.uniform(x_lo + side / 2, x_hi - side / 2)
            cy = rng.uniform(side / 2, size - side / 2)
            objects.append(ShapeObject(colour, shape, _jittered(rng, colour), (cx, cy), side))
        caption = pair_caption((objects[0].colour, objects[0].shape), (objects[1].colour, objects[1].shape), background)
        return Scene(caption, background, tuple(objects))
    colour = colours[rng.integers(len(colours))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size_name = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    side = rng.uniform(*SIZE_RANGES[size_name]) * size
    cx = rng.uniform(*_centre_range(position, 0, side / 2, size))
    cy = rng.uniform(*_centre_range(position, 1, side / 2, size))
    obj = ShapeObject(colour, shape, _jittered(rng, colour), (cx, cy), side)
    caption = single_caption(colour, shape, size_name, position, background)
    return Scene(caption, background, (obj,), size_name, position)


def coverage(obj: ShapeObject, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel the shape covers, [size, size] in [0, 1] (4x4 supersampling)."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    cx, cy = obj.centre
    half = obj.side / 2
    if obj.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif obj.shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # isosceles, apex up: apex (cx, cy - half), base from cx - half to cx + half at y = cy + half
        depth = (y - (cy - half)) / obj.side  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * half)
    coverage: np.ndarray = inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    return coverage


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 [size, size, 3]."""
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        alpha = coverage(obj, size)[..., None]
        image = image * (1 - alpha) + np.array(obj.rgb, dtype=np.float64) * alpha
    return np.rint(image).astype(np.uint8)


def scene_at(seed: int, index: int, size: int = IMAGE_SIZE, pair_probability: float = PAIR_PROBABILITY) -> Scene:
    """Scene `index` of the stream `seed`: random access, so any worker or resumed run sees the same data.
    `pair_probability` 0 gives the single-object stream (a class-conditional model's data): the scenes that
    are single-object in the default stream are the same in it."""
    return sample_scene(np.random.default_rng([seed, index]), size, pair_probability)


def to_model_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- conditions of a scene

#: Class ids, defined once: id k is colour `list(COLOURS)[k // 3]` x shape `SHAPES[k % 3]`, named
#: "<colour> <shape>" ("red circle" = 0, "red square" = 1, ..., "orange triangle" = 17). Class labels and
#: layouts hold k; semantic label maps hold k + 1, with 0 = background (`BACKGROUND_LABEL`).
CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
BACKGROUND_LABEL = 0
#: the colour each label map value shows as in a PNG (background white)
LABEL_PALETTE: tuple[tuple[int, int, int], ...] = ((255, 255, 255),) + tuple(
    COLOURS[colour] for colour in COLOURS for _ in SHAPES)


def class_id(colour: str, shape: str) -> int:
    """The class id of a colour x shape (see `CLASS_NAMES`)."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_of(label: int) -> tuple[str, Shape]:
    """(colour, shape) of class id `label`."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"class id {label} is outside 0..{len(CLASS_NAMES) - 1}")
    return list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def object_box(obj: ShapeObject, size: int = IMAGE_SIZE) -> Box:
    """The object's bounding box in [0, 1] image coordinates (all three shapes fill a square box of `side`)."""
    cx, cy = obj.centre
    half = obj.side / 2
    x0, y0, x1, y1 = (min(1.0, max(0.0, v / size)) for v in (cx - half, cy - half, cx + half, cy + half))  # rounding
    return Box(class_id(obj.colour, obj.shape), x0, y0, x1, y1)


def scene_layout(scene: Scene, size: int = IMAGE_SIZE) -> tuple[Box, ...]:
    """One box per object, in the scene's order (a pair: left object first)."""
    return tuple(object_box(obj, size) for obj in scene.objects)


def scene_class(scene: Scene) -> int | None:
    """The class id of a single-object scene; None for a two-object scene (it has no one class)."""
    if len(scene.objects) != 1:
        return None
    obj = scene.objects[0]
    return class_id(obj.colour, obj.shape)


def label_map(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size]: class id + 1 where an object covers at least half the pixel, 0 elsewhere; objects
    are painted in order, as `render` paints them."""
    out = np.zeros((size, size), dtype=np.uint8)
    for obj in scene.objects:
        out[coverage(obj, size) >= 0.5] = class_id(obj.colour, obj.shape) + 1
    return out


@dataclass(frozen=True)
class SceneConditions:
    """The conditions of the paper's other tasks for one scene."""

    class_id: int | None  # None: two objects
    layout: tuple[Box, ...]
    label_map: np.ndarray  # uint8 [size, size], 0 = background


def scene_conditions(scene: Scene, size: int = IMAGE_SIZE) -> SceneConditions:
    return SceneConditions(scene_class(scene), scene_layout(scene, size), label_map(scene, size))


class ShapesDataset(IterableDataset[dict[str, torch.Tensor | str]]):
    """Infinite stream of {"image": [3,64,64] in [-1,1], "text": caption}; item i depends only on (seed, i).
    `pair_probability` 0: single-object scenes only (see `scene_at`)."""

    def __init__(self, seed: int = 0, size: int = IMAGE_SIZE, start: int = 0,
                 pair_probability: float = PAIR_PROBABILITY) -> None:
        self.seed, self.size, self.start = seed, size, start
        self.pair_probability = pair_probability

    def scene(self, index: int) -> Scene:
        return scene_at(self.seed, index, self.size, self.pair_probability)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        scene = self.scene(index)
        return {"image": to_model_tensor(render(scene, self.size)), "text": scene.caption}

    def batch_with_conditions(self, first: int, count: int) -> tuple[torch.Tensor, list[str], list[SceneConditions]]:
        """`batch` plus every item's `SceneConditions` (class, layout, label map)."""
        scenes = [self.scene(i) for i in range(first, first + count)]
        images = torch.stack([to_model_tensor(render(s, self.size)) for s in scenes])
        return images, [s.caption for s in scenes], [scene_conditions(s, self.size) for s in scenes]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        for index in itertools.count(self.start):
            yield self[index]

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]:
        """Items first..first+count-1 stacked: the training loops' way in (no DataLoader workers on 2 cores)."""
        items = [self[i] for i in range(first, first + count)]
        return torch.stack([it["image"] for it in items]), [str(it["text"]) for it in items]  # type: ignore[misc]
