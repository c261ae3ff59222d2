"""AUTOMATIC1111's prompt syntax for CLIP text encoders: emphasis, BREAK, prompts past 77 tokens, embeddings.

The rules of A1111's modules/prompt_parser.py (`parse_prompt_attention`) and modules/sd_hijack_clip.py
(`tokenize_line`, `process_tokens`), re-implemented:
- `(text)` multiplies the attention to `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies
  it by 1.3; they nest and multiply; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters (a backslash
  before anything else is dropped); brackets left open apply to the end of the prompt; a `:weight)` outside
  round brackets is plain text; neighbouring runs of equal weight are joined.
- `BREAK` (upper case, a word on its own) ends the current 75-token chunk.
- Each run of text is tokenized on its own. The tokens are cut into chunks of 75; when a chunk fills up and a
  comma is among its last 20 tokens, the tokens after that comma move to the next chunk. A chunk becomes
  [begin, its tokens, end, padding...] (77 ids: SD 1 pads with the end token, SD 2 with its pad token after
  one end token), is encoded alone, and the contexts are concatenated: [1, 77 * chunks, D].
- A textual-inversion embedding named in the prompt (models/textual_inversion.py) takes as many positions as
  it has vectors, with its text's weight, and never straddles two chunks.
- Each token's hidden state is multiplied by its weight, then the chunk is rescaled so that the mean of all
  its values is what it was before weighting.

A1111 takes that mean over every prompt it encodes together; here it is taken per prompt, so a prompt
encodes the same alone or in a batch (A1111's numbers at batch size 1).

What the syntax also has and we do not do is refused by name rather than drawn as text: prompt editing
(`[from:to:when]`, `[to:when]`), alternation (`[a|b]`) and composable prompts (`a AND b`).

`plain` prompts (diffusers' behaviour) are the text as it is, truncated at 75 tokens with a warning; embeddings
are found in them too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from models.text.clip import CLIPTextConditioner, MissingTokenizerError
from models.text.sdxl import SDXLTextConditioner, SDXLTextEncoder
from models.textual_inversion import EmbeddingDB
from models.tokenizers import CLIPTokenizer

#: how prompts are read: A1111's syntax, or the text as it is (diffusers)
PromptSyntax = Literal["a1111", "plain"]
PROMPT_SYNTAXES: tuple[PromptSyntax, ...] = ("a1111", "plain")
EMPHASIS = 1.1
CHUNK = 75  # tokens between the begin and end tokens of one 77-token encoder input
COMMA_BACKTRACK = 20
BREAK = "BREAK"

#: one token of the syntax: an escape, an opening bracket, `:weight)`, a closing bracket, or plain text
#: (A1111's `re_attention`)
_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
#: prompt editing `[a:b:n]` / `[b:n]` and alternation `[a|b]` (innermost brackets), composable `AND`
_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*(?:\||:\s*[+-]?[.\d]+\s*\])[^\[\]]*\]?")
_AND = re.compile(r"\bAND\b")


class PromptSyntaxError(ValueError):
    """A prompt in A1111's syntax using a part of it we do not implement; the message names it."""


