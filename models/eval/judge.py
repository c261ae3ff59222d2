"""Does a generated image show what its prompt asked? Pixel analysis, no learned parts.

Steps: the background colour is the median of the border ring (objects touch at most a small part
of it); every pixel is explained as a mix of that background and one palette colour (projection on
the segment background -> colour, the model of an anti-aliased or blurred edge), its colour the one
whose segment is nearest, and it is foreground when it is at least half way to it; connected parts
per colour are objects, thin or tiny parts are edge fringe (merged into the object they touch) or
noise (dropped). Each object's soft coverage gives its width, height, centre and area (exact on
clean renders, nearly unmoved by blur, see `DetectedObject`), hence its shape (fill of the box and
taper, see `classify_shape`), size and position, judged as data_shapes defines them.

Tolerances, and why (validated by `validate_judge`, figures in its docstring):

- objects need an area of `MIN_AREA` = 40 px, half the smallest object the grammar draws (a small
  triangle, side 12.8 px, ~82 px), and must survive a 3x3 erosion: a 1-2 px ring of off-colour edge
  pixels, common after a VAE decoder, is fringe, not an object;
- sizes get `SIZE_TOLERANCE_PX` = 3 px each way: clean renders measure within 1.2 px (a triangle's
  thin apex is lost), blur adds up to ~1.5 px, and `small` (<= 20.5 + 3 px) and `large` (>= 32 - 3 px)
  stay 5.5 px apart;
- positions get `POSITION_TOLERANCE` = 0.03 (1.9 px) on every bound: clean and mildly blurred centres
  are within ~1.3 px, and the positions stay disjoint (left <= 0.41 < 0.42 <= center);
- the background must be the nearest of white/black/gray and within `BACKGROUND_TOLERANCE` = 64 of it
  (the three are >= 221 apart: a tint of a quarter of that still reads as that background).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from models.eval.prompts import ExpectedObject, PromptSpec, parse_prompt
from models.train.data_shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_RANGES,
    Scene,
    pair_caption,
    render,
    scene_at,
    single_caption,
)

MIN_AREA = 40
SIZE_TOLERANCE_PX = 3.0
POSITION_TOLERANCE = 0.03
BACKGROUND_TOLERANCE = 64.0
BORDER = 2
#: shape rules on (fill, taper, aspect), between the ideal values of the three shapes
TRIANGLE_TAPER = 0.6
SQUARE_FILL = 0.83
CIRCLE_FILL = 0.66
MIN_ASPECT = 0.7
SOFT_MARGIN = 2
SOFT_FLOOR = 0.1
_EIGHT = np.ones((3, 3), dtype=bool)
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image, lengths in pixels.

    `extent` and `centre` come from the object's soft coverage: the per-column (per-row) maximum of its
    colour's coverage, summed, is its width (height), and that profile's mean is its centre. On a clean
    render these equal the true side and centre within a fraction of a pixel, and a blur, which spreads
    coverage but keeps its total, hardly moves them, whereas a thresholded bounding box is off by up to a
    pixel on each side (15 % of a small shape's area).
    """

    colour: str
    area: int  # pixels of the (thresholded) mask
    extent: tuple[float, float]  # (width, height)
    centre: tuple[float, float]  # (x, y), as data_shapes' `ShapeObject.centre`
    fill: float  # soft area / (width * height)
    taper: float
    aspect: float
    shape: str | None  # None: fits none of the three
    mask: np.ndarray = field(repr=False, compare=False)

    @property
    def side(self) -> float:
        """The bounding-box side, as data_shapes' `ShapeObject.side` (all three shapes have a square box)."""
        return (self.extent[0] + self.extent[1]) / 2


@dataclass(frozen=True)
class SceneAnalysis:
    size: int
    background_rgb: tuple[float, float, float]
    background: str | None  # nearest of white (None) / black / gray
    background_distance: float
    objects: tuple[DetectedObject, ...]  # largest first


