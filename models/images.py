"""Images in and out of the model: PIL <-> tensors in [-1, 1], masks, PNGs with their parameters."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> [N, 3, H, W] float32 in [-1, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def mask_to_tensor(masks: Sequence[Image.Image]) -> torch.Tensor:
    """Masks -> [N, 1, H, W] in {0, 1}, 1 = the region to repaint (white, binarised at 0.5)."""
    arrays = [(np.asarray(m.convert("L"), dtype=np.float32) / 255.0 >= 0.5).astype(np.float32) for m in masks]
    return torch.from_numpy(np.stack(arrays))[:, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> RGB images (clamped, rounded as diffusers does)."""
    arr = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    arr = (arr * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def encode_png(image: Image.Image, parameters: Mapping[str, object]) -> bytes:
    """PNG bytes with every generation parameter as a tEXt chunk (key -> str(value))."""
    info = PngImagePlugin.PngInfo()
    for key, value in parameters.items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_parameters(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG written by `encode_png`."""
    with Image.open(io.BytesIO(data)) as im:
        return dict(getattr(im, "text", {}))
