"""SD v1's text encoder: OpenAI CLIP ViT-L/14's text transformer, frozen (LDM's FrozenCLIPEmbedder).

Module names are HF's `CLIPTextModel` (`transformer.text_model.*`), so `cond_stage_model.*` checkpoint keys load
by stripping the prefix. Context = last_hidden_state after the final LayerNorm, no projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Linear
from models.text.base import EncodedPrompts, check_heads, device_of, multihead_attention
from models.tokenizers import CLIPTokenizer


class MissingTokenizerError(ValueError):
    """A CLIP model loaded from a single checkpoint file, which carries no tokenizer, asked to encode."""


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer size; defaults are SD v1's ViT-L/14 (123,060,480 parameters)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP: gelu
    #: the padding token the encoder was trained with; None = the tokenizer folder's (SD 1: end of text;
    #: OpenCLIP, SD 2: "!", id 0 in CLIP's vocabulary, whatever folder a single file is given)
    pad_token: str | None = None

    def __post_init__(self) -> None:
        check_heads(self.hidden_size, self.num_heads, "CLIPTextConfig")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPTextConfig.hidden_act must be quick_gelu or gelu, got {self.hidden_act!r}")


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_heads
        self.q_proj, self.k_proj = Linear(width, width), Linear(width, width)
        self.v_proj, self.out_proj = Linear(width, width), Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, L, D] -> [N, L, D], causal: token i sees tokens <= i, as in CLIP's training."""
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, is_causal=True)
        projected: Tensor = self.out_proj(out)
        return projected


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.quick = config.hidden_act == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        h: Tensor = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # quick_gelu: OpenAI's approximation
        out: Tensor = self.fc2(h)
        return out


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        mlp: Tensor = self.mlp(self.layer_norm2(x))
        return x + mlp


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _drop_position_ids(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: old transformers saved the `position_ids` buffer; it is arange(L), so drop it."""
    state_dict.pop(prefix + "position_ids", None)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)
        self.register_load_state_dict_pre_hook(_drop_position_ids)  # type: ignore[no-untyped-call]  # unannotated in torch

    def forward(self, ids: Tensor, tokens: Tensor | None = None) -> Tensor:
        """ids [N, L] -> [N, L, D]; positions are 0..L-1 (no buffer, so nothing to load or rebuild). `tokens`
        [N, L, D]: token embeddings to use instead of looking `ids` up (textual inversion puts its vectors there)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        if tokens is None:
            tokens = self.token_embedding(ids)
        assert tokens is not None
        position: Tensor = self.position_embedding(positions)
        return tokens + position[None]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.max_positions = config.max_positions

    def forward(self, ids: Tensor, tokens: Tensor | None = None) -> Tensor:
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens do not fit CLIP's {self.max_positions} positions")
        out: Tensor = self.final_layer_norm(self.encoder(self.embeddings(ids, tokens)))
        return out


class CLIPTextModel(nn.Module):
    """HF `CLIPTextModel` layout (`text_model.*`); forward returns last_hidden_state [N, L, D]."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, ids: Tensor, tokens: Tensor | None = None) -> Tensor:
        """`tokens`: token embeddings [N, L, D] in place of `ids`' (see CLIPTextEmbeddings)."""
        out: Tensor = self.text_model(ids, tokens)
        return out


class CLIPTextConditioner(nn.Module):
    """SD v1's FrozenCLIPEmbedder: 77 CLIP tokens -> last_hidden_state [N, 77, 768]; parameters frozen."""

    def __init__(self, config: CLIPTextConfig | None = None, tokenizer: CLIPTokenizer | None = None) -> None:
        super().__init__()
        config = config or CLIPTextConfig()
        self.transformer = CLIPTextModel(config)
        self.context_dim = config.hidden_size
        self.tokenizer: CLIPTokenizer | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self.requires_grad_(False)

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        config = self.transformer.config
        if tokenizer.max_length > config.max_positions or tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer ({tokenizer.vocab_size} tokens, length {tokenizer.max_length}) does not fit the "
                f"CLIP text model ({config.vocab_size} tokens, {config.max_positions} positions)"
            )
        self.tokenizer = tokenizer

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        if self.tokenizer is None:
            raise MissingTokenizerError(
                "the CLIP text encoder has no tokenizer: give a tokenizer folder (`--tokenizer DIR`) holding "
                "vocab.json and merges.txt, e.g. the `tokenizer/` folder of a diffusers SD v1 repository"
            )
        tokens = self.tokenizer.tokenize(prompts)
        return EncodedPrompts(self.transformer(tokens.ids.to(device_of(self))), tokens.warnings)
