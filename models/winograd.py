"""3x3 convolutions on the CPU by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, arXiv 1509.09308).

Each 2x2 block of outputs comes from a 4x4 tile of the input: the tile and the 3x3 filter go to a 4x4 "Winograd
domain" (`B^T d B`, `G g G^T`), where the convolution is an elementwise product summed over input channels, i.e.
16 independent [tiles, C_in] @ [C_in, C_out] products, and the result comes back with `A^T m A`. That takes 16
multiplications per 4 outputs and input channel where the direct convolution takes 36: 2.25x fewer FLOPs, for a
few elementwise transforms and a filter 16/9 the size. On the 2-core CPU the SD UNet's 320- and 640-channel
convolutions run in 0.59-0.71x the time of oneDNN's direct (prepacked) kernel from 16x16 to 64x64 maps, and lose
below 256 channels (bench/winograd_bench.py; bench/fusion_ablation.py says what the whole step gains). Which
convolutions take it is models/cpu_inference.py's policy: by default not the 1280-channel ones, whose filters (two
thirds of the UNet's weights) would grow by 16/9 in memory.

Exactness: the transforms' coefficients are 0, +-1 and +-1/2 (the filter's are applied once, at preparation), so the
result differs from the direct convolution by float rounding only (~2e-6 relative). Batch invariance holds as it does
for the token linears: the transforms are elementwise, and the 16 products go through oneDNN's folded matmul, whose
rows round the same whatever the number of rows (models/layers.py; tests/unit/test_winograd.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the product (a, b) = (1, 1) reaches every output with coefficient 1 in A^T m A: it carries the bias
BIAS_PRODUCT = 5


def _filter_rows(g0: Tensor, g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """G applied along one axis of the 3x3 filters, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]."""
    return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2


def transform_filter(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] -> U [16, C_out, C_in] (`G g G^T` per filter). As explicit sums in the weight's dtype,
    written plane by plane: ~3x faster than an einsum in float64 (0.10 s against 0.35 s for a 1280x1280 filter here),
    within a few ulps of it, far below the algorithm's own rounding."""
    w = weight.detach()
    u = torch.empty(4, 4, weight.shape[0], weight.shape[1], dtype=weight.dtype)
    for a, row in enumerate(_filter_rows(w[:, :, 0, :], w[:, :, 1, :], w[:, :, 2, :])):
        for b, plane in enumerate(_filter_rows(row[..., 0], row[..., 1], row[..., 2])):
            u[a, b].copy_(plane)
    return u.reshape(16, weight.shape[0], weight.shape[1])


def winograd_conv3x3(x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, w, bias, padding=1) for x [N, C_in, H, W] and `filters` = transform_filter(w), any H and W (odd
    sizes get a zero row or column more, cropped after). The result is channels_last, as the oneDNN convolutions'."""
    n, c, h, w = x.shape
    c_out = filters.shape[1]
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles per column and row
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * th - h, 1, 1 + 2 * tw - w))  # NHWC, zero-padded
    rows = [xp[:, k : k + 2 * th : 2] for k in range(4)]  # [N, th, W + 2, C]: row k of every tile
    cols = (rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])  # B^T d
    tiles = x.new_empty(16, n, th, tw, c)
    for a, t in enumerate(cols):  # (B^T d) B
        v = [t[:, :, k : k + 2 * tw : 2] for k in range(4)]
        torch.sub(v[0], v[2], out=tiles[4 * a])
        torch.add(v[1], v[2], out=tiles[4 * a + 1])
        torch.sub(v[2], v[1], out=tiles[4 * a + 2])
        torch.sub(v[1], v[3], out=tiles[4 * a + 3])
    flat = tiles.view(16, n * th * tw, c)
    m = [_product(flat[i], filters[i], bias if i == BIAS_PRODUCT else None, th * tw).view(n, th, tw, c_out)
         for i in range(16)]
    left = [m[4 * a] + m[4 * a + 1] + m[4 * a + 2] for a in range(4)]  # (A^T m) A, column 0 of each pair
    right = [m[4 * a + 1] - m[4 * a + 2] - m[4 * a + 3] for a in range(4)]  # column 1
    out = x.new_empty(n, 2 * th, 2 * tw, c_out)
    for j, s in enumerate((left, right)):
        torch.add(s[0] + s[1], s[2], out=out[:, 0::2, j::2])
        torch.sub(s[1] - s[2], s[3], out=out[:, 1::2, j::2])
    return out[:, :h, :w].permute(0, 3, 1, 2)


def _product(rows: Tensor, weight: Tensor, bias: Tensor | None, per_item: int) -> Tensor:
    """rows @ weight^T (+ bias) by oneDNN's folded matmul, `per_item` rows for each batch item. One row per item
    goes item by item: a single row is a GEMV, a path that a batch's matrix of rows would not take."""
    if per_item == 1 and rows.shape[0] > 1:
        return torch.cat([_product(rows[i : i + 1], weight, bias, 1) for i in range(rows.shape[0])])
    out: Tensor = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return out


class WinogradConv2d(nn.Module):
    """An `nn.Conv2d` (3x3, stride 1, padding 1, zeros) computed by `winograd_conv3x3`; for inference only: it holds
    the transformed filters (16/9 the weight's size) instead of the weight, so it cannot be trained or saved."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not winograd_applies(conv):
            raise ValueError(f"not a 3x3, stride 1, padding 1, ungrouped convolution: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        # the geometry, as nn.Conv2d names it (a LoRA adapter's own convolution reads it: models/lora.py)
        self.kernel_size, self.stride, self.padding, self.dilation = (3, 3), (1, 1), (1, 1), (1, 1)
        self.filters = nn.Parameter(transform_filter(conv.weight), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return winograd_conv3x3(x, self.filters, self.bias)


def winograd_applies(conv: nn.Conv2d) -> bool:
    """Whether `conv` is a convolution `winograd_conv3x3` computes (3x3, stride 1, padding 1, no dilation or groups,
    zeros padding, fp32 on the CPU)."""
    return (
        type(conv) is nn.Conv2d
        and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and conv.padding == (1, 1)
        and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and conv.weight.device.type == "cpu" and conv.weight.dtype == torch.float32
    )
