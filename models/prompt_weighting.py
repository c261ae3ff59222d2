"""AUTOMATIC1111's prompt syntax for CLIP text encoders: emphasis, BREAK and prompts past 77 tokens.

Written from the syntax's documentation (the A1111 wiki, "Attention/emphasis" and "Infinite prompt
length"), not from its code:
- `(text)` multiplies the attention to `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies
  it by 1.3; they nest and multiply; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; brackets
  left open apply to the end of the prompt; a `:weight)` outside round brackets is plain text.
- `BREAK` (upper case, a word on its own) ends the current 75-token chunk.
- The tokens are cut into chunks of 75; when a chunk fills up, and a comma is among its last 20
  tokens, the tokens after that comma move to the next chunk. Each chunk becomes begin + 75 tokens
  (padded) + end, is encoded alone, and the contexts are concatenated: [1, 77 * chunks, D].
- Each token's hidden state is multiplied by its weight, then the chunk is rescaled so that the mean
  of all its values is what it was before weighting.

A1111 takes that mean over every prompt it encodes together; here it is taken per prompt, so a prompt
encodes the same alone or in a batch (A1111's numbers at batch size 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from models.text.clip import CLIPTextConditioner
from models.tokenizers import CLIPTokenizer

EMPHASIS = 1.1
CHUNK = 75  # tokens between the begin and end tokens of one 77-token encoder input
COMMA_BACKTRACK = 20
BREAK = "BREAK"

#: one token of the syntax: an escape, an opening bracket, `:weight)`, a closing bracket, or plain text
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class _Span:
    text: str
    weight: float


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, neighbours of equal weight merged; ("BREAK", -1) marks a BREAK.

    "a (red:1.5) [circle]" -> [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("circle", 1/1.1)]."""
    spans: list[_Span] = []
    open_round: list[int] = []  # index of the first span inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for span in spans[start:]:
            span.weight *= factor

    for match in _TOKEN.finditer(prompt):
        piece, number = match[0], match[1]
        if piece.startswith("\\") and len(piece) == 2:
            spans.append(_Span(piece[1], 1.0))
        elif piece == "(":
            open_round.append(len(spans))
        elif piece == "[":
            open_square.append(len(spans))
        elif number is not None and open_round:
            scale_from(open_round.pop(), float(number))
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), EMPHASIS)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), 1 / EMPHASIS)
        else:  # plain text (a lone closing bracket or colon included), split at BREAKs
            for i, part in enumerate(_BREAK.split(piece)):
                spans.extend([_Span(BREAK, -1.0), _Span(part, 1.0)] if i else [_Span(part, 1.0)])
    for start, factor in [*((r, EMPHASIS) for r in open_round), *((q, 1 / EMPHASIS) for q in open_square)]:
        scale_from(start, factor)
    return _merged(spans or [_Span("", 1.0)])


def _merged(spans: list[_Span]) -> list[tuple[str, float]]:
    """Neighbouring runs of equal weight joined (a BREAK never joins anything)."""
    merged: list[_Span] = []
    for span in spans:
        if merged and merged[-1].weight == span.weight and BREAK not in (span.text, merged[-1].text):
            merged[-1].text += span.text
        else:
            merged.append(_Span(span.text, span.weight))
    return [(s.text, s.weight) for s in merged]


@dataclass(frozen=True)
class Chunk:
    """One encoder input: ids and weights [CHUNK + 2], begin and end tokens included (weight 1)."""

    ids: list[int]
    weights: list[float]


def chunk_prompt(prompt: str, tokenizer: CLIPTokenizer) -> list[Chunk]:
    """The prompt's chunks (see the module docstring); an empty prompt is one chunk of padding."""
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        chunks.append(Chunk([tokenizer.bos_id, *ids, *[tokenizer.pad_id] * pad, tokenizer.eos_id],
                            [1.0, *weights, *[1.0] * pad, 1.0]))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_emphasis(prompt):
        if weight == -1.0 and text == BREAK:
            close()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close()
                ids, weights = moved, moved_weights
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def encode_weighted(conditioner: CLIPTextConditioner, prompt: str) -> Tensor:
    """Context [1, 77 * chunks, D] of one prompt in A1111's syntax (see the module docstring)."""
    if conditioner.tokenizer is None:
        raise ValueError("the CLIP text encoder has no tokenizer (--tokenizer DIR)")
    device = next(conditioner.parameters()).device
    contexts = []
    for chunk in chunk_prompt(prompt, conditioner.tokenizer):
        z = conditioner.transformer(torch.tensor([chunk.ids], device=device))  # [1, 77, D]
        weights = torch.tensor(chunk.weights, device=device, dtype=z.dtype)[None, :, None]
        weighted = z * weights
        contexts.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(contexts, dim=1)
