"""An image-folder dataset in the Hugging Face ``imagefolder`` layout: images plus ``metadata.jsonl``.

Each non-blank line of ``metadata.jsonl`` is ``{"file_name": "...", "text": "...", "label": <int>}``;
``text`` and ``label`` are optional, but a label must be given on every line or on none. The metadata is
checked eagerly (a typo should fail at start-up, not hours into a run); pixels are decoded lazily, so a
corrupt image surfaces as a `DatasetError` naming the file when it is first read.

Training loops read by global sample index (`ImageFolderDataset.batch`): sample ``k`` is item
``perm_e[k % n]`` of epoch ``e = k // n``, with a permutation fixed by (seed, e), so a resumed run sees
exactly the data an uninterrupted one would, without any sampler state in the checkpoint.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from models.train.data_shapes import to_model_tensor

METADATA = "metadata.jsonl"
Crop = Literal["center", "random"]

# First word of every random stream's seed, so the crop, order and split streams never coincide.
_CROP_STREAM, _ORDER_STREAM, _SPLIT_STREAM = 0, 1, 2


class DatasetError(ValueError):
    """Bad data on disk (metadata or image); the message names the offending path and, where known, line."""


class Item(TypedDict):
    image: torch.Tensor
    text: str
    label: int


@dataclass(frozen=True)
class Entry:
    path: Path
    text: str
    #: -1 when the dataset has no labels
    label: int


class ImageFolderDataset(Dataset[Item]):
    """Images under `root` listed by `root/metadata.jsonl`, as [3, size, size] tensors in [-1, 1]."""

    def __init__(self, root: Path, size: int = 64, crop: Crop = "center", seed: int = 0) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, not {size!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
        self.root = Path(root)
        self.size, self.crop, self.seed = size, crop, seed
        self.entries: list[Entry] = read_metadata(self.root)
        #: fixed by the whole folder, so a split's parts keep the same label space
        self._num_classes = max(e.label for e in self.entries) + 1
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_classes(self) -> int:
        """Size of the label space (max label + 1), 0 for an unlabelled folder."""
        return self._num_classes

    def __getitem__(self, index: int) -> Item:
        return self._item(index, epoch=0)

    def _item(self, index: int, epoch: int) -> Item:
        """Item `index`; a random crop is drawn from (seed, index, epoch), so each epoch sees a fresh but
        reproducible crop, and `self[i]` is epoch 0's."""
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.entries)} images")
        entry = self.entries[index]
        image = _resize_shorter_side(load_rgb(entry.path), self.size)
        if self.crop == "random":
            rng = np.random.default_rng([_CROP_STREAM, self.seed, index, epoch])
            left = int(rng.integers(0, image.width - self.size, endpoint=True))
            top = int(rng.integers(0, image.height - self.size, endpoint=True))
        else:
            left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        # np.array, not np.asarray: PIL's buffer is read-only, and torch.from_numpy warns on read-only arrays
        return {"image": to_model_tensor(np.array(image)), "text": entry.text, "label": entry.label}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation for `epoch`; the last one is kept because a batch rarely spans two epochs."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([_ORDER_STREAM, self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.entries)))
        return self._order[1]

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Global samples first..first+count-1 as (images [count,3,S,S], texts, labels [count] long)."""
        if first < 0 or count < 1:
            raise ValueError(f"batch needs first >= 0 and count >= 1, got first={first}, count={count}")
        if not self.entries:
            raise ValueError("batch() on an empty dataset (a split with holdout=0?)")
        n = len(self.entries)
        items = [self._item(int(self._epoch_order(k // n)[k % n]), epoch=k // n) for k in range(first, first + count)]
        images = torch.stack([it["image"] for it in items])
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return images, [it["text"] for it in items], labels

    def split(self, holdout: int) -> tuple[ImageFolderDataset, ImageFolderDataset]:
        """(train, held out): the held-out part is the last `holdout` entries of a permutation fixed by the
        seed, so the same folder and seed always hold out the same images. Parts keep metadata order."""
        if not 0 <= holdout < len(self.entries):
            raise ValueError(f"holdout must be in [0, {len(self.entries)}) for {self.root} "
                             f"({len(self.entries)} images), got {holdout}")
        order = np.random.default_rng([_SPLIT_STREAM, self.seed]).permutation(len(self.entries))
        cut = len(self.entries) - holdout
        return self._subset(sorted(order[:cut].tolist())), self._subset(sorted(order[cut:].tolist()))

    def _subset(self, indices: list[int]) -> ImageFolderDataset:
        part = copy.copy(self)
        part.entries = [self.entries[i] for i in indices]
        part._order = None
        return part


def read_metadata(root: Path) -> list[Entry]:
    """Parse and check `root/metadata.jsonl`: every listed file exists, labels are all there or all absent."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a directory")
    path = root / METADATA
    if not path.is_file():
        raise DatasetError(f"{path} does not exist (an image folder needs a {METADATA})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} could not be read: {exc}") from exc
    entries: list[Entry] = []
    labelled: bool | None = None  # whether the first line had a label; every other line must agree
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        entry, has_label = _parse_line(root, line, where)
        if labelled is None:
            labelled = has_label
        elif has_label != labelled:
            raise DatasetError(f"{where}: 'label' is {'given' if has_label else 'missing'} here but "
                               f"{'given' if labelled else 'missing'} on earlier lines; give it on all or none")
        entries.append(entry)
    if not entries:
        raise DatasetError(f"{path} lists no images (it is empty)")
    return entries


def _parse_line(root: Path, line: str, where: str) -> tuple[Entry, bool]:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    name = record.get("file_name")
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: missing 'file_name' (a non-empty string)")
    # Checked on the name, not the resolved path: the Hugging Face cache stores files as symlinks into blobs/.
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise DatasetError(f"{where}: file_name {name!r} points outside {root}")
    file = root / name
    if not file.is_file():
        raise DatasetError(f"{where}: image {file} does not exist")
    text = record.get("text", "")
    if not isinstance(text, str):
        raise DatasetError(f"{where}: 'text' must be a string, got {text!r}")
    if "label" not in record:
        return Entry(file, text, -1), False
    label = record["label"]
    # bool is an int subclass, and a float label (1.0) is almost always a bug upstream: both rejected.
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise DatasetError(f"{where}: 'label' must be a non-negative integer, got {label!r}")
    return Entry(file, text, label), True


def load_rgb(path: Path) -> Image.Image:
    """Decode every pixel (so truncation is found here, not in a later resize) and convert to RGB; transparent
    pixels are composited onto white, since their stored colour is arbitrary."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                    rgba = image.convert("RGBA")
                    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(white, rgba).convert("RGB")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"image {path} has too many pixels to decode: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"image {path} could not be decoded (corrupt, truncated or not an image: {exc})") from exc


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (LANCZOS when shrinking, to avoid aliasing; BICUBIC when enlarging)."""
    width, height = image.size
    short = min(width, height)
    if short == size:
        return image
    scale = size / short
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new, Image.Resampling.LANCZOS if short > size else Image.Resampling.BICUBIC)