@dataclass(frozen=True)
class ObjectVerdict:
    """How one expected object came out; size/position None = the prompt did not ask."""

    expected: ExpectedObject
    found: DetectedObject | None  # the object judged (of the expected colour if there is one)
    colour: bool
    shape: bool
    size: bool | None
    position: bool | None

    @property
    def correct(self) -> bool:
        return self.colour and self.shape and self.size is not False and self.position is not False


@dataclass(frozen=True)
class Judgement:
    spec: PromptSpec
    analysis: SceneAnalysis
    background: bool
    count: bool  # as many objects as asked, no extra ones
    objects: tuple[ObjectVerdict, ...]

    @property
    def correct(self) -> bool:
        """All attributes the prompt asked for are right."""
        return self.background and self.count and all(v.correct for v in self.objects)

    def attributes(self) -> dict[str, bool]:
        """Per-attribute verdicts, only for attributes the prompt asked for (size and position only when
        some object names one; a two-object prompt's left/right order counts as position)."""
        out = {"background": self.background, "count": self.count,
               "colour": all(v.colour for v in self.objects), "shape": all(v.shape for v in self.objects)}
        for name in ("size", "position"):
            asked = [getattr(v, name) for v in self.objects if getattr(v, name) is not None]
            if asked:
                out[name] = all(asked)
        return out


def as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A square uint8 [S, S, 3] array, checked (a PIL image is converted to RGB)."""
    array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1]:
        raise ValueError(f"expected a square uint8 image [S, S, 3], got {array.dtype} {list(array.shape)}")
    if array.shape[0] < 4 * BORDER:
        raise ValueError(f"image of side {array.shape[0]} is too small to judge")
    return array


def analyse(image: np.ndarray | Image.Image) -> SceneAnalysis:
    """Background and objects of an image (see the module docstring for the method)."""
    pixels = as_array(image).astype(np.float64)
    size = pixels.shape[0]
    border = np.ones((size, size), dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(pixels[border], axis=0)
    distances = np.linalg.norm(_BACKGROUND_RGB - background, axis=1)
    nearest = int(np.argmin(distances))
    labels, foreground, coverage = _classify_pixels(pixels, background)
    objects = _objects(labels, foreground, coverage)
    return SceneAnalysis(size, (float(background[0]), float(background[1]), float(background[2])),
                         _BACKGROUND_NAMES[nearest], float(distances[nearest]), objects)


def _classify_pixels(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Palette index per pixel [S, S], the foreground mask [S, S] and each colour's coverage [K, S, S].

    A pixel v (relative to the background) is explained by colour c as alpha * d_c, d_c = c - background,
    alpha = <v, d_c> / |d_c|^2 clipped to [0, 1]; the colour with the smallest residual wins (so an
    anti-aliased blue-on-white edge is blue, though its raw RGB is nearer purple), and the pixel is
    foreground when |v| >= |d_c| / 2: at least half way from the background to its colour.
    """
    size = pixels.shape[0]
    v = pixels.reshape(-1, 3) - background  # [P, 3]
    d = _PALETTE - background  # [K, 3]
    norms = np.maximum((d**2).sum(axis=1), 1.0)
    alpha = np.clip(v @ d.T / norms, 0.0, 1.0)  # [P, K]
    residual = np.linalg.norm(v[:, None, :] - alpha[..., None] * d[None], axis=2)
    best = np.argmin(residual, axis=1)
    foreground = np.linalg.norm(v, axis=1) >= 0.5 * np.sqrt(norms[best])
    return best.reshape(size, size), foreground.reshape(size, size), alpha.T.reshape(-1, size, size)


