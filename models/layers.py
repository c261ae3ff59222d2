"""Layers whose result for one batch item does not depend on the rest of the batch.

On the CPU, BLAS picks its kernel and its threads' split of the work by the matrix sizes, so the
folded `[B*L, C] @ W` of `nn.Linear` can round item 0 differently when B changes (seen here: 2e-7 for
the time-embedding MLP at any thread count, 1e-6 for 64-token layers with 2 threads). That is enough to
flip a pixel, and a request must give the same image alone or inside any batch. A batched GEMM
(`bmm`: one `[L, C] @ W` per item, the same shape whatever B is) rounds every item the same way; it
runs the items in one call, several times faster than a Python loop of per-item products (which is
what this module did first: 2.2x gain at batch 8 against 3.2x folded, bench/batch_bench.py). The
batch of one goes through `bmm` too, so it rounds as a batch item does. Rows (2-D inputs, the time
embedding) keep one product per item: there `bmm` takes a vector path that depends on B. Convolutions, SDPA and the
norms are already batch-invariant (checked per op). On CUDA, where this costs a kernel launch per item, the plain folded
product is used and images agree across batches to float rounding only. Training (autograd on) also
takes the folded product: there speed matters and batch invariance does not.

In fp32 the CPU path now folds the batch again, through oneDNN's matmul (`mkldnn._linear_pointwise`)
instead of MKL's: there a row rounds the same whatever the number of rows M (checked bitwise, not promised
by oneDNN: SD's UNet/CLIP shapes, small models' and LoRA's, batch 1 to 8, 1 and 2 threads, in
tests/unit/test_layers.py, which fails if a oneDNN update changes that). Its one exception is M = 1, a
GEMV: inputs with one row per item keep a product per item. The folded call streams each weight once for
the whole batch, where `bmm` streamed it once per item: 1.3-2x faster on the 64-token layers of SD at
batch 2, ~1.3x over all its token linears (microbenchmark, 2 threads); a whole SD-1.5 UNet step at 256 px,
batch 2, gains a few per cent (more at larger batches, where `bmm` streamed the weights more often).
bf16 folds too, but is not batch-invariant: oneDNN's AMX kernels split by M, so an item rounds by its
company (so did `bmm` in bf16 with 2 threads, and 8x slower than the folded product on SD's shapes). fp16
keeps `bmm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def batch_invariant_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear over x [B, ..., C_in]; on the CPU a batched GEMM, one product of the same shape per item."""
    if x.device.type != "cpu" or x.ndim == 1 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)  # compiled (models/cpu_inference.py): inductor packs and fuses it itself
    if x.ndim == 2:  # one row per item (the time embedding): bmm would take a GEMV path that depends on B
        return torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(x.shape[0])])
    batch = x.shape[0]
    if _folds(x, weight):
        folded: Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return folded
    items = x.reshape(batch, -1, x.shape[-1])
    per_item_weight = weight.t().unsqueeze(0).expand(batch, -1, -1)
    if bias is None:
        out = torch.bmm(items, per_item_weight)
    else:
        out = torch.baddbmm(bias.view(1, 1, -1).expand(batch, items.shape[1], -1), items, per_item_weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _folds(x: Tensor, weight: Tensor) -> bool:
    """Whether to take oneDNN's folded product: fp32 (each item then rounds as it would alone) or bf16 (fast),
    at least two rows per item (a batch of single rows would switch between GEMV and GEMM by batch size)."""
    return (
        x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype and x.numel() >= 2 * x.shape[0] * x.shape[-1]
        and torch.backends.mkldnn.is_available()
    )


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)  # bf16: fast, not invariant


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) computed with `batch_invariant_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return batch_invariant_linear(x, self.weight, self.bias)
