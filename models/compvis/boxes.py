"""The conditioner of the zoo's layout2img-openimages256 model: taming-transformers' bounding-box tokens
(`taming/data/conditional_builder/objects_bbox.py`, `ObjectsBoundingBoxConditionalBuilder`, and its base class in
`objects_center_points.py`) read by latent-diffusion's `BERTEmbedder(use_tokenizer=False)`, i.e. the
x-transformers encoder of models/compvis/bert.py fed with integer tokens instead of WordPiece ids.

A layout of boxes becomes `3 * max_objects + 2` tokens (92 for the zoo model: 30 objects; vocabulary 8192), the
builder's arithmetic, written again here from reading it:
- `sections = int(sqrt(no_tokens))` (90 for 8192) cells a side; `none = no_tokens - 1` (8191) pads empty slots;
- a point (x, y) in [0, 1] is the cell `int(round(y * (sections - 1))) * sections + int(round(x * (sections - 1)))`
  (Python's `round`, halves to even: 0.5 * 89 = 44.5 -> 44);
- each object is a triple (representation, token of its top-left corner, token of its bottom-right corner). Its
  box is taming's (x0, y0, w, h) with w = x1 - x0, h = y1 - y0 (as the OpenImages loader computes them from
  XMin/XMax), rescaled to the full crop (x0, y0 clamped to [0, 1]; w = min(w, 1 - x0), h = min(h, 1 - y0)), and
  the bottom-right corner is (x0 + w, y0 + h);
- representation = category number + no_object_classes * modifier, where the modifier's bits are OpenImages'
  IsGroupOf (1), IsOccluded (2), IsDepiction (4), IsInside (8). We take none of these flags, so the modifier is
  0 and the representation is the category number itself;
- the triples are padded with (none, none, none) to max_objects, then the crop is appended (`encode_crop`): at
  inference the full image (0, 0, 1, 1), whose tokens are cell(0, 0) = 0 and cell(1, 1) = sections^2 - 1 (8099).

Differences, on purpose: the original shuffles the objects (`random.shuffle` in `build`), so the model saw them in
every order; we keep the given order, so one layout always gives one token sequence. The original truncates a
layout of more than max_objects with a warning; we refuse it, and an empty layout too (the zoo model has no null
layout and is sampled without classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from models.compvis.bert import BERTEmbedderConfig, TransformerWrapper
from models.conditioning import Box, ConditionError

#: taming's OpenImages category count with its `top_300_classes_plus_coco_compatibility` allow list and its
#: `open_images_unify_categories_for_coco` mapping applied to class-descriptions-boxable.csv: 352 allowed names,
#: 12 ids mapped onto others, 340 categories
OPENIMAGES_CLASSES = 340


@dataclass(frozen=True)
class BoxTokensConfig:
    """ObjectsBoundingBoxConditionalBuilder(no_object_classes, no_max_objects, no_tokens, encode_crop, ...)."""

    no_tokens: int = 8192
    max_objects: int = 30
    n_classes: int = OPENIMAGES_CLASSES
    encode_crop: bool = True

    def __post_init__(self) -> None:
        if self.no_tokens < 4 or self.max_objects < 1 or self.n_classes < 1:
            raise ValueError(f"BoxTokensConfig: invalid sizes {self}")
        if self.n_classes > self.none:
            raise ValueError(f"BoxTokensConfig: {self.n_classes} classes do not fit below the padding token "
                             f"{self.none}")

    @property
    def sections(self) -> int:
        return int(math.sqrt(self.no_tokens))

    @property
    def none(self) -> int:
        return self.no_tokens - 1

    @property
    def length(self) -> int:
        """`embedding_dim` of the builder: 3 tokens per object slot, 2 for the crop."""
        return 3 * self.max_objects + (2 if self.encode_crop else 0)

    @classmethod
    def for_sequence(cls, max_seq_len: int, vocab_size: int, n_classes: int = OPENIMAGES_CLASSES) -> BoxTokensConfig:
        """The builder that fills a BERTEmbedder of `max_seq_len` (92 = 3 * 30 + 2: crop encoded)."""
        if max_seq_len < 5 or (max_seq_len - 2) % 3:
            raise ValueError(f"max_seq_len {max_seq_len} is not 3 * objects + 2 (box triples and the crop pair)")
        return cls(no_tokens=vocab_size, max_objects=(max_seq_len - 2) // 3, n_classes=n_classes, encode_crop=True)


def cell(config: BoxTokensConfig, x: float, y: float) -> int:
    """`tokenize_coordinates`: the grid cell of a point in [0, 1]^2."""
    s = config.sections - 1
    return int(round(y * s)) * config.sections + int(round(x * s))


def box_tokens(config: BoxTokensConfig, box: Box) -> tuple[int, int, int]:
    """One object's triple (see the module docstring)."""
    if box.label >= config.n_classes:
        raise ConditionError(f"box label {box.label} is outside the model's categories 0..{config.n_classes - 1}")
    x0, y0, w, h = box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0
    x0, y0 = min(max(x0, 0.0), 1.0), min(max(y0, 0.0), 1.0)
    w, h = min(w, 1 - x0), min(h, 1 - y0)
    return box.label, cell(config, x0, y0), cell(config, x0 + w, y0 + h)


def layout_tokens(config: BoxTokensConfig, boxes: Sequence[Box]) -> list[int]:
    """A layout's whole token sequence (length `config.length`)."""
    if not boxes:
        raise ConditionError("a layout for this model needs at least one box (it has no empty layout)")
    if len(boxes) > config.max_objects:
        raise ConditionError(f"a layout holds at most {config.max_objects} boxes for this model, got {len(boxes)}")
    triples = [box_tokens(config, b) for b in boxes]
    triples += [(config.none,) * 3] * (config.max_objects - len(triples))
    crop = [cell(config, 0.0, 0.0), cell(config, 1.0, 1.0)] if config.encode_crop else []
    return [t for triple in triples for t in triple] + crop


class BoxTokenConditioner(nn.Module):
    """Layouts -> tokens [N, L] -> context [N, L, width] (BERTEmbedder without its tokenizer)."""

    def __init__(self, encoder: BERTEmbedderConfig, boxes: BoxTokensConfig) -> None:
        super().__init__()
        if encoder.max_length != boxes.length or encoder.vocab_size != boxes.no_tokens:
            raise ValueError(f"box tokens ({boxes.length} of {boxes.no_tokens}) do not fit the encoder "
                             f"({encoder.max_length} positions, {encoder.vocab_size} embeddings)")
        self.boxes = boxes
        self.n_classes = boxes.n_classes
        self.max_boxes = boxes.max_objects
        self.context_dim = encoder.width
        self.transformer = TransformerWrapper(encoder)
        self.requires_grad_(False)

    def tokens(self, layouts: Sequence[Sequence[Box]]) -> Tensor:
        return torch.tensor([layout_tokens(self.boxes, layout) for layout in layouts], dtype=torch.long)

    def encode_layouts(self, layouts: Sequence[Sequence[Box]]) -> Tensor:
        ids = self.tokens(layouts).to(self.transformer.token_emb.weight.device)
        context: Tensor = self.transformer(ids)
        return context

    def encode(self, prompts: Sequence[str]) -> NoReturn:
        raise ConditionError("a layout-to-image model is conditioned on boxes, not on a prompt (use layout2img, "
                             "`ldm generate --layout`)")
