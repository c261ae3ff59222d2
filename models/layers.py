"""Layers whose result for one batch item does not depend on the rest of the batch.

On the CPU, BLAS picks its kernel and its threads' split of the work by the matrix sizes, so the
folded `[B*L, C] @ W` of `nn.Linear` can round item 0 differently when B changes (seen here: 2e-7 for
the time-embedding MLP at any thread count, 1e-6 for 64-token layers with 2 threads). That is enough to
flip a pixel, and a request must give the same image alone or inside any batch. One GEMM per item
has the same shape whatever B is, so it rounds the same; convolutions, SDPA and the norms are already
batch-invariant (checked per op). On CUDA, where this costs a kernel launch per item, the plain folded
product is used and images agree across batches to float rounding only. Training (autograd on) also
takes the folded product: there speed matters and batch invariance does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def batch_invariant_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear over x [B, ..., C_in], one GEMM per batch item on the CPU."""
    if x.shape[0] == 1 or x.device.type != "cpu" or x.ndim == 1 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(x.shape[0])])


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) computed with `batch_invariant_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return batch_invariant_linear(x, self.weight, self.bias)
