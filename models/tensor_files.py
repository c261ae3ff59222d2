"""Weight files read one tensor at a time, into memory the model then owns.

Why not `safetensors.torch.load_file`: it hands out tensors backed by one memory map of the whole file.
Every page a tensor touches then counts in the process's resident set for as long as *any* tensor of
that file lives, so each weight that is converted after loading (a dtype change, channels_last, the
CPU path's prepacked convolutions) is held twice: the converted copy and the mapped original. Here a
tensor is read with plain file reads into a fresh buffer, converted to the wanted dtype on its own, and
the file is never mapped: page cache is not resident memory of the process, and the peak of a load is
the model in its final dtype plus the one tensor being converted.

Safetensors files are parsed here (an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}` and `__metadata__`, then the raw little-endian data); `.ckpt` /
`.bin` pickles are read whole with `torch.load(weights_only=True)`, which never runs pickled code, and
each tensor is released as it is consumed.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import pickle
import re
import struct
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

#: safetensors dtype names (the format's spec) -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own bound: a larger header is a corrupt file
_CHUNK_BYTES = 4 * 2**20  # the read buffer of a converting read


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file and which keys."""


def converted(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point (what `Module.to(dtype)` converts), else unchanged."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


class TensorFile:
    """One weights file: every tensor's shape and dtype up front (`meta`, on the meta device, no data),
    the data of one tensor on request (`read`)."""

    def __init__(self, path: Path, meta: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.path = path
        self.meta = meta
        self.metadata = metadata

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key` in memory of its own (no file mapping), floating point converted to `dtype`."""
        raise NotImplementedError

    def map(self, key: str) -> torch.Tensor:
        """Tensor `key` as stored, its pages read only when touched where the format allows (see
        SafetensorsFile.map); here, `read`."""
        return self.read(key)

    def read_all(self) -> StateDict:
        return {key: self.read(key) for key in self.meta}


class SafetensorsFile(TensorFile):
    def __init__(self, path: Path) -> None:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise self._corrupt(path, f"{size} bytes, no header")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise self._corrupt(path, f"header of {length} bytes in a file of {size}")
            try:
                header: dict[str, Any] = json.loads(fh.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise self._corrupt(path, f"header is not JSON: {err}") from None
        self._start = 8 + length
        self._buffers = threading.local()  # for converting reads: one per reading thread, made on its first
        metadata = header.pop("__metadata__", None) or {}
        self._spans: dict[str, tuple[int, int]] = {}
        meta: dict[str, torch.Tensor] = {}
        for key, entry in header.items():
            meta[key] = self._entry(path, key, entry, size - self._start)
        super().__init__(path, meta, {str(k): str(v) for k, v in metadata.items()})

    @staticmethod
    def _corrupt(path: Path, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({why})")

    def _entry(self, path: Path, key: str, entry: Any, data_size: int) -> torch.Tensor:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise self._corrupt(path, f"tensor {key!r}: bad header entry {entry!r} ({type(err).__name__})") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise self._corrupt(path, f"tensor {key!r}: bytes {begin}..{end} of {data_size}, {nbytes} expected")
        self._spans[key] = (begin, end)
        return torch.empty(shape, dtype=dtype, device="meta")

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Straight into the tensor when no conversion is asked; else through one small buffer the file
        keeps, chunk by chunk into the converted tensor (`copy_` rounds as `.to` does): no full-precision
        copy of even one tensor is made, and nothing is freed during a load, so the allocator leaves no
        holes behind (a buffer per tensor, freed each time, left ~20 % of an fp16 model resident as holes).
        Safe to call from several threads at once (each read opens the file; each thread has its buffer)."""
        spec = self.meta[key]
        begin, _ = self._spans[key]
        out = torch.empty(spec.shape, dtype=converted(spec, dtype).dtype)
        flat = out.reshape(-1)  # a view: `out` is contiguous
        with self.path.open("rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            if out.dtype == spec.dtype:
                self._read_into(fh, key, flat.view(torch.uint8))
                return out
            step = _CHUNK_BYTES // spec.itemsize
            buffer: torch.Tensor | None = getattr(self._buffers, "chunk", None)
            if buffer is None:
                buffer = self._buffers.chunk = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
            for first in range(0, flat.numel(), step):
                n = min(step, flat.numel() - first)
                chunk = buffer[: n * spec.itemsize]
                self._read_into(fh, key, chunk)
                flat[first : first + n].copy_(chunk.view(spec.dtype))
        return out

    def map(self, key: str) -> torch.Tensor:
        """Tensor `key` backed by a private (copy-on-write) map of its own bytes: a page is read when first
        touched, so a lookup table of which a run uses a few rows (CLIP's 49408-token embedding, 145 MB)
        costs only those rows. The map is the tensor's alone, so nothing else keeps it resident."""
        spec = self.meta[key]
        begin, end = self._spans[key]
        if end == begin:
            return self.read(key)
        offset = self._start + begin
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        with self.path.open("rb") as fh:
            mapped = mmap.mmap(fh.fileno(), offset - aligned + end - begin, offset=aligned, access=mmap.ACCESS_COPY)
        # frombuffer holds the map for as long as the tensor lives
        flat = torch.frombuffer(mapped, dtype=spec.dtype, count=spec.numel(), offset=offset - aligned)
        return flat.reshape(spec.shape)

    def _read_into(self, fh: io.FileIO, key: str, target: torch.Tensor) -> None:
        view = target.numpy().data  # a memoryview of the tensor's own bytes
        done = 0
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                raise self._corrupt(self.path, f"tensor {key!r} ends early")
            done += n


class PickledFile(TensorFile):
    """A `.ckpt` / `.bin` state dict; torch.load reads it whole, `read` releases each tensor it returns."""

    def __init__(self, path: Path) -> None:
        self._tensors = _unpickled_state_dict(path)
        meta = {k: torch.empty_like(v, device="meta") for k, v in self._tensors.items()}
        super().__init__(path, meta, {})

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return converted(self._tensors.pop(key), dtype)


class InMemoryFile(TensorFile):
    """Tensors already in memory behind the file interface (converted from another layout, or a pickle read
    whole); `read` releases each tensor it returns."""

    def __init__(self, path: Path, tensors: StateDict) -> None:
        self._tensors = tensors
        super().__init__(path, {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}, {})

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return converted(self._tensors.pop(key), dtype)


class ShardedFile(TensorFile):
    """A model saved in shards (`diffusion_pytorch_model.safetensors.index.json` beside
    `diffusion_pytorch_model-00001-of-00003.safetensors`, ...): diffusers and transformers split weights over 10 GB
    (5 GB for transformers) so, and the index's `weight_map` names each tensor's shard. Read as one file."""

    def __init__(self, path: Path) -> None:
        try:
            index = json.loads(path.read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a shard index (a JSON object with a weight_map): {err}") from err
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path}: its weight_map is empty or not an object")
        self._shards: dict[str, TensorFile] = {}
        for name in sorted(set(weight_map.values())):
            shard = path.parent / str(name)
            if Path(str(name)).name != str(name):
                raise CheckpointError(f"{path}: shard {name!r} is not a file name beside the index")
            self._shards[name] = open_tensor_file(shard)
        self._where: dict[str, TensorFile] = {}
        meta: dict[str, torch.Tensor] = {}
        for key, name in weight_map.items():
            shard_file = self._shards[name]
            if key not in shard_file.meta:
                raise CheckpointError(f"{path}: tensor {key!r} is mapped to {name}, which does not hold it")
            self._where[key], meta[key] = shard_file, shard_file.meta[key]
        metadata = {k: str(v) for k, v in (index.get("metadata") or {}).items()}
        super().__init__(path, meta, metadata)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._where[key].read(key, dtype)

    def map(self, key: str) -> torch.Tensor:
        return self._where[key].map(key)


def open_tensor_file(path: Path) -> TensorFile:
    """A weights file by its suffix (`.safetensors`, `.index.json` for shards, else a torch pickle); a clear error
    for anything unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name.lower().endswith(".index.json"):
        return ShardedFile(path)
    if path.suffix.lower() == ".safetensors":
        if sys.byteorder != "little":
            raise CheckpointError(f"{path}: safetensors data is little-endian and this machine is not")
        return SafetensorsFile(path)
    return PickledFile(path)


def _unpickled_state_dict(path: Path) -> StateDict:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only met a Python object that is not a tensor or container
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found[1]})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the file pickles Python objects{what} besides tensors, and .ckpt files are read "
            "with torch.load(weights_only=True), which never runs pickled code; re-save its state_dict only, "
            "or convert it to .safetensors with a tool you trust"
        ) from err
    except Exception as err:  # torch raises many types for bad zips and truncation
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({type(err).__name__}: {first_line})"
        ) from err
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return dict(data)