def _objects(labels: np.ndarray, foreground: np.ndarray, coverage: np.ndarray) -> tuple[DetectedObject, ...]:
    """Connected parts per colour (8-connected); solid ones are objects, thin or tiny ones merge into the
    object they touch most, or are dropped as noise when they touch none."""
    solid: list[tuple[int, np.ndarray]] = []
    fringe: list[np.ndarray] = []
    for k in range(len(_PALETTE_NAMES)):
        parts, count = ndimage.label(foreground & (labels == k), structure=_EIGHT)
        for i in range(1, count + 1):
            part = parts == i
            if part.sum() >= MIN_AREA and ndimage.binary_erosion(part, structure=_EIGHT).sum() >= 4:
                solid.append((k, part))
            else:
                fringe.append(part)
    masks = [part.copy() for _, part in solid]
    for part in fringe:
        grown = ndimage.binary_dilation(part, structure=_EIGHT)
        contact = [int((grown & mask).sum()) for mask in masks]
        if contact and max(contact) > 0:
            masks[int(np.argmax(contact))] |= part
    found = []
    for (k, _), mask in zip(solid, masks, strict=True):
        # the colour's coverage on the object and on the background around it (not on other objects): a
        # blur moves coverage outwards but keeps its sum; weak coverage (< SOFT_FLOOR) is noise, not shape
        near = ndimage.binary_dilation(mask, structure=_EIGHT, iterations=SOFT_MARGIN) & ((labels == k) | ~foreground)
        # coverage is relative to the palette colour: an object drawn in a jittered or washed-out tone is
        # full where its core is, so rescale by the median coverage of the core
        core = ndimage.binary_erosion(mask, structure=_EIGHT)
        full = max(float(np.median(coverage[k][core if core.any() else mask])), 0.5)
        level = np.clip(coverage[k] / full, 0.0, 1.0)
        soft = np.where((near | mask) & (level >= SOFT_FLOOR), level, 0.0)
        found.append(_describe(_PALETTE_NAMES[k], ndimage.binary_fill_holes(mask), soft))
    return tuple(sorted(found, key=lambda o: -o.area))


def _describe(colour: str, mask: np.ndarray, soft: np.ndarray) -> DetectedObject:
    """Measurements of one object from its mask [S, S] (taper) and its soft coverage [S, S] (the rest)."""
    rows = np.flatnonzero(mask.any(axis=1))
    box = mask[rows[0] : rows[-1] + 1]
    band = max(1, round(len(box) / 4))
    widths = box.sum(axis=1).astype(np.float64)
    taper = float(widths[:band].mean() / max(widths[-band:].mean(), 1.0))
    if not soft.any():  # a faint smudge: no coverage above the noise floor, so measure the mask itself
        soft = mask.astype(np.float64)
    along_x, along_y = soft.max(axis=0), soft.max(axis=1)  # [S] each
    width, height = float(along_x.sum()), float(along_y.sum())
    centres = np.arange(len(along_x)) + 0.5
    centre = (float(along_x @ centres / width), float(along_y @ centres / height))
    fill = float(soft.sum()) / (width * height)
    aspect = min(width, height) / max(width, height)
    return DetectedObject(colour, int(mask.sum()), (width, height), centre, fill, taper, aspect,
                          classify_shape(fill, taper, aspect), mask)


def classify_shape(fill: float, taper: float, aspect: float) -> str | None:
    """circle / square / triangle from mask features, None for a blob that is none of them.

    taper = mean row width of the top quarter / of the bottom quarter of the mask: an apex-up triangle has
    0.12-0.24 on clean renders (0.48 at most under a 1.5 px blur), circles and squares >= 0.69. fill =
    soft area / (width * height): ideally circle pi/4 = 0.785 and square 1.0; clean renders measure
    0.77-0.80 and 1.0, under a 1 px blur with noise 0.73-0.80 and >= 0.88, so the cut is 0.83. All three
    shapes have a square box (aspect >= 0.89 measured), a long blob is no shape.
    """
    if aspect < MIN_ASPECT:
        return None
    if taper < TRIANGLE_TAPER:
        return "triangle"
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return None