def check_supported(prompt: str) -> None:
    """PromptSyntaxError naming prompt editing, alternation or AND, which A1111 would not draw as text."""
    if m := _EDITING.search(prompt):
        raise PromptSyntaxError(f"prompt editing and alternation ({m[0]!r}) are not supported; escape the "
                                "brackets (\\[ \\]) to draw them as text")
    if _AND.search(prompt):
        raise PromptSyntaxError("composable prompts ('AND') are not supported; write 'and' to draw it as text")


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, neighbours of equal weight merged; ("BREAK", -1) marks a BREAK.

    "a (red:1.5) [circle]" -> [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("circle", 1/1.1)]."""
    res: list[list[str | float]] = []
    round_brackets: list[int] = []  # index of the first run inside each open bracket
    square_brackets: list[int] = []

    def multiply_range(start: int, factor: float) -> None:
        for run in res[start:]:
            run[1] = float(run[1]) * factor

    for match in _TOKEN.finditer(prompt):
        text, weight = match[0], match[1]
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), EMPHASIS)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / EMPHASIS)
        else:  # plain text (a lone closing bracket or colon included), split at BREAKs
            res += _with_breaks(text)
    for start, factor in [*((r, EMPHASIS) for r in round_brackets), *((q, 1 / EMPHASIS) for q in square_brackets)]:
        multiply_range(start, factor)
    return _merged(res or [["", 1.0]])


def _with_breaks(text: str) -> list[list[str | float]]:
    """Plain text as runs, a (BREAK, -1) run where the text says BREAK."""
    runs: list[list[str | float]] = []
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            runs.append([BREAK, -1.0])
        runs.append([part, 1.0])
    return runs


def _merged(res: list[list[str | float]]) -> list[tuple[str, float]]:
    """Runs of identical weights merged (as A1111, which merges two BREAKs too, into text)."""
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] = str(res[i][0]) + str(res[i + 1][0])
            res.pop(i + 1)
        else:
            i += 1
    return [(str(text), float(weight)) for text, weight in res]


@dataclass
class Chunk:
    """One encoder input: ids and weights [CHUNK + 2], begin and end tokens included (weight 1); `fixes`:
    (position, vectors [n, D]) of embeddings to put in place of the token embeddings there."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Tensor]] = field(default_factory=list)


def chunk_prompt(prompt: str, tokenizer: CLIPTokenizer, embeddings: EmbeddingDB | None = None,
                 syntax: PromptSyntax = "a1111") -> tuple[list[Chunk], list[str]]:
    """The prompt's chunks (see the module docstring) and warnings; an empty prompt is one chunk of padding.
    `plain`: one chunk, the rest truncated (warned)."""
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1
    warnings: list[str] = []

    def close() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK - len(chunk.ids)
        chunk.ids = [tokenizer.bos_id, *chunk.ids, tokenizer.eos_id, *[tokenizer.pad_id] * pad]
        chunk.weights = [1.0, *chunk.weights, 1.0, *[1.0] * pad]
        chunk.fixes = [(offset + 1, vectors) for offset, vectors in chunk.fixes]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    parsed = parse_emphasis(prompt) if syntax == "a1111" else [(prompt, 1.0)]
    for text, weight in parsed:
        if text == BREAK and weight == -1.0:
            close()
            continue
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.ids)
            elif len(chunk.ids) == CHUNK and last_comma != -1 and len(chunk.ids) - last_comma <= COMMA_BACKTRACK:
                moved, moved_weights = chunk.ids[last_comma + 1 :], chunk.weights[last_comma + 1 :]
                chunk.ids, chunk.weights = chunk.ids[: last_comma + 1], chunk.weights[: last_comma + 1]
                close()
                chunk.ids, chunk.weights = moved, moved_weights
            if len(chunk.ids) == CHUNK:
                close()
            found = embeddings.find(tokens, position) if embeddings is not None else None
            if found is None:
                chunk.ids.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            vectors, name_length = found
            if len(chunk.ids) + vectors.shape[0] > CHUNK:
                close()
            chunk.fixes.append((len(chunk.ids), vectors))
            chunk.ids += [0] * vectors.shape[0]  # placeholders, as A1111: the vectors replace their embeddings
            chunk.weights += [weight] * vectors.shape[0]
            position += name_length
    if chunk.ids or not chunks:
        close()
    if syntax == "plain" and len(chunks) > 1:
        warnings.append(f"prompt truncated to {CHUNK} tokens (plain prompt syntax): {prompt[:60]!r}")
        chunks = chunks[:1]
    return chunks, warnings


def encode_chunks(conditioner: CLIPTextConditioner, chunks: list[Chunk]) -> Tensor:
    """Context [1, 77 * chunks, D]: each chunk encoded alone (embedding vectors in place), weighted, rescaled to
    its unweighted mean."""
    text = conditioner.transformer.text_model
    return _weighted(chunks, text.embeddings.token_embedding, lambda ids, tokens: (text(ids, tokens), None))[0]


