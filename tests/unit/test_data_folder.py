"""The image-folder dataset: metadata.jsonl parsing, resize + crop, determinism of crops and batches, labels,
split, and a clear DatasetError (naming the file / line) for every kind of bad data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.train.data_folder import DatasetError, ImageFolderDataset


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose every pixel differs, so a wrong crop offset or resample changes the tensor."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.broadcast_to((x + y) / 2, (height, width, 1))], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_metadata(root: Path, records: list[dict[str, Any]] | list[str]) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_folder(root: Path, n: int = 6, labels: bool = True, size: tuple[int, int] = (48, 40)) -> Path:
    """`n` noise PNGs img{i}.png with text "image i" and (optionally) label i % 3."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        noise(*size, seed=i).save(root / f"img{i}.png")
        record: dict[str, Any] = {"file_name": f"img{i}.png", "text": f"image {i}"}
        if labels:
            record["label"] = i % 3
        records.append(record)
    write_metadata(root, records)
    return root


# --- metadata -------------------------------------------------------------------------------------------------


def test_metadata_parsing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    gradient(40, 40).save(tmp_path / "a.png")
    gradient(40, 40).save(tmp_path / "sub" / "b.jpg", quality=95)
    write_metadata(tmp_path, ['{"file_name": "a.png", "text": "a red thing", "label": 2}', "", "   ",
                              '{"file_name": "sub/b.jpg", "label": 0, "extra": [1, 2]}'])
    ds = ImageFolderDataset(tmp_path, size=32)
    assert len(ds) == 2  # blank lines are skipped
    assert [ds[0]["text"], ds[1]["text"]] == ["a red thing", ""]  # text absent -> ""
    assert [ds[0]["label"], ds[1]["label"]] == [2, 0]
    assert ds.num_classes == 3


def test_unlabelled_folder(tmp_path: Path) -> None:
    ds = ImageFolderDataset(make_folder(tmp_path, n=4, labels=False), size=16)
    assert ds.num_classes == 0
    assert all(ds[i]["label"] == -1 for i in range(len(ds)))
    _, _, labels = ds.batch(0, 5)
    assert labels.dtype == torch.long and labels.tolist() == [-1] * 5