def judge(image: np.ndarray | Image.Image, spec: PromptSpec) -> Judgement:
    """Judge one image [S, S, 3] uint8 against what `spec` asks."""
    return judge_analysis(analyse(image), spec)


def judge_analysis(analysis: SceneAnalysis, spec: PromptSpec) -> Judgement:
    """`judge` on an image analysed already (one analysis, many prompts: the validation's mismatches)."""
    background = (analysis.background == spec.background
                  and analysis.background_distance <= BACKGROUND_TOLERANCE)
    used: set[int] = set()
    verdicts = tuple(_judge_object(analysis, expected, used) for expected in spec.objects)
    return Judgement(spec, analysis, background, len(analysis.objects) == len(spec.objects), verdicts)


def _judge_object(analysis: SceneAnalysis, expected: ExpectedObject, used: set[int]) -> ObjectVerdict:
    """The largest unused object of the expected colour; failing that, the largest unused one (on the
    expected side for two-object prompts), so that shape, size and position are judged on their own."""
    size = analysis.size
    unused = [i for i in range(len(analysis.objects)) if i not in used]
    same_colour = [i for i in unused if analysis.objects[i].colour == expected.colour]
    on_side = [i for i in unused if _side(analysis.objects[i], size) == expected.side]
    candidates = same_colour or on_side or unused
    if not candidates:
        return ObjectVerdict(expected, None, False, False, False if expected.size else None,
                             False if expected.position or expected.side else None)
    pick = candidates[0]
    used.add(pick)
    found = analysis.objects[pick]
    size_ok = None if expected.size is None else size_matches(found.side / size, expected.size)
    if expected.side is not None:
        position_ok: bool | None = _side(found, size) == expected.side
    else:
        position_ok = None if expected.position is None else position_matches(found.centre, size, expected.position)
    return ObjectVerdict(expected, found, bool(same_colour), found.shape == expected.shape, size_ok, position_ok)


def _side(obj: DetectedObject, size: int) -> str:
    return "left" if obj.centre[0] < size / 2 else "right"


def size_matches(side_fraction: float, size: str | None) -> bool:
    """Whether a side (fraction of the image side) fits the named size, `SIZE_TOLERANCE_PX` each way
    (pixels of the grammar's 64-px image: on other sizes the tolerance scales with the image)."""
    lo, hi = SIZE_RANGES[size]
    tol = SIZE_TOLERANCE_PX / 64
    return lo - tol <= side_fraction <= hi + tol


def position_matches(centre: tuple[float, float], size: int, position: str) -> bool:
    """Whether a centre (x, y) in pixels obeys data_shapes' rule for `position`, `POSITION_TOLERANCE` on
    every bound."""
    x, y = centre[0] / size, centre[1] / size
    tol = POSITION_TOLERANCE
    mid = (0.40 - tol, 0.60 + tol)
    if position == "center":
        return all(0.45 - tol <= t <= 0.55 + tol for t in (x, y))
    rules = {"left": (x <= 0.38 + tol, y), "right": (x >= 0.62 - tol, y),
             "top": (y <= 0.38 + tol, x), "bottom": (y >= 0.62 - tol, x)}
    if position not in rules:
        raise ValueError(f"unknown position {position!r}")
    along, across = rules[position]
    return bool(along) and mid[0] <= across <= mid[1]


@dataclass(frozen=True)
class JudgeValidation:
    """How the judge does on ground truth, and how often it rejects a caption that is wrong in one way."""

    n: int
    accuracy: float  # clean renders vs their own captions
    attribute_accuracy: dict[str, float]
    degraded_accuracy: float  # renders blurred (sigma 1 px) with noise (sigma 8), vs their captions
    rejection: dict[str, float]  # mismatch kind -> fraction judged not correct
    mismatches: dict[str, int]  # mismatch kind -> how many were tried


