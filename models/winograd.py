"""3x3 convolutions on the CPU by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, arXiv 1509.09308).

Each 2x2 block of outputs comes from a 4x4 tile of the input: the tile and the 3x3 filter go to a 4x4 "Winograd
domain" (`B^T d B`, `G g G^T`), where the convolution is an elementwise product summed over input channels, i.e.
16 independent [tiles, C_in] @ [C_in, C_out] products, and the result comes back with `A^T m A`. That takes 16
multiplications per 4 outputs and input channel where the direct convolution takes 36: 2.25x fewer FLOPs, for a
few elementwise transforms and a filter 16/9 the size. On the 2-core CPU the SD UNet's 320- and 640-channel
convolutions run in 0.59-0.71x the time of oneDNN's direct (prepacked) kernel from 16x16 to 64x64 maps, and lose
below 256 channels (bench/winograd_bench.py; bench/fusion_ablation.py says what the whole step gains). Which
convolutions take it is models/cpu_inference.py's policy: by default not the 1280-channel ones, whose filters (two
thirds of the UNet's weights) would grow by 16/9 in memory. The autoencoder's convolutions transform their filters on
each call instead (at no memory cost): its maps are large enough to pay for it, and large maps go in bands of tile
rows that stay in the cache (BAND_BYTES).

Exactness: the transforms' coefficients are 0, +-1/4, +-1/2 and +-1 (the filter's are applied at preparation, or on
each call), so the result differs from the direct convolution by float rounding only (~2e-6 relative). Batch
invariance holds as it does for the token linears: the transforms are elementwise, and the 16 products go through
oneDNN's folded matmul, whose rows round the same whatever the number of rows (models/layers.py;
tests/unit/test_winograd.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the product (a, b) = (1, 1) reaches every output with coefficient 1 in A^T m A: it carries the bias
BIAS_PRODUCT = 5


#: Winograd's G for F(2x2, 3x3); kron(G, G) takes a filter's 9 taps to its 16 values in the Winograd domain
FILTER_TRANSFORM = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def transform_filter(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] -> U [16, C_out, C_in] (`G g G^T` per filter), as one [16, 9] @ [9, C_out C_in] product
    in the weight's dtype: its coefficients (0, +-1/4, +-1/2, 1) are exact, so U is within a few ulps of a float64
    transform, far below the algorithm's own rounding; 1.6 ms for a 512x512 filter here, cheap enough to repeat on
    every call of a convolution that keeps only its weight (WinogradConv2d's `per_call`)."""
    c_out, c_in = weight.shape[:2]
    return transform_taps(weight.detach().reshape(c_out * c_in, 9), c_out)


def transform_taps(taps: Tensor, c_out: int) -> Tensor:
    """`transform_filter` of a weight held as its taps, [C_out C_in, 9]."""
    g = torch.tensor(FILTER_TRANSFORM, dtype=taps.dtype)
    u: Tensor = torch.kron(g, g) @ taps.T
    return u.view(16, c_out, -1)


#: the working set of one band of tile rows (`winograd_conv3x3`): its tiles in the Winograd domain, 16 per 2x2 block of
#: outputs and channel. Large maps go band by band so that the tiles, the 16 products and their sums stay in the
#: cache instead of round trips through memory four times the input's size: at the SD VAE's 256 channels on a
#: 256x256 map the whole map at once took 1.11-1.34x the direct convolution's time, bands of 24 MiB 0.73-0.79x
#: (512 channels at 128x128: 0.76-0.89x against 0.60-0.61x; timed while choosing the size, 2026-12-05;
#: bench/winograd_bench.py measures the size chosen); at the UNet's maps (one band or a few) it is the same.
#: Bands also bound the transient memory (the whole map's tiles at 512 px would be 0.5 GB per VAE convolution).
BAND_BYTES = 24 << 20


