"""The paper's text transformer tau_theta, trained jointly with the UNet from scratch (LDM's BERTEmbedder):
token and learned position embeddings, pre-LayerNorm blocks, final LayerNorm, on BERT WordPiece tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.layers import Linear
from models.text.base import EncodedPrompts, check_heads, device_of, multihead_attention
from models.tokenizers import BertTokenizer, PromptTokenizer


@dataclass(frozen=True)
class TransformerTextConfig:
    """The paper's text transformer tau_theta (LDM-KL-8-G: width 1280, depth 32, 8 heads of 64, 77 tokens).

    vocab_size must cover the tokenizer (bert-base-uncased WordPiece: 30522).
    """

    vocab_size: int = 30522
    width: int = 512
    depth: int = 8
    heads: int = 8
    max_length: int = 77
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        check_heads(self.width, self.heads, "TransformerTextConfig")
        if self.max_length < 2:
            raise ValueError(f"TransformerTextConfig.max_length must be >= 2, got {self.max_length}")


class SelfAttention(nn.Module):
    """Multi-head self-attention; q/k/v without bias as in LDM's x-transformers encoder."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = Linear(width, width, bias=False)
        self.to_k = Linear(width, width, bias=False)
        self.to_v = Linear(width, width, bias=False)
        self.to_out = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.to_out(multihead_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))
        return out


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + mlp(norm2(x)) with a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(Linear(width, hidden), nn.GELU(), Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        mlp: Tensor = self.mlp(self.norm2(x))
        return x + mlp


class TransformerTextEncoder(nn.Module):
    """ids [N, L] -> [N, L, width]: token + learned position embeddings, pre-LN blocks, final LayerNorm."""

    def __init__(self, config: TransformerTextConfig) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.max_length, config.width)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        for emb in (self.token_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_emb(ids) + self.pos_emb(positions)[None]
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.norm(x)
        return out


class TransformerConditioner(nn.Module):
    """tau_theta trained jointly with the UNet; padding tokens are ordinary inputs (no mask), as in LDM."""

    def __init__(
        self, config: TransformerTextConfig | None = None, tokenizer: PromptTokenizer | None = None
    ) -> None:
        super().__init__()
        config = config or TransformerTextConfig()
        tok = tokenizer or BertTokenizer.from_package(max_length=config.max_length)
        if tok.max_length > config.max_length or tok.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer ({tok.vocab_size} tokens, length {tok.max_length}) does not fit "
                f"the text transformer ({config.vocab_size} tokens, {config.max_length} positions)"
            )
        self.tokenizer = tok
        self.transformer = TransformerTextEncoder(config)
        self.context_dim = config.width

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenizer.tokenize(prompts)
        return EncodedPrompts(self.transformer(tokens.ids.to(device_of(self))), tokens.warnings)
