"""Conditioning encoders for the paper's other tasks (§3.3, §4.3): layouts and semantic maps, and the checked
inputs they take.

- `LayoutEncoder` (layout-to-image, cross-attention): a layout is a *set* of boxes; each box becomes one
  token, the sum of a class embedding and four quantised-coordinate embeddings (x0, y0, x1, y1 in
  `coord_bins` bins), then a small pre-LayerNorm transformer with a final LayerNorm, as the paper's
  tau_theta for layouts. Unlike the original's three tokens per box in a fixed order (class, top-left,
  bottom-right, with position embeddings), one token per box and no position embeddings make the
  encoding independent of the order the boxes are listed in. The sequence always has `1 + max_boxes`
  tokens: a learned "layout" token (always present, so no row of the attention mask is empty), then the
  boxes, then learned "empty" tokens; the encoder's self-attention masks the empty slots out as keys.
  The null layout of classifier-free guidance is the empty one (every slot empty).
  With `raster_channels` > 0 the encoder also draws the layout as a spatial input for concatenation (the
  paper's second mechanism, as for semantic maps): a multi-hot box map [N, K+1, H, W] (channel k+1: inside a
  box of class k; channel 0: outside every box; all zeros for the empty layout, the null of guidance) ->
  space-to-depth by f -> two 1x1 convolutions -> [N, C, H/f, W/f]. Through cross-attention alone a small
  UNet must learn to route each token to its region from the queries' weak sense of position; the raster
  hands it the where, the tokens the exact coordinates (measured: 45 % of objects right after 354k samples
  with tokens only, see models/zoo/shapes-layout/MODEL_CARD.md). Its convolutions have the shapes of a
  `SemanticEncoder`'s, so a semantic model can start them (`init_partial`).
- `SemanticEncoder` (semantic synthesis, concatenation): a label map [N, H, W] (0 = background, 1..K =
  classes) -> one-hot [N, K+1, H, W] -> space-to-depth by the first stage's factor f (lossless: every
  pixel's label reaches the latent cell it lies in) -> two 1x1 convolutions -> [N, C, H/f, W/f], stacked on
  the latent. The original's SpatialRescaler (bilinear downsampling + a 1x1 conv) loses where inside a
  cell a boundary runs; at f=4 and 13-pixel objects that is a third of an object. The null map of
  guidance is a map of -1 ("unknown"): its one-hot is all zeros, so the encoder outputs its learned bias.
- Inputs from users (JSON boxes, PNG label maps) are checked here, once, with errors that name the bad
  part (`ConditionError`, a ValueError): the pipeline, the CLI and the service all go through these.

This module imports nothing else of the model library but its layers, so models/conditioners.py can import
its configs without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.layers import Linear
from models.names import normalise_name

#: label map value of a pixel with no known label: the null map of classifier-free guidance
UNKNOWN_LABEL = -1


class ConditionError(ValueError):
    """A condition (label, box, layout, label map) that the model cannot take; the message says why."""


# ------------------------------------------------------------------------------------------- labels


def resolve_label(value: object, class_names: Sequence[str], n_classes: int, what: str = "label") -> int:
    """A class id 0..n_classes-1 from an int, a decimal string or a class name (case and spaces forgiven)."""
    if isinstance(value, bool):  # bool is an int subclass: True is not class 1
        raise ConditionError(f"{what}: expected a class name or id, got {value!r}")
    if isinstance(value, int | np.integer):
        label = int(value)
    elif isinstance(value, str):
        text = normalise_name(value)
        names = [normalise_name(n) for n in class_names]
        if text in names:
            return names.index(text)
        try:
            label = int(text)
        except ValueError:
            known = f"known: {', '.join(class_names)}" if class_names else f"this model takes ids 0..{n_classes - 1}"
            raise ConditionError(f"{what}: unknown class {value!r}; {known}") from None
    else:
        raise ConditionError(f"{what}: expected a class name or id, got {type(value).__name__}")
    if not 0 <= label < n_classes:
        raise ConditionError(f"{what}: class id {label} is outside 0..{n_classes - 1}")
    return label


# ------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Box:
    """One object of a layout: class id `label` and its bounding box in [0, 1] image coordinates (x to the
    right, y down; x0 < x1, y0 < y1)."""

    label: int
    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if isinstance(self.label, bool) or not isinstance(self.label, int) or self.label < 0:
            raise ConditionError(f"box label must be a class id >= 0, got {self.label!r}")
        coords = self.coords
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
            raise ConditionError(f"box coordinates must be finite numbers, got {list(coords)}")
        if not all(0.0 <= v <= 1.0 for v in coords):
            raise ConditionError(f"box {list(coords)} is not inside the image: coordinates must lie in [0, 1]")
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ConditionError(f"box {list(coords)} is empty or inverted: need x0 < x1 and y0 < y1")

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def check_layout(boxes: Sequence[Box], n_classes: int, max_boxes: int) -> None:
    if len(boxes) > max_boxes:
        raise ConditionError(f"a layout holds at most {max_boxes} boxes for this model, got {len(boxes)}")
    for i, box in enumerate(boxes):
        if not isinstance(box, Box):
            raise ConditionError(f"layout box {i}: expected a Box, got {type(box).__name__}")
        if box.label >= n_classes:
            raise ConditionError(f"layout box {i}: class id {box.label} is outside 0..{n_classes - 1}")


def parse_layout(data: object, class_names: Sequence[str], n_classes: int, max_boxes: int) -> list[Box]:
    """Boxes from JSON-like data: a list of {"label": name or id, "box": [x0, y0, x1, y1]} (or {"boxes": that
    list}), coordinates in [0, 1]. Every error names the box it is about."""
    if isinstance(data, Mapping) and set(data) == {"boxes"}:
        data = data["boxes"]
    if not isinstance(data, list):
        raise ConditionError('a layout is a list of {"label": ..., "box": [x0, y0, x1, y1]} objects '
                             '(or {"boxes": [...]})')
    boxes = []
    for i, item in enumerate(data):
        where = f"layout box {i}"
        if not isinstance(item, Mapping) or set(item) != {"label", "box"}:
            raise ConditionError(f'{where}: expected {{"label": ..., "box": [x0, y0, x1, y1]}}, got {item!r}')
        coords = item["box"]
        if not isinstance(coords, list | tuple) or len(coords) != 4:
            raise ConditionError(f"{where}: box must be 4 numbers [x0, y0, x1, y1] in [0, 1], got {coords!r}")
        label = resolve_label(item["label"], class_names, n_classes, where)
        try:
            boxes.append(Box(label, *coords))
        except ConditionError as err:
            raise ConditionError(f"{where}: {err}") from None
    check_layout(boxes, n_classes, max_boxes)
    return boxes


def layout_to_json(boxes: Sequence[Box], class_names: Sequence[str] = ()) -> list[dict[str, object]]:
    """The inverse of `parse_layout` (labels by name when names are given)."""
    return [{"label": class_names[b.label] if class_names else b.label, "box": [round(v, 6) for v in b.coords]}
            for b in boxes]


def pack_layouts(layouts: Sequence[Sequence[Box]], max_boxes: int) -> tuple[Tensor, Tensor]:
    """Layouts -> (boxes [N, max_boxes, 4] float, labels [N, max_boxes] long, -1 = empty slot)."""
    boxes = torch.zeros(len(layouts), max_boxes, 4)
    labels = torch.full((len(layouts), max_boxes), -1, dtype=torch.long)
    for i, layout in enumerate(layouts):
        if len(layout) > max_boxes:
            raise ConditionError(f"a layout holds at most {max_boxes} boxes for this model, got {len(layout)}")
        for j, box in enumerate(layout):
            boxes[i, j] = torch.tensor(box.coords)
            labels[i, j] = box.label
    return boxes, labels


# ----------------------------------------------------------------------------------------- label maps


def label_map_array(image: Image.Image | np.ndarray | Tensor, n_classes: int) -> np.ndarray:
    """A label map [H, W] int64 with values 0..n_classes (0 = background) from a single-channel PNG image
    (mode L, P (palette indices), I or I;16) or an integer array; anything else is a ConditionError."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "P", "I", "I;16"):
            raise ConditionError(
                f"a label map is a single-channel image (PNG mode L or P) whose pixel values are labels "
                f"(0 = background, 1..{n_classes} = classes), got a mode {image.mode} image")
        array = np.asarray(image)
    else:
        array = image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ConditionError(f"a label map is a 2-D integer array [H, W], got {array.dtype} {list(array.shape)}")
    if array.size == 0:
        raise ConditionError("the label map is empty")
    array = array.astype(np.int64)
    bad = np.unique(array[(array < 0) | (array > n_classes)])
    if bad.size:
        raise ConditionError(f"label map values must be 0 (background) .. {n_classes}, found unknown label(s) "
                             f"{bad[:8].tolist()}")
    return array


