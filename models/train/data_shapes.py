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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset

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


def sample_scene(rng: np.random.Generator, size: int = IMAGE_SIZE, pair_probability: float = 0.4) -> Scene:
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
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 [size, size, 3]."""
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        alpha = coverage(obj, size)[..., None]
        image = image * (1 - alpha) + np.array(obj.rgb, dtype=np.float64) * alpha
    return np.rint(image).astype(np.uint8)


def scene_at(seed: int, index: int, size: int = IMAGE_SIZE) -> Scene:
    """Scene `index` of the stream `seed`: random access, so any worker or resumed run sees the same data."""
    return sample_scene(np.random.default_rng([seed, index]), size)


def to_model_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(IterableDataset):
    """Infinite stream of {"image": [3,64,64] in [-1,1], "text": caption}; item i depends only on (seed, i)."""

    def __init__(self, seed: int = 0, size: int = IMAGE_SIZE, start: int = 0) -> None:
        self.seed, self.size, self.start = seed, size, start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        scene = scene_at(self.seed, index, self.size)
        return {"image": to_model_tensor(render(scene, self.size)), "text": scene.caption}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        for index in itertools.count(self.start):
            yield self[index]

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]:
        """Items first..first+count-1 stacked: the training loops' way in (no DataLoader workers on 2 cores)."""
        items = [self[i] for i in range(first, first + count)]
        return torch.stack([it["image"] for it in items]), [str(it["text"]) for it in items]  # type: ignore[misc]