def _weighted(chunks: list[Chunk], embed: nn.Embedding,
              run: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """The chunks through one encoder (`run(ids, token embeddings or None)` -> (hidden states, pooled or None)),
    each weighted and rescaled to its unweighted mean, concatenated: ([1, 77 * chunks, D], the first chunk's
    pooled output, as A1111's `zs[0].pooled`)."""
    device = embed.weight.device
    contexts = []
    pooled: Tensor | None = None
    for i, chunk in enumerate(chunks):
        ids = torch.tensor([chunk.ids], device=device)
        tokens = None
        if chunk.fixes:
            tokens = embed(ids)
            for position, vectors in chunk.fixes:
                tokens[0, position : position + vectors.shape[0]] = vectors.to(tokens.device, tokens.dtype)
        z, pool = run(ids, tokens)  # [1, 77, D], [1, P] or None
        if i == 0:
            pooled = pool
        weights = torch.tensor(chunk.weights, device=device, dtype=z.dtype)[None, :, None]
        weighted = z * weights
        contexts.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(contexts, dim=1), pooled


def encode_prompt(conditioner: CLIPTextConditioner, prompt: str, *, syntax: PromptSyntax = "a1111",
                  embeddings: EmbeddingDB | None = None) -> tuple[Tensor, list[str]]:
    """One prompt's context [1, 77 * chunks, D] and warnings (see the module docstring)."""
    if conditioner.tokenizer is None:
        raise MissingTokenizerError("the CLIP text encoder has no tokenizer (--tokenizer DIR)")
    if syntax == "a1111":
        check_supported(prompt)
    chunks, warnings = chunk_prompt(prompt, conditioner.tokenizer, embeddings, syntax)
    return encode_chunks(conditioner, chunks), warnings


def encode_sdxl_prompt(conditioner: SDXLTextConditioner, prompt: str, *, syntax: PromptSyntax = "a1111",
                       embeddings: Sequence[EmbeddingDB | None] = ()) -> tuple[Tensor, Tensor, list[str]]:
    """One prompt through SDXL's text encoders, as A1111 (modules/sd_hijack_clip.py on each of sgm's embedders):
    context [1, 77 * chunks, sum of widths] and pooled [1, P] and warnings. Each encoder chunks the prompt with its
    own tokenizer (ViT-L pads with the end token, bigG with "!") and its own embeddings (`embeddings`: one
    EmbeddingDB or None per encoder, `clip_l` / `clip_g` vectors), weights and rescales its hidden states per chunk;
    the contexts sit side by side; the pooled vector is bigG's for the first chunk, unweighted."""
    tokenizers = conditioner.require_tokenizers()
    if syntax == "a1111":
        check_supported(prompt)
    dbs = list(embeddings) or [None] * len(tokenizers)
    if len(dbs) != len(tokenizers):
        raise ValueError(f"{len(dbs)} embedding sets for {len(tokenizers)} SDXL text encoders")
    contexts: list[Tensor] = []
    pooled: Tensor | None = None
    warnings: list[str] = []
    counts: list[int] = []
    for encoder, tokenizer, db in zip(conditioner.embedders, tokenizers, dbs, strict=True):
        assert isinstance(encoder, SDXLTextEncoder)
        chunks, chunk_warnings = chunk_prompt(prompt, tokenizer, db, syntax)
        warnings = warnings or chunk_warnings
        counts.append(len(chunks))
        eos = tokenizer.eos_id

        def run(ids: Tensor, tokens: Tensor | None, encoder: SDXLTextEncoder = encoder,
                eos: int = eos) -> tuple[Tensor, Tensor | None]:
            return encoder(ids, eos, tokens)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped

        context, pooled = _weighted(chunks, encoder.transformer.text_model.embeddings.token_embedding, run)
        contexts.append(context)
    if len(set(counts)) > 1:
        raise ValueError(f"the SDXL text encoders' tokenizers cut the prompt into different numbers of chunks "
                         f"({counts}): they must share one vocabulary")
    assert pooled is not None  # the last encoder is the pooled one
    return torch.cat(contexts, dim=-1), pooled, warnings


def encode_weighted(conditioner: CLIPTextConditioner, prompt: str) -> Tensor:
    """Context [1, 77 * chunks, D] of one prompt in A1111's syntax (no embeddings)."""
    return encode_prompt(conditioner, prompt)[0]