def validate_judge(n: int = 2000, seed: int = 1234, *, progress: bool = True) -> JudgeValidation:
    """Judge `n` ground-truth scenes (data_shapes stream `seed`) against their captions, and against
    captions with one attribute changed.

    Mismatches: colour (one object's colour -> one absent from the scene), shape (one object's shape ->
    another), size (small <-> large; sized scenes only), position (another position; two-object scenes:
    the two objects swapped, i.e. the wrong left/right order). With n=2000, seed=1234: ground truth
    100.0 % correct (every attribute 100 %), degraded renders 100.0 %; rejected: colour 100 % (of 2000),
    shape 100 % (2000), size 100 % (791), position 99.8 % (1806; the 3 misses are objects in a corner
    where two positions' tolerant bounds meet: a "top" object centred at (0.599, 0.377) is also "right").
    Harsher damage (500 scenes): blur 1.5 px + noise 12 98.8 % (squares read as circles), blur 2 px
    99.8 %, blur 1 px + noise 8 + a colour cast of +-25 99.8 %.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    right, degraded_right = 0, 0
    attributes: dict[str, list[bool]] = {}
    rejected: dict[str, list[bool]] = {"colour": [], "shape": [], "size": [], "position": []}
    for index in tqdm(range(n), desc="validate judge", unit="scene", disable=not progress):
        scene = scene_at(seed, index)
        image = render(scene)
        analysis = analyse(image)
        verdict = judge_analysis(analysis, parse_prompt(scene.caption))
        right += verdict.correct
        for name, ok in verdict.attributes().items():
            attributes.setdefault(name, []).append(ok)
        degraded_right += judge(degrade(image, rng), parse_prompt(scene.caption)).correct
        for kind, caption in mismatched_captions(scene, rng).items():
            rejected[kind].append(not judge_analysis(analysis, parse_prompt(caption)).correct)
    return JudgeValidation(
        n, right / n, {k: float(np.mean(v)) for k, v in attributes.items()}, degraded_right / n,
        {k: float(np.mean(v)) if v else float("nan") for k, v in rejected.items()},
        {k: len(v) for k, v in rejected.items()},
    )


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 1.0, noise: float = 8.0) -> np.ndarray:
    """A render made to look generated: Gaussian blur (`blur` px) and Gaussian pixel noise (`noise`)."""
    soft = ndimage.gaussian_filter(image.astype(np.float64), (blur, blur, 0))
    degraded: np.ndarray = np.clip(np.rint(soft + rng.normal(0.0, noise, image.shape)), 0, 255).astype(np.uint8)
    return degraded


def mismatched_captions(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Captions that are wrong about the scene in exactly one attribute, by kind (size and position only
    where the scene's caption names them; two-object scenes get the objects swapped as position)."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    absent = [c for c in COLOURS if c not in {o.colour for o in objects}]
    others = [s for s in SHAPES if s != objects[i].shape]
    pairs = [(o.colour, str(o.shape)) for o in objects]

    def caption(pairs: list[tuple[str, str]], size: str | None = scene.size,
                position: str | None = scene.position) -> str:
        if len(pairs) == 2:
            return pair_caption(pairs[0], pairs[1], scene.background)
        return single_caption(pairs[0][0], pairs[0][1], size, position, scene.background)

    recoloured, reshaped = list(pairs), list(pairs)
    recoloured[i] = (absent[rng.integers(len(absent))], pairs[i][1])
    reshaped[i] = (pairs[i][0], others[rng.integers(len(others))])
    out = {"colour": caption(recoloured), "shape": caption(reshaped)}
    if len(pairs) == 2:
        out["position"] = caption(pairs[::-1])
    elif scene.position is not None:
        moved = [p for p in POSITIONS if p not in (None, scene.position)]
        out["position"] = caption(pairs, position=moved[rng.integers(len(moved))])
    if scene.size is not None:
        out["size"] = caption(pairs, size="large" if scene.size == "small" else "small")
    return out
