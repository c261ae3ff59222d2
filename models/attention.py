"""Attention blocks of the LDM UNet (CompVis `ldm/modules/attention.py` and the legacy
`AttentionBlock` of `openaimodel.py`), with module names equal to the original checkpoint keys.

Every attention goes through `F.scaled_dot_product_attention` with the `[N, heads, L, d]` layout,
so the fused CPU/CUDA kernels are used; the math is the original's: softmax(q k^T * d^-0.5) v.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Linear, batch_invariant_linear


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back: in fp16 the per-group variance of large
    activations overflows (the original `GroupNorm32`). A no-op cast in fp32. On CUDA the native kernel already
    accumulates fp16 and bf16 in fp32 (PyTorch's `acc_type`), so it runs as it is there: the same statistics, the
    output rounded once, and none of the two casts' memory traffic (GroupNorm is memory-bound)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5, groups: int = 32) -> GroupNorm32:
    """GroupNorm (32 groups in the original); eps 1e-5 in UNet ResBlocks, 1e-6 in SpatialTransformer and the VAE."""
    return GroupNorm32(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (the original init of every residual branch's last layer)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """[N, L, heads * d] -> [N, heads, L, d] (a view; SDPA accepts the strides)."""
    n, length, _ = t.shape
    return t.view(n, length, heads, -1).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` [N, L, query_dim] over `context` [N, S, context_dim]
    (self-attention when context is None). q/k/v have no bias; `to_out.0` has one."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n, length, _ = x.shape
        context = x if context is None else context
        q = _split_heads(self.to_q(x), self.heads)  # [N, h, L, d]
        k = _split_heads(self.to_k(context), self.heads)  # [N, h, S, d]
        v = _split_heads(self.to_v(context), self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # scale d^-0.5, as the original
        projected: Tensor = self.to_out(out.transpose(1, 2).reshape(n, length, -1))  # [N, L, query_dim]
        return projected


class GEGLU(nn.Module):
    """Linear to 2 * dim_out, split into value and gate: value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        projected: Tensor = self.proj(x)
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x inner width; keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention, GEGLU FF, each residual. Without a
    `context_dim` (unconditional models) attn2 is a second self-attention and context is ignored.
    `disable_self_attn` (the SD x4 upscaler's first levels; diffusers' `only_cross_attention`): attn1
    attends to the context too, so the block holds two cross-attentions."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dropout: float = 0.0, disable_self_attn: bool = False):
        super().__init__()
        if disable_self_attn and context_dim is None:
            raise ValueError("disable_self_attn needs a context_dim (attn1 attends to the context)")
        self.has_cross = context_dim is not None
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context if self.has_cross else None) + x
        ff: Tensor = self.ff(self.norm3(x))
        return ff + x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map [N, C, H, W]: GN (eps 1e-6), proj_in
    (1x1 conv, or Linear after the reshape when `use_linear`, as SD2), `depth` blocks, zero-init
    proj_out, residual. `context` [N, S, context_dim] is the cross-attention conditioning."""

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1,
                 context_dim: int | None = None, use_linear: bool = False, dropout: float = 0.0,
                 groups: int = 32, disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = normalization(in_channels, eps=1e-6, groups=groups)
        self.proj_in: nn.Module = (
            Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn)
             for _ in range(depth)]
        )
        self.proj_out = zero_module(
            Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n, c, h, w = x.shape
        x_in = x
        # [N, C, H, W] -> [N, HW, C]: a free view for channels_last tensors (our CPU default), a copy otherwise
        x = self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c)
        x = _pointwise(self.proj_in, x)  # [N, HW, inner]
        for block in self.transformer_blocks:
            x = block(x, context)
        x = _pointwise(self.proj_out, x)  # [N, HW, C]
        return x.view(n, h, w, c).permute(0, 3, 1, 2) + x_in  # [N, C, H, W] with channels_last strides


def _pointwise(layer: nn.Module, x: Tensor) -> Tensor:
    """A 1x1 conv (SD v1's proj_in/proj_out, 4-D weights as in the checkpoints) or a Linear (SD 2),
    applied to [N, L, C] tokens as one matmul: no im2col, no layout round trip."""
    if isinstance(layer, nn.Conv2d):
        out = batch_invariant_linear(x, layer.weight.flatten(1), layer.bias)
        for hook in layer._forward_hooks.values():  # LoRA adapters (models/lora.py) of the 1x1 conv
            out = hook(layer, (x,), out)
        return out
    applied: Tensor = layer(x)
    return applied


def qkv_attention_legacy(qkv: Tensor, heads: int) -> Tensor:
    """guided-diffusion's QKVAttentionLegacy: qkv [N, heads * 3 * d, T] is split into heads FIRST,
    then into q, k, v. The original scales q and k by d^-1/4 each (= d^-1/2 on the product) with
    an fp32 softmax; SDPA computes the same product and accumulates the softmax in fp32."""
    n, width, length = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.reshape(n, heads, 3 * d, length).split(d, dim=2)  # each [N, h, d, T]
    out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
    return out.transpose(2, 3).reshape(n, heads * d, length)  # [N, C, T]


class AttentionBlock(nn.Module):
    """Legacy self-attention of the unconditional / concat LDMs (`use_spatial_transformer: False`):
    GN (eps 1e-5), `qkv` Conv1d(C -> 3C), legacy head split, zero-init `proj_out` Conv1d, residual."""

    def __init__(self, channels: int, heads: int = 1, groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = normalization(channels, groups=groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # [N, C, T]
        h = qkv_attention_legacy(self.qkv(self.norm(x)), self.heads)
        projected: Tensor = self.proj_out(h)
        return (x + projected).reshape(n, c, *spatial)

