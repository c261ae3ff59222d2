"""Where the training loops get their images: one config, two sources (procedural shapes, an image folder).

Both are read by global sample index (`batch(first, count)`), so step s of a run always sees samples
s*B .. s*B+B-1 and a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from models.train.data_shapes import ShapesDataset


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

    def __post_init__(self) -> None:
        if self.kind == "folder" and not self.path:
            raise ValueError("data.kind 'folder' needs data.path")
        if self.kind == "shapes" and self.size != 64:
            raise ValueError("the shapes dataset is 64x64 (data.size must be 64)")


class ImageSource(Protocol):
    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]: ...


class _FolderSource:
    def __init__(self, dataset: object) -> None:
        self.dataset = dataset

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]:
        images, texts, _labels = self.dataset.batch(first, count)  # type: ignore[attr-defined]
        return images, texts


def make_sources(config: DataConfig) -> tuple[ImageSource, ImageSource]:
    """(training source, held-out source)."""
    if config.kind == "shapes":
        return ShapesDataset(config.seed), ShapesDataset(config.seed + 1)
    from models.train.data_folder import ImageFolderDataset

    dataset = ImageFolderDataset(Path(str(config.path)), size=config.size, crop=config.crop, seed=config.seed)
    if len(dataset) < 2:
        raise ValueError(f"{config.path}: training needs at least 2 images (one is held out for evaluation)")
    train, held = dataset.split(min(config.holdout, max(1, len(dataset) // 10)))
    return _FolderSource(train), _FolderSource(held)