def winograd_conv3x3(x: Tensor, filters: Tensor, bias: Tensor | None, band_bytes: int = BAND_BYTES) -> Tensor:
    """conv2d(x, w, bias, padding=1) for x [N, C_in, H, W] and `filters` = transform_filter(w), any H and W (odd
    sizes get a zero row or column more, cropped after). The result is channels_last, as the oneDNN convolutions'.
    The map goes in bands of tile rows of at most `band_bytes` of tiles (BAND_BYTES; at least one row), chosen per
    item so that an item's bands are the same in any batch; each output is computed the same way in any band."""
    n, c, h, w = x.shape
    c_out = filters.shape[1]
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles per column and row
    nhwc = x.permute(0, 2, 3, 1)  # a view for channels_last x
    out = x.new_empty(n, 2 * th, 2 * tw, c_out)
    band = max(1, band_bytes // (16 * tw * max(c, c_out) * x.element_size()))  # tile rows per band
    for r0 in range(0, th, band):
        r1 = min(th, r0 + band)
        # the band's input rows 2 r0 - 1 .. 2 r1, zero-padded where they leave the map (a band-sized copy)
        top, bottom = 2 * r0 - 1, 2 * r1 + 1
        rows = nhwc[:, max(top, 0) : min(bottom, h)]
        pad_top = max(-top, 0)
        xp = F.pad(rows, (0, 0, 1, 1 + 2 * tw - w, pad_top, bottom - top - pad_top - rows.shape[1]))
        _band(xp, filters, bias, out[:, 2 * r0 : 2 * r1])
    return out[:, :h, :w].permute(0, 3, 1, 2)


def _band(xp: Tensor, filters: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """One band: `xp` [N, 2 * rows + 2, 2 * tw + 2, C_in] (padded NHWC input rows) -> `out` [N, 2 * rows, 2 * tw,
    C_out], in place."""
    n, th, tw, c = xp.shape[0], out.shape[1] // 2, out.shape[2] // 2, xp.shape[3]
    c_out = out.shape[3]
    rows = [xp[:, k : k + 2 * th : 2] for k in range(4)]  # [N, th, W + 2, C]: row k of every tile
    cols = (rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])  # B^T d
    tiles = xp.new_empty(16, n, th, tw, c)
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
    for j, s in enumerate((left, right)):
        torch.add(s[0] + s[1], s[2], out=out[:, 0::2, j::2])
        torch.sub(s[1] - s[2], s[3], out=out[:, 1::2, j::2])


def _product(rows: Tensor, weight: Tensor, bias: Tensor | None, per_item: int) -> Tensor:
    """rows @ weight^T (+ bias) by oneDNN's folded matmul, `per_item` rows for each batch item. One row per item
    goes item by item: a single row is a GEMV, a path that a batch's matrix of rows would not take."""
    if per_item == 1 and rows.shape[0] > 1:
        return torch.cat([_product(rows[i : i + 1], weight, bias, 1) for i in range(rows.shape[0])])
    out: Tensor = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return out


class WinogradConv2d(nn.Module):
    """An `nn.Conv2d` (3x3, stride 1, padding 1, zeros) computed by `winograd_conv3x3`; for inference only (it
    cannot be trained or saved). It holds the transformed filters (16/9 the weight's size), or, with `per_call`,
    the weight alone, transformed on each call: no memory beyond the weight's, for a transform that costs a few
    per cent of a large map's convolution (the autoencoder's: its maps are 8x the latent's side; a UNet's step
    would pay it 20 times over, on maps too small to hide it)."""

    def __init__(self, conv: nn.Conv2d, *, per_call: bool = False) -> None:
        super().__init__()
        if not winograd_applies(conv):
            raise ValueError(f"not a 3x3, stride 1, padding 1, ungrouped convolution: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        # the geometry, as nn.Conv2d names it (a LoRA adapter's own convolution reads it: models/lora.py)
        self.kernel_size, self.stride, self.padding, self.dilation = (3, 3), (1, 1), (1, 1), (1, 1)
        # one of the two: the filters kept transformed, or (per_call) the weight's taps [C_out C_in, 9], transformed
        # on each call (2-D, so that `model.to(memory_format=torch.channels_last)` leaves their order as it is)
        self.filters = self.taps = None
        if per_call:
            taps = conv.weight.detach().reshape(self.out_channels * self.in_channels, 9).contiguous()
            self.taps = nn.Parameter(taps, requires_grad=False)
        else:
            self.filters = nn.Parameter(transform_filter(conv.weight), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    @property
    def per_call(self) -> bool:
        return self.taps is not None

    def forward(self, x: Tensor) -> Tensor:
        filters = transform_taps(self.taps, self.out_channels) if self.taps is not None else self.filters
        assert filters is not None
        return winograd_conv3x3(x, filters, self.bias)


def winograd_applies(conv: nn.Conv2d) -> bool:
    """Whether `conv` is a convolution `winograd_conv3x3` computes (3x3, stride 1, padding 1, no dilation or groups,
    zeros padding, fp32 on the CPU)."""
    return (
        type(conv) is nn.Conv2d
        and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and conv.padding == (1, 1)
        and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and conv.weight.device.type == "cpu" and conv.weight.dtype == torch.float32
    )