# --- resize and crop ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wh", [(100, 50), (50, 100), (10, 20), (32, 32), (33, 200)])
def test_shape_dtype_and_range(tmp_path: Path, wh: tuple[int, int]) -> None:
    gradient(*wh).save(tmp_path / "x.png")
    write_metadata(tmp_path, [{"file_name": "x.png"}])
    for crop in ("center", "random"):
        image = ImageFolderDataset(tmp_path, size=32, crop=crop)[0]["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert image.min() < -0.5 and image.max() > 0.5  # a gradient spans the range: not normalised to [0, 1]


@pytest.mark.parametrize(("wh", "resized", "method"), [
    ((120, 80), (48, 32), Image.Resampling.LANCZOS),  # shrinking
    ((20, 16), (40, 32), Image.Resampling.BICUBIC),  # enlarging
    ((50, 32), (50, 32), None),  # shorter side already right: no resampling at all
])
def test_resize_shorter_side_then_center_crop(tmp_path: Path, wh: tuple[int, int], resized: tuple[int, int],
                                              method: Image.Resampling | None) -> None:
    source = gradient(*wh)
    source.save(tmp_path / "x.png")
    write_metadata(tmp_path, [{"file_name": "x.png"}])
    scaled = source if method is None else source.resize(resized, method)
    left, top = (resized[0] - 32) // 2, (resized[1] - 32) // 2
    expected = np.asarray(scaled.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1
    got = ImageFolderDataset(tmp_path, size=32)[0]["image"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_center_crop_keeps_the_middle(tmp_path: Path) -> None:
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:, 32:64] = 255  # white middle third, black sides
    Image.fromarray(pixels).save(tmp_path / "x.png")
    write_metadata(tmp_path, [{"file_name": "x.png"}])
    assert torch.all(ImageFolderDataset(tmp_path, size=32)[0]["image"] == 1.0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    image = gradient(40, 40)
    image = image.convert("L").convert(mode) if mode == "I;16" else image.convert(mode)
    name = "x.jpg" if mode == "CMYK" else "x.png"
    image.save(tmp_path / name)
    write_metadata(tmp_path, [{"file_name": name}])
    out = ImageFolderDataset(tmp_path, size=32)[0]["image"]
    assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
    if mode in ("L", "LA"):
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_pixels_become_white(tmp_path: Path, mode: str) -> None:
    pixels = np.zeros((32, 32, 4), np.uint8)  # black, and fully transparent on the left half
    pixels[..., 3] = 255
    pixels[:, :16, 3] = 0
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":  # the same as palette entry 1 transparent (a tRNS chunk); its stored colour must not show
        image = Image.new("P", (32, 32), 0)
        image.putpalette([0, 0, 0, 10, 20, 30])
        image.paste(1, (0, 0, 16, 32))
        image.info["transparency"] = 1
    image.save(tmp_path / "x.png")
    write_metadata(tmp_path, [{"file_name": "x.png"}])
    out = ImageFolderDataset(tmp_path, size=32)[0]["image"]
    assert torch.all(out[:, :, :16] == 1.0) and torch.all(out[:, :, 16:] == -1.0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 16:32] = 255  # stored landscape: a white column band left of centre
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed portrait, the band a row band above centre
    Image.fromarray(pixels).save(tmp_path / "x.jpg", exif=exif, quality=100)
    write_metadata(tmp_path, [{"file_name": "x.jpg"}])
    rows = ImageFolderDataset(tmp_path, size=32)[0]["image"].mean(dim=(0, 2))  # center crop: displayed rows 16..47
    assert rows[:16].min() > 0.8 and rows[16:].max() < -0.8


# --- determinism -----------------------------------------------------------------------------------------------


def test_random_crop_is_deterministic_per_seed_and_index(tmp_path: Path) -> None:
    root = make_folder(tmp_path, n=3, size=(96, 80))
    a = ImageFolderDataset(root, size=32, crop="random", seed=5)
    b = ImageFolderDataset(root, size=32, crop="random", seed=5)
    other = ImageFolderDataset(root, size=32, crop="random", seed=6)
    for i in range(3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["image"], a[i]["image"])
    assert any(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(3))
    center = ImageFolderDataset(root, size=32, crop="center")
    assert any(not torch.equal(a[i]["image"], center[i]["image"]) for i in range(3))


def test_center_crop_does_not_depend_on_seed(tmp_path: Path) -> None:
    root = make_folder(tmp_path, n=2, size=(96, 80))
    assert torch.equal(ImageFolderDataset(root, size=32, seed=1)[1]["image"],
                       ImageFolderDataset(root, size=32, seed=2)[1]["image"])


def test_batch_is_a_permutation_per_epoch(tmp_path: Path) -> None:
    ds = ImageFolderDataset(make_folder(tmp_path, n=8), size=16, seed=3)
    images, texts, labels = ds.batch(0, 24)
    assert images.shape == (24, 3, 16, 16) and labels.shape == (24,) and labels.dtype == torch.long
    epochs = [texts[0:8], texts[8:16], texts[16:24]]
    for epoch in epochs:
        assert sorted(epoch) == sorted(f"image {i}" for i in range(8))  # every item exactly once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled each epoch
    for k, text in enumerate(texts):  # image, text and label stay together
        i = int(text.split()[1])
        assert labels[k] == i % 3 and torch.equal(images[k], ds[i]["image"])


def test_batch_is_random_access_by_global_index(tmp_path: Path) -> None:
    root = make_folder(tmp_path, n=5, size=(40, 56))
    ds = ImageFolderDataset(root, size=32, crop="random", seed=1)
    images, texts, labels = ds.batch(0, 15)
    for first, count in [(3, 4), (4, 3), (9, 6), (14, 1)]:  # within and across epoch boundaries
        part = ImageFolderDataset(root, size=32, crop="random", seed=1).batch(first, count)  # a "resumed" run
        assert torch.equal(part[0], images[first:first + count])
        assert part[1] == texts[first:first + count] and torch.equal(part[2], labels[first:first + count])
    assert ImageFolderDataset(root, size=32, crop="random", seed=2).batch(0, 15)[1] != texts


def test_random_crop_is_fresh_each_epoch(tmp_path: Path) -> None:
    root = make_folder(tmp_path, n=1, size=(200, 64))
    ds = ImageFolderDataset(root, size=32, crop="random")
    images, _, _ = ds.batch(0, 6)  # one image, six epochs
    assert torch.equal(images[0], ds[0]["image"])  # epoch 0 is what indexing gives
    assert len({tuple(im.flatten().tolist()) for im in images}) > 1


def test_batch_argument_errors(tmp_path: Path) -> None:
    ds = ImageFolderDataset(make_folder(tmp_path, n=2), size=16)
    with pytest.raises(ValueError, match="count"):
        ds.batch(0, 0)
    with pytest.raises(ValueError, match="first"):
        ds.batch(-1, 2)
    with pytest.raises(IndexError):
        ds[2]


# --- split -----------------------------------------------------------------------------------------------------


def test_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path, n=10)
    ds = ImageFolderDataset(root, size=16, seed=4)
    train, held = ds.split(3)
    assert (len(train), len(held)) == (7, 3)
    names = {e.path.name for e in train.entries}
    held_names = {e.path.name for e in held.entries}
    assert not names & held_names and len(names | held_names) == 10
    assert {e.path.name for e in ImageFolderDataset(root, size=16, seed=4).split(3)[1].entries} == held_names
    assert any({e.path.name for e in ImageFolderDataset(root, size=16, seed=s).split(3)[1].entries} != held_names
               for s in range(5, 10))
    assert train.num_classes == held.num_classes == 3  # label space is the folder's, not the part's
    images, texts, _ = held.batch(0, 6)
    assert images.shape == (6, 3, 16, 16) and {t for t in texts} <= {e.text for e in held.entries}
    assert len(ds.split(0)[0]) == 10


@pytest.mark.parametrize("holdout", [10, 11, -1])
def test_split_rejects_bad_holdout(tmp_path: Path, holdout: int) -> None:
    with pytest.raises(ValueError, match="holdout"):
        ImageFolderDataset(make_folder(tmp_path, n=10), size=16).split(holdout)


def test_empty_part_cannot_batch(tmp_path: Path) -> None:
    _, held = ImageFolderDataset(make_folder(tmp_path, n=3), size=16).split(0)
    with pytest.raises(ValueError, match="empty"):
        held.batch(0, 1)


# --- bad data --------------------------------------------------------------------------------------------------


def test_dataset_error_is_a_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"crop": "middle"}, {"seed": -1}])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ImageFolderDataset(make_folder(tmp_path, n=1), **kwargs)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        ImageFolderDataset(tmp_path / "file")


