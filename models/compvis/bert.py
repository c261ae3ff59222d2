"""The text encoder of the zoo's text2img model: latent-diffusion's `BERTEmbedder` (`ldm/modules/encoders/
modules.py`), i.e. BERT's WordPiece tokens into an x-transformers `TransformerWrapper(Encoder)` trained from
scratch (`ldm/modules/x_transformer.py`, an early lucidrains x-transformers).

Module names equal the checkpoint's keys under `cond_stage_model.`: `transformer.token_emb`,
`transformer.pos_emb.emb`, `transformer.attn_layers.layers.{2i}` = [LayerNorm, Attention] and `.{2i+1}` =
[LayerNorm, FeedForward], `transformer.norm`, and the unused language-model head `transformer.to_logits`
(kept so that every key of the file is consumed). What the encoder computes (contract, "text2img256"):
- tokens: lower-cased WordPiece, [CLS] ... [SEP], padded with [PAD] to 77 and truncated there; no attention
  mask (the padding is attended, as the original feeds none);
- x = token_emb(ids) + pos_emb(0..L-1); per layer pre-LayerNorm residual blocks: attention with 8 heads of
  64 (q/k/v without bias, so the inner width is 512 whatever the model width), then Linear-GELU-Linear x4;
  a final LayerNorm; context = [N, 77, n_embed].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Linear
from models.tokenizers import BertTokenizer, TokenizedPrompts

#: x-transformers' DEFAULT_DIM_HEAD and Attention's default heads, which BERTEmbedder never overrides
HEADS, DIM_HEAD = 8, 64


@dataclass(frozen=True)
class BERTEmbedderConfig:
    """BERTEmbedder(n_embed, n_layer, vocab_size, max_seq_len); text2img256: 640 wide, 32 layers."""

    width: int = 640
    depth: int = 32
    vocab_size: int = 30522
    max_length: int = 77

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1 or self.max_length < 2 or self.vocab_size < 1:
            raise ValueError(f"BERTEmbedderConfig: invalid sizes {self}")


class WordPieceVocab(BertTokenizer):
    """The `BertTokenizerFast` of the original (bert-base-uncased: lower case, accents stripped, Chinese
    characters split), built by the `tokenizers` package from a `vocab.txt` instead of the hub."""

    def __init__(self, vocab_txt: Path, *, max_length: int = 77) -> None:  # noqa: D107 -- no super(): no json file
        from tokenizers import BertWordPieceTokenizer

        if not vocab_txt.is_file():
            raise FileNotFoundError(f"{vocab_txt}: no such file (the text2img model needs BERT's vocab.txt: "
                                    "`--tokenizer DIR` with DIR/vocab.txt, e.g. bert-base-uncased's)")
        self.backend = BertWordPieceTokenizer(str(vocab_txt), lowercase=True)
        found = [self.backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
        if None in found:
            raise ValueError(f"{vocab_txt}: not a BERT vocabulary (it needs [CLS], [SEP] and [PAD])")
        self.cls_id, self.sep_id, self.pad_id = (int(i) for i in found if i is not None)
        self.max_length = max_length


class XAttention(nn.Module):
    """x-transformers Attention: q/k/v Linear(dim -> 8 * 64, no bias), softmax(q k^T / 8) v, to_out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner = HEADS * DIM_HEAD
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(dim, inner, bias=False)
        self.to_v = Linear(dim, inner, bias=False)
        self.to_out = Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:  # [N, L, 8 * 64] -> [N, 8, L, 64]
            return t.view(n, length, HEADS, DIM_HEAD).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x)))
        projected: Tensor = self.to_out(out.transpose(1, 2).reshape(n, length, HEADS * DIM_HEAD))
        return projected


class XFeedForward(nn.Module):
    """x-transformers FeedForward: net = [Sequential(Linear(dim, 4 dim), GELU), Dropout, Linear(4 dim, dim)]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(Linear(dim, 4 * dim), nn.GELU()), nn.Dropout(0.0), Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


class PositionEmbedding(nn.Module):
    """AbsolutePositionalEmbedding: a learned row per position (key `emb`)."""

    def __init__(self, dim: int, max_length: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_length, dim)

    def forward(self, length: int, device: torch.device) -> Tensor:
        emb: Tensor = self.emb(torch.arange(length, device=device))
        return emb[None]  # [1, L, D]


class PreNormResidual(nn.ModuleList):
    """One entry of x-transformers' `layers`: [norm, block] (the original's third entry, `Residual`, has no
    weights); x = block(norm(x)) + x."""

    def __init__(self, norm: nn.Module, block: nn.Module) -> None:
        super().__init__([norm, block])

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self[1](self[0](x))
        return out + x


class AttentionLayers(nn.Module):
    """Encoder(dim, depth): `layers` holds depth x ('a', 'f') pre-norm residual blocks."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(PreNormResidual(nn.LayerNorm(dim), XAttention(dim)))
            self.layers.append(PreNormResidual(nn.LayerNorm(dim), XFeedForward(dim)))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerWrapper(nn.Module):
    """ids [N, L] -> embeddings [N, L, dim] (`return_embeddings=True`: `to_logits` is not applied)."""

    def __init__(self, config: BERTEmbedderConfig) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = PositionEmbedding(config.width, config.max_length)
        self.attn_layers = AttentionLayers(config.width, config.depth)
        self.norm = nn.LayerNorm(config.width)
        self.to_logits = Linear(config.width, config.vocab_size)  # the unused LM head, loaded to consume its keys

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1], ids.device)
        out: Tensor = self.norm(self.attn_layers(x))
        return out


@dataclass(frozen=True)
class _Encoded:
    context: Tensor
    warnings: list[str]


class BERTConditioner(nn.Module):
    """BERTEmbedder: prompts -> context [N, 77, width]; the unconditional context is that of ""."""

    def __init__(self, config: BERTEmbedderConfig, tokenizer_dir: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.context_dim = config.width
        self.transformer = TransformerWrapper(config)
        self.tokenizer: WordPieceVocab | None = None
        if tokenizer_dir is not None:
            self.tokenizer = WordPieceVocab(Path(tokenizer_dir) / "vocab.txt", max_length=config.max_length)
            if self.tokenizer.vocab_size > config.vocab_size:
                raise ValueError(f"{tokenizer_dir}/vocab.txt has {self.tokenizer.vocab_size} tokens, more than the "
                                 f"encoder's {config.vocab_size} embedding rows")
        self.requires_grad_(False)

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        if self.tokenizer is None:
            raise ValueError("the BERT text encoder has no tokenizer: give `--tokenizer DIR` with DIR/vocab.txt "
                             "(bert-base-uncased's WordPiece vocabulary, which the original downloads)")
        return self.tokenizer.tokenize(prompts)

    def encode(self, prompts: Sequence[str]) -> _Encoded:
        tokens = self.tokenize(prompts)
        device = self.transformer.token_emb.weight.device
        return _Encoded(self.transformer(tokens.ids.to(device)), tokens.warnings)
