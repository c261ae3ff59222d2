"""Image grids for training samples."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: Path, rows: int = 1) -> None:
    """[N,3,H,W] in [-1,1] as one PNG with `rows` rows (N must divide by rows)."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    canvas = torch.zeros(3, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)