def label_map_image(array: np.ndarray, palette: Sequence[tuple[int, int, int]] = ()) -> Image.Image:
    """A label map as a mode-P PNG image: pixel values are the labels, `palette[k]` the colour label k shows
    as (a gray ramp where not given), so the file is exact and still looks like the scene."""
    if array.ndim != 2 or array.min() < 0 or array.max() > 255:
        raise ConditionError("a label map image holds a 2-D map of labels 0..255")
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    colours = list(palette) + [(v, v, v) for v in range(len(palette), 256)]
    image.putpalette([c for rgb in colours[:256] for c in rgb])
    return image


# ------------------------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class LayoutEncoderConfig:
    """Layout tau_theta: `max_boxes` box tokens (+1 layout token) of `width`, `depth` pre-LN blocks; with
    `raster_channels` > 0 also a box map of that many concat channels at 1/`raster_downsample` resolution (=
    the first stage's f), through a `raster_hidden`-wide 1x1 convolution."""

    max_boxes: int = 8
    coord_bins: int = 64
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    raster_channels: int = 0
    raster_hidden: int = 64
    raster_downsample: int = 4

    def __post_init__(self) -> None:
        if self.max_boxes < 1 or self.coord_bins < 2 or self.depth < 0 or self.heads < 1:
            raise ValueError(f"LayoutEncoderConfig: bad sizes {self}")
        if self.raster_channels < 0 or self.raster_hidden < 1 or self.raster_downsample < 1:
            raise ValueError(f"LayoutEncoderConfig: bad raster sizes {self}")
        if self.width % self.heads:
            raise ValueError(f"LayoutEncoderConfig: width {self.width} is not divisible by {self.heads} heads")


