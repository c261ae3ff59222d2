"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors a prompt names, put in place of the
token embeddings of that name.

Files, as AUTOMATIC1111 and diffusers write them (read with `weights_only=True`: no pickled code runs):
- A1111 `.pt` / `.bin`: a dict with `string_to_param: {"*": [n, D]}` (and `name`, `step`, ... which we ignore);
- A1111 `.safetensors`: `emb_params` [n, D];
- diffusers `learned_embeds.bin` / `.safetensors`: `{token: [D] or [n, D]}`, one token;
- SDXL (two text encoders): `clip_l` [n, 768] and `clip_g` [n, 1280], one vector set per encoder.

A prompt uses an embedding by name, as A1111 does: the file's stem (`my-style` for my-style.pt), also written
`<my-style>`, and a diffusers file's token (`<cat-toy>`). Names are matched on tokens, not characters (A1111's
`EmbeddingDatabase.find_embedding_at_position`): the name's own CLIP tokens, the longest name first, so
`my-style` inside another word does not match. An n-vector embedding takes n token positions, each with the
weight of the text around it; the encoder then runs as usual (position embeddings added, causal attention).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.tensor_files import open_tensor_file

log = logging.getLogger(__name__)
SUFFIXES = (".pt", ".bin", ".safetensors")
#: the key of an SD 1/2 embedding's vectors (one text encoder)
SINGLE = ""


class EmbeddingError(ValueError):
    """A file that is not a textual-inversion embedding of a known layout; the message names it."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding: its names in prompts and its vectors by text encoder ([n, D] each; SINGLE for SD 1/2,
    `clip_l` / `clip_g` for SDXL)."""

    names: tuple[str, ...]
    vectors: Mapping[str, Tensor]

    @property
    def count(self) -> int:
        """Token positions it takes."""
        return next(iter(self.vectors.values())).shape[0]


def _as_matrix(tensor: Any, what: str) -> Tensor:
    if not isinstance(tensor, Tensor) or tensor.ndim not in (1, 2) or not tensor.is_floating_point():
        raise EmbeddingError(f"{what}: expected a float tensor [D] or [n, D], got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}")
    return tensor.detach().float().reshape(-1, tensor.shape[-1]).contiguous()


def _read(path: Path) -> Mapping[str, Any]:
    if path.suffix.lower() == ".safetensors":
        return open_tensor_file(path).read_all()
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals, bad zips, truncation
        raise EmbeddingError(f"{path}: not a readable embedding file ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def read_embedding(path: str | Path) -> Embedding:
    """The embedding in one file, in any of the layouts of the module docstring. EmbeddingError otherwise."""
    path = Path(path)
    data = _read(path)
    stem = path.stem
    names = [stem, f"<{stem}>"]
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor, got "
                                 f"{list(params) if isinstance(params, Mapping) else type(params).__name__}")
        vectors = {SINGLE: _as_matrix(next(iter(params.values())), f"{path}: string_to_param")}
    elif "emb_params" in data:  # A1111 .safetensors
        vectors = {SINGLE: _as_matrix(data["emb_params"], f"{path}: emb_params")}
    elif set(data) == {"clip_l", "clip_g"}:  # SDXL
        vectors = {k: _as_matrix(data[k], f"{path}: {k}") for k in ("clip_l", "clip_g")}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingError(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors, clip_g "
                                 f"{vectors['clip_g'].shape[0]}: they must take the same token positions")
    elif len(data) == 1 and isinstance(next(iter(data.values())), Tensor):  # diffusers learned_embeds
        token, tensor = next(iter(data.items()))
        vectors = {SINGLE: _as_matrix(tensor, f"{path}: {token}")}
        names.append(token)
    else:
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params, "
                             f"clip_l + clip_g, or one {{token: tensor}}), has keys {sorted(map(str, data))[:6]}")
    return Embedding(tuple(dict.fromkeys(names)), vectors)


@dataclass
class EmbeddingDB:
    """Embeddings for one CLIP text encoder (`key`: SINGLE, or `clip_l` / `clip_g` of SDXL), found by the token
    ids of their names. `encode` is the encoder's tokenizer's `encode` (text -> ids, no begin/end tokens)."""

    width: int
    key: str = SINGLE
    _by_first: dict[int, list[tuple[tuple[int, ...], Tensor]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, embedding: Embedding, encode: Any) -> bool:
        """Register an embedding under its names; False (and noted in `skipped`) when it is not for this encoder."""
        vectors = embedding.vectors.get(self.key)
        if vectors is None or vectors.shape[-1] != self.width:
            shapes = {k: tuple(v.shape) for k, v in embedding.vectors.items()}
            self.skipped.append(f"{embedding.names[0]} (vectors {shapes}; this text encoder takes width {self.width})")
            return False
        for name in embedding.names:
            ids = tuple(encode(name))
            if ids:
                entries = self._by_first.setdefault(ids[0], [])
                entries[:] = [e for e in entries if e[0] != ids]  # a later file of one name wins
                entries.append((ids, vectors))
                entries.sort(key=lambda e: -len(e[0]))  # the longest name first
        return True

    def __len__(self) -> int:
        return len({id(v) for entries in self._by_first.values() for _, v in entries})

    def find(self, tokens: Sequence[int], position: int) -> tuple[Tensor, int] | None:
        """The embedding whose name's tokens start at `position`: (its vectors [n, D], tokens of the name)."""
        for ids, vectors in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return vectors, len(ids)
        return None


def embedding_files(folder: Path) -> Iterable[Path]:
    """The embedding files of a folder and its subfolders (as A1111 scans), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def load_embeddings(folder: str | Path, width: int, encode: Any, key: str = SINGLE) -> EmbeddingDB:
    """Every embedding of `folder` for a text encoder of `width` (`encode`: its tokenizer's). Files of another
    width or layout are skipped and logged by name; an unreadable file is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"{folder}: no such embeddings folder")
    db = EmbeddingDB(width, key)
    for path in embedding_files(folder):
        db.add(read_embedding(path), encode)
    if db.skipped:
        log.warning("embeddings not for this model, skipped: %s", "; ".join(db.skipped))
    return db


def load_embeddings_dir(folder: str | Path, model: Any) -> tuple[EmbeddingDB, ...]:
    """`load_embeddings` for each CLIP text encoder of `model` (a LatentDiffusion), in the encoders' order: one
    for SD 1/2; for SDXL the `clip_l` and `clip_g` vectors of its files (the refiner: `clip_g`). EmbeddingError
    when the model has no CLIP text encoder (or no tokenizer to find names with)."""
    from models.text.clip import CLIPTextConditioner
    from models.text.sdxl import SDXLTextConditioner

    conditioner = model.conditioner
    if isinstance(conditioner, SDXLTextConditioner):  # its tokenizers find the names (missing ones are named)
        widths = [c.hidden_size for c in conditioner.config.encoders]
        return tuple(load_embeddings(folder, width, tokenizer.encode, key)
                     for width, tokenizer, key in zip(widths, conditioner.require_tokenizers(),
                                                      conditioner.embedding_keys, strict=True))
    if not isinstance(conditioner, CLIPTextConditioner) or conditioner.tokenizer is None:
        raise EmbeddingError(f"{folder}: textual-inversion embeddings need a CLIP text encoder with a tokenizer; "
                             f"model {model.config.name!r} has {type(conditioner).__name__}")
    return (load_embeddings(folder, conditioner.context_dim, conditioner.tokenizer.encode),)
