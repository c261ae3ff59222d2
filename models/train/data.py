"""Where the training loops get their images: one config, two sources (procedural shapes, an image folder).

Both are read by global sample index (`batch(first, count)`), so step s of a run always sees samples
s*B .. s*B+B-1 and a resumed run sees exactly the data an uninterrupted one would.

The paper's other conditionings read `batch_with_conditions`, whose per-item `SceneConditions`
`condition_tensors` packs for one kind: class labels, layouts or label maps (shapes; a folder has class
labels only, from its metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from models.conditioning import pack_layouts
from models.names import ConditionKind
from models.train.data_shapes import PAIR_PROBABILITY, SceneConditions, ShapesDataset

#: what a diffusion model is conditioned on: text (captions), class labels, layouts, label maps, or nothing


@dataclass(frozen=True)
class DataConfig:
    #: shapes = the procedural captioned-shapes stream; folder = images + metadata.jsonl under `path`
    kind: Literal["shapes", "folder"] = "shapes"
    path: str | None = None
    size: int = 64
    seed: int = 0
    #: images kept out of training for evaluation (folder: the last ones of a fixed permutation;
    #: shapes: a separate stream with seed + 1)
    holdout: int = 256
    crop: Literal["center", "random"] = "center"
    #: shapes: the probability of a two-object scene (0 = single objects only, the class-conditional data)
    pair_probability: float = PAIR_PROBABILITY

    def __post_init__(self) -> None:
        if not 0.0 <= self.pair_probability <= 1.0:
            raise ValueError(f"data.pair_probability must be within [0, 1], got {self.pair_probability}")
        if self.kind == "folder" and not self.path:
            raise ValueError("data.kind 'folder' needs data.path")
        if self.kind == "shapes" and self.size != 64:
            raise ValueError("the shapes dataset is 64x64 (data.size must be 64)")


class ImageSource(Protocol):
    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]: ...


class ConditionedSource(ImageSource, Protocol):
    def batch_with_conditions(self, first: int, count: int) -> tuple[torch.Tensor, list[str],
                                                                      list[SceneConditions]]: ...


class _FolderSource:
    def __init__(self, dataset: object) -> None:
        self.dataset = dataset

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]:
        images, texts, _labels = self.dataset.batch(first, count)  # type: ignore[attr-defined]
        return images, texts

    def batch_with_conditions(self, first: int, count: int) -> tuple[torch.Tensor, list[str],
                                                                      list[SceneConditions]]:
        """Class labels from the metadata (-1 = none given); a folder has no layouts or label maps."""
        images, texts, labels = self.dataset.batch(first, count)  # type: ignore[attr-defined]
        empty = np.zeros((0, 0), dtype=np.uint8)
        return images, texts, [SceneConditions(int(k) if k >= 0 else None, (), empty) for k in labels.tolist()]


def make_sources(config: DataConfig) -> tuple[ConditionedSource, ConditionedSource]:
    """(training source, held-out source)."""
    if config.kind == "shapes":
        p = config.pair_probability
        return ShapesDataset(config.seed, pair_probability=p), ShapesDataset(config.seed + 1, pair_probability=p)
    from models.train.data_folder import ImageFolderDataset

    dataset = ImageFolderDataset(Path(str(config.path)), size=config.size, crop=config.crop, seed=config.seed)
    if len(dataset) < 2:
        raise ValueError(f"{config.path}: training needs at least 2 images (one is held out for evaluation)")
    train, held = dataset.split(min(config.holdout, max(1, len(dataset) // 10)))
    return _FolderSource(train), _FolderSource(held)


def condition_tensors(conditions: list[SceneConditions], kind: ConditionKind, max_boxes: int = 0
                      ) -> dict[str, torch.Tensor]:
    """Per-item conditions of one kind as tensors: class -> {"labels": [N] long}; layout -> {"boxes": [N, B, 4],
    "box_labels": [N, B] long, -1 = empty slot}; semantic -> {"maps": [N, H, W] uint8}; text, none -> {}."""
    if kind == "class":
        missing = [i for i, c in enumerate(conditions) if c.class_id is None]
        if missing:
            raise ValueError(f"class-conditional training needs a class label on every image; item(s) {missing[:5]} "
                             "have none (shapes: two-object scenes, set data.pair_probability: 0; a folder: give "
                             "every metadata line a label)")
        return {"labels": torch.tensor([c.class_id for c in conditions], dtype=torch.long)}
    if kind == "layout":
        if any(c.label_map.size == 0 for c in conditions):
            raise ValueError("layout-to-image training needs the shapes data (an image folder has no boxes)")
        boxes, labels = pack_layouts([c.layout for c in conditions], max_boxes)
        return {"boxes": boxes, "box_labels": labels}
    if kind == "semantic":
        if any(c.label_map.size == 0 for c in conditions):
            raise ValueError("semantic-map training needs the shapes data (an image folder has no label maps)")
        return {"maps": torch.from_numpy(np.stack([c.label_map for c in conditions]))}
    return {}