def test_missing_metadata(tmp_path: Path) -> None:
    gradient(8, 8).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "metadata.jsonl")) + ".*does not exist"):
        ImageFolderDataset(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_metadata(tmp_path: Path, content: str) -> None:
    (tmp_path / "metadata.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "metadata.jsonl")) + ".*empty"):
        ImageFolderDataset(tmp_path)


def bad_line(tmp_path: Path, line: str, message: str, number: int = 3) -> None:
    """Metadata whose line `number` is `line` (the others fine) -> DatasetError naming that line and `message`."""
    tmp_path.mkdir(exist_ok=True)
    gradient(8, 8).save(tmp_path / "a.png")
    lines = ['{"file_name": "a.png", "label": 0}'] * (number - 1) + [line, '{"file_name": "a.png", "label": 0}']
    write_metadata(tmp_path, lines)
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(tmp_path)
    assert f"metadata.jsonl line {number}" in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


@pytest.mark.parametrize(("line", "message"), [
    ('{"file_name": "a.png", "label": 0', "invalid JSON"),
    ("not json at all", "invalid JSON"),
    ('["a.png", 0]', "JSON object"),
    ('{"text": "no file", "label": 0}', "missing 'file_name'"),
    ('{"file_name": "", "label": 0}', "missing 'file_name'"),
    ('{"file_name": 3, "label": 0}', "missing 'file_name'"),
    ('{"file_name": "nope.png", "label": 0}', r"nope\.png does not exist"),
    ('{"file_name": "a.png", "text": 5, "label": 0}', "'text' must be a string"),
    ('{"file_name": "../a.png", "label": 0}', r"'\.\./a\.png' points outside"),
])
def test_bad_metadata_line(tmp_path: Path, line: str, message: str) -> None:
    bad_line(tmp_path / "d", line, message)


def test_absolute_file_name(tmp_path: Path) -> None:
    gradient(8, 8).save(tmp_path / "outside.png")
    bad_line(tmp_path / "d", json.dumps({"file_name": str(tmp_path / "outside.png"), "label": 0}), "points outside")


def test_symlinked_images_are_fine(tmp_path: Path) -> None:
    """The Hugging Face cache layout: snapshot files are symlinks into a blobs/ folder outside the snapshot."""
    (tmp_path / "blobs").mkdir()
    gradient(40, 40).save(tmp_path / "blobs" / "abc123.png")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "a.png").symlink_to(tmp_path / "blobs" / "abc123.png")
    write_metadata(tmp_path / "snap", [{"file_name": "a.png", "text": "linked"}])
    assert ImageFolderDataset(tmp_path / "snap", size=32)[0]["text"] == "linked"


@pytest.mark.parametrize("label", ['"1"', "1.5", "1.0", "true", "null", "-1", "[1]"])
def test_non_integer_label(tmp_path: Path, label: str) -> None:
    bad_line(tmp_path, '{"file_name": "a.png", "label": ' + label + "}", "'label' must be a non-negative integer")


def test_labels_on_some_lines_only(tmp_path: Path) -> None:
    bad_line(tmp_path / "a", '{"file_name": "a.png"}', "'label' is missing here but given on earlier lines")
    gradient(8, 8).save(tmp_path / "a.png")
    write_metadata(tmp_path, ['{"file_name": "a.png"}', '{"file_name": "a.png"}', '{"file_name": "a.png", "label": 1}'])
    with pytest.raises(DatasetError, match="line 3: 'label' is given here but missing on earlier lines"):
        ImageFolderDataset(tmp_path)


def truncated_png(path: Path) -> None:
    noise(64, 64).save(path)  # noise barely compresses, so the cut lands inside the pixel data
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_jpeg(path: Path) -> None:
    noise(64, 64).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("name", "write"), [
    ("random.png", lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())),
    ("empty.png", lambda p: p.write_bytes(b"")),
    ("text.jpg", lambda p: p.write_text("this is not an image\n")),
    ("header_only.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)),
    ("truncated.png", truncated_png),
    ("truncated.jpg", truncated_jpeg),
])
def test_corrupt_image_names_the_file(tmp_path: Path, name: str, write: Any) -> None:
    noise(40, 40).save(tmp_path / "good.png")
    write(tmp_path / name)
    write_metadata(tmp_path, [{"file_name": "good.png"}, {"file_name": name}])
    ds = ImageFolderDataset(tmp_path, size=32)  # metadata is fine: decoding is lazy
    assert ds[0]["image"].shape == (3, 32, 32)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / name))):
        ds[1]
    with pytest.raises(DatasetError, match=re.escape(name)):
        ds.batch(0, 2)


def test_image_deleted_after_start(tmp_path: Path) -> None:
    ds = ImageFolderDataset(make_folder(tmp_path, n=2), size=16)
    (tmp_path / "img1.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "img1.png"))):
        ds[1]
