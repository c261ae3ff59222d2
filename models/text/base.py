"""What every conditioner shares: its output (`EncodedPrompts`), its interface (`Conditioner`), and the
attention and checks the text encoders are built from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class EncodedPrompts:
    """context: [N, L, D] cross-attention context; warnings: one per truncated prompt; pooled: [N, P] the
    pooled text vector of encoders that make one (SDXL), else None."""

    context: Tensor
    warnings: list[str]
    pooled: Tensor | None = None


class Conditioner(Protocol):
    """A text conditioner (an nn.Module): `encode([""])` is the unconditional context."""

    context_dim: int

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...


def multihead_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, *, mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """Scaled dot-product attention over `heads` heads: q, k, v [N, L, D] -> [N, L, D].

    mask: boolean, broadcastable to [N, heads, L, L], True = may attend.
    """
    n, length, width = q.shape
    q, k, v = (t.reshape(n, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # [N, h, L, D/h]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2).reshape(n, length, width)


def check_heads(width: int, heads: int, what: str) -> None:
    """Refuse a width the heads do not divide, naming the config (`what`), at construction, not at the first
    forward's reshape."""
    if width % heads:
        raise ValueError(f"{what}: width {width} is not divisible by {heads} heads")


def device_of(module: nn.Module) -> torch.device:
    """Where the module's weights are, so token ids can be moved there."""
    return next(module.parameters()).device