@dataclass(frozen=True)
class SemanticEncoderConfig:
    """Label map -> `channels` concat channels at 1/`downsample` resolution (= the first stage's f)."""

    channels: int = 8
    hidden: int = 64
    downsample: int = 4

    def __post_init__(self) -> None:
        if self.channels < 1 or self.hidden < 1 or self.downsample < 1:
            raise ValueError(f"SemanticEncoderConfig: sizes must be positive, got {self}")


class MaskedBlock(nn.Module):
    """Pre-LayerNorm transformer block whose self-attention skips masked keys: x + attn(ln1(x)), x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(Linear(width, mlp_ratio * width), nn.GELU(), Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, keys: Tensor) -> Tensor:
        """x [N, L, D]; keys [N, L] bool, True = a key every token may attend to."""
        n, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [N, h, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        x = x + self.proj(out.transpose(1, 2).reshape(n, length, width))
        mlp: Tensor = self.mlp(self.norm2(x))
        return x + mlp


class LayoutEncoder(nn.Module):
    """Boxes -> context [N, 1 + max_boxes, width] for the UNet's cross-attention (see the module docstring)."""

    def __init__(self, n_classes: int, config: LayoutEncoderConfig, class_names: Sequence[str] = ()) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"LayoutEncoder needs n_classes >= 1, got {n_classes}")
        self.n_classes, self.config, self.class_names = n_classes, config, tuple(class_names)
        w = config.width
        self.class_emb = nn.Embedding(n_classes, w)
        self.coord_emb = nn.ModuleList(nn.Embedding(config.coord_bins, w) for _ in range(4))  # x0, y0, x1, y1
        self.special = nn.Embedding(2, w)  # 0: the layout token, 1: an empty slot
        self.blocks = nn.ModuleList(MaskedBlock(w, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        self.context_dim = w
        for emb in (self.class_emb, *self.coord_emb, self.special):
            nn.init.normal_(emb.weight, std=0.02)
        if config.raster_channels:
            f = config.raster_downsample
            self.raster_in = nn.Conv2d((n_classes + 1) * f * f, config.raster_hidden, 1)
            self.raster_out = nn.Conv2d(config.raster_hidden, config.raster_channels, 1)

    @property
    def has_raster(self) -> bool:
        return self.config.raster_channels > 0

    def forward(self, boxes: Tensor, labels: Tensor) -> Tensor:
        """boxes [N, max_boxes, 4] in [0, 1]; labels [N, max_boxes] long, -1 = empty slot -> [N, 1 + max_boxes, D]."""
        n, slots = labels.shape
        if slots != self.config.max_boxes or boxes.shape != (n, slots, 4):
            raise ConditionError(f"layout tensors must be [N, {self.config.max_boxes}, 4] and [N, "
                                 f"{self.config.max_boxes}], got {list(boxes.shape)} and {list(labels.shape)}")
        bins = self.config.coord_bins
        real = labels >= 0  # [N, B]
        q = (boxes.float().clamp(0, 1) * bins).long().clamp(max=bins - 1)  # [N, B, 4]
        tokens = self.class_emb(labels.clamp(min=0)) + sum(emb(q[..., i]) for i, emb in enumerate(self.coord_emb))
        tokens = torch.where(real[..., None], tokens, self.special.weight[1])  # [N, B, D]
        x = torch.cat([self.special.weight[0].expand(n, 1, -1), tokens], dim=1)  # [N, 1 + B, D]
        keys = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # [N, 1 + B]
        for block in self.blocks:
            x = block(x, keys)
        out: Tensor = self.norm(x)
        return out

    def box_maps(self, boxes: Tensor, labels: Tensor, height: int, width: int) -> Tensor:
        """Multi-hot box maps [N, K+1, height, width]: channel k+1 marks the pixels whose centre lies in a box of
        class k, channel 0 those outside every box; an empty layout (the null) is all zeros."""
        device = boxes.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        b = boxes.float()[..., None, None]  # [N, B, 4, 1, 1]
        inside = ((xs >= b[:, :, 0]) & (xs <= b[:, :, 2]) & (ys[:, None] >= b[:, :, 1])
                  & (ys[:, None] <= b[:, :, 3]))  # [N, B, H, W]
        real = labels >= 0
        inside &= real[..., None, None]
        one_hot = F.one_hot(labels.clamp(min=0), self.n_classes).to(torch.float32)  # [N, B, K]
        classes = torch.einsum("nbk,nbhw->nkhw", one_hot, inside.float()).clamp(max=1)
        outside = (~inside.any(dim=1) & real.any(dim=1)[:, None, None]).float()[:, None]  # [N, 1, H, W]
        return torch.cat([outside, classes], dim=1)

    def raster(self, boxes: Tensor, labels: Tensor, height: int, width: int) -> Tensor:
        """Concat channels [N, raster_channels, height/f, width/f] of layouts at an image size in pixels."""
        if not self.has_raster:
            raise ConditionError("this layout encoder has no raster (raster_channels is 0)")
        f = self.config.raster_downsample
        if height % f or width % f:
            raise ConditionError(f"image size {width}x{height} is not a multiple of {f}")
        maps = self.box_maps(boxes, labels, height, width).to(self.raster_in.weight.dtype)
        out: Tensor = self.raster_out(F.silu(self.raster_in(F.pixel_unshuffle(maps, f))))
        return out

    def encode_layouts(self, layouts: Sequence[Sequence[Box]],
                       size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """Checked layouts (the empty one is the null layout) -> (context [N, 1 + max_boxes, D], raster concat
        channels at `size` = (height, width) in pixels, or None without a raster)."""
        for layout in layouts:
            check_layout(layout, self.n_classes, self.config.max_boxes)
        boxes, labels = pack_layouts(layouts, self.config.max_boxes)
        device = self.class_emb.weight.device
        boxes, labels = boxes.to(device), labels.to(device)
        if not self.has_raster:
            return self(boxes, labels), None
        if size is None:
            raise ValueError("a layout encoder with a raster needs the image size")
        return self(boxes, labels), self.raster(boxes, labels, *size)

    def encode(self, prompts: Sequence[str]) -> NoReturn:
        raise ConditionError("a layout-to-image model is conditioned on boxes, not on a prompt (use layout2img)")


class SemanticEncoder(nn.Module):
    """Label maps [N, H, W] (-1 = unknown) -> concat channels [N, C, H/f, W/f] (see the module docstring)."""

    def __init__(self, n_classes: int, config: SemanticEncoderConfig, class_names: Sequence[str] = ()) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"SemanticEncoder needs n_classes >= 1, got {n_classes}")
        self.n_classes, self.config, self.class_names = n_classes, config, tuple(class_names)
        f = config.downsample
        self.proj_in = nn.Conv2d((n_classes + 1) * f * f, config.hidden, 1)
        self.proj_out = nn.Conv2d(config.hidden, config.channels, 1)

    def forward(self, maps: Tensor) -> Tensor:
        f = self.config.downsample
        if maps.ndim != 3 or maps.shape[1] % f or maps.shape[2] % f:
            raise ConditionError(f"label maps must be [N, H, W] with H and W multiples of {f}, got {list(maps.shape)}")
        one_hot = F.one_hot(maps.long().clamp(min=UNKNOWN_LABEL) + 1, self.n_classes + 2)[..., 1:]  # -1 -> zeros
        x = one_hot.permute(0, 3, 1, 2).to(self.proj_in.weight.dtype)  # [N, K+1, H, W]
        x = F.pixel_unshuffle(x, f)  # [N, (K+1) f^2, H/f, W/f]
        out: Tensor = self.proj_out(F.silu(self.proj_in(x)))
        return out

    def encode_maps(self, maps: Sequence[Image.Image | np.ndarray | Tensor]) -> Tensor:
        """Checked label maps of one size -> concat channels [N, C, H/f, W/f]."""
        out: Tensor = self(label_map_tensor(maps, self.n_classes).to(self.proj_in.weight.device))
        return out

    def null(self, n: int, height: int, width: int) -> Tensor:
        """The null condition of guidance: the encoding of all-unknown maps, [N, C, H/f, W/f]."""
        maps = torch.full((n, height, width), UNKNOWN_LABEL, dtype=torch.long, device=self.proj_in.weight.device)
        out: Tensor = self(maps)
        return out

    def encode(self, prompts: Sequence[str]) -> NoReturn:
        raise ConditionError("a semantic-synthesis model is conditioned on a label map, not on a prompt "
                             "(use semantic2img)")


def label_map_tensor(maps: Sequence[Image.Image | np.ndarray | Tensor], n_classes: int) -> Tensor:
    """Checked label maps of one size stacked as [N, H, W] long."""
    arrays = [label_map_array(m, n_classes) for m in maps]
    if not arrays:
        raise ConditionError("no label maps given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConditionError(f"label maps of one batch must share a size, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays))
