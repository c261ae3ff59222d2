"""Live previews: a cheap look at a sample mid-run, from its current x0 estimate, without the decoder.

A latent's channels are close to a linear function of the colour of the pixels they cover (the first stage is
trained to reconstruct, and its latents are local), so a per-model affine map latent channels -> RGB, fitted by
least squares on the model's own encodings, gives a blurry but faithful picture at latent resolution for the cost
of one [C, 3] product (AUTOMATIC1111 and ComfyUI ship such maps for SD: "latent2rgb"; this one is computed for
any loaded model). The fit images are drawn here (smooth colour gradients with solid shapes, seeded), so no data
is needed and the same model always gets the same map.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from models.ldm import LatentDiffusion

#: longest side of a preview image, in pixels
MAX_PREVIEW = 256


@dataclass(frozen=True)
class LatentRGB:
    """rgb [3] in [-1, 1] = latent [C] @ weight [C, 3] + bias [3], per latent pixel (scaled latents, as the
    UNet sees them). `r2`: the share of the fit images' colour variance the map explains (1 = all)."""

    weight: Tensor
    bias: Tensor
    r2: float

    def __call__(self, latents: Tensor) -> Tensor:
        """[N, C, h, w] latents -> [N, 3, h, w] approximate pixels in [-1, 1] (not clamped)."""
        w = self.weight.to(latents.device, torch.float32)
        out = torch.einsum("nchw,cd->ndhw", latents.float(), w)  # [N, 3, h, w]
        return out + self.bias.to(latents.device, torch.float32).view(1, 3, 1, 1)


def fit_images(n: int, size: int, seed: int = 0) -> Tensor:
    """n RGB images [n, 3, size, size] in [-1, 1]: a random two-colour gradient with 1-4 solid ellipses and
    rectangles of random colours; they span the colour cube and have both flat regions and edges."""
    rng = np.random.default_rng(seed)
    images = []
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for _ in range(n):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        along = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        base = (a * (1 - along) + b * along) * np.ones((size, size, 1), np.float32)
        image = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = rng.uniform(0, size * 0.7, 2)
            w, h = rng.uniform(size * 0.15, size * 0.6, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((float(x0), float(y0), float(x0 + w), float(y0 + h)), fill=colour)
        images.append(np.asarray(image, np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def fit_latent_rgb(model: LatentDiffusion, images: Tensor | None = None, *, n: int = 16, seed: int = 0) -> LatentRGB:
    """Least-squares affine map from the model's scaled latents of `images` ([N, 3, H, W] in [-1, 1]; default
    `n` `fit_images` of 8 latent pixels a side) to the mean colour of the f x f pixels each latent pixel decodes
    to. The target is the decoder's output, not the input image: a preview shows what the decoder would, and an
    autoencoder trained on a narrow domain (tiny-shapes' six colours) maps other colours into it, and a fit to
    the input colours would chase colours the decoder never makes (on tiny-shapes renders, the decoded-colour fit
    is the closer of the two even to the rendered colours)."""
    f = model.config.downsample_factor
    if images is None:
        images = fit_images(n, 8 * f, seed)
    latents = torch.cat([model.encode_images(im[None].to(model.device, model.dtype)) for im in images])
    decoded = torch.cat([model.decode_latents(latents[i : i + 1]) for i in range(len(latents))]).double().cpu()
    latents = latents.double().cpu()  # [N, C, h, w]
    target = torch.nn.functional.avg_pool2d(decoded.clamp(-1, 1), f)  # [N, 3, h, w]
    c = latents.shape[1]
    x = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(latents.numel() // c, 1,
                                                                         dtype=torch.float64)], dim=1)  # [P, C+1]
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)  # [P, 3]
    solution = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
    residual = ((x @ solution - y) ** 2).sum()
    r2 = 1.0 - float(residual / ((y - y.mean(0)) ** 2).sum())
    return LatentRGB(solution[:c].float(), solution[c].float(), r2)


def preview_size(height: int, width: int, max_side: int = MAX_PREVIEW) -> tuple[int, int]:
    """(height, width) of a preview of an image of this size: the same aspect, longest side at most max_side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def preview_png(latent: Tensor, rgb: LatentRGB, size: tuple[int, int]) -> bytes:
    """A small PNG of one latent [1, C, h, w] (the x0 estimate), resized bilinearly to `size` (height, width;
    see `preview_size`)."""
    pixels = ((rgb(latent)[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, h, w]
    image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: previews are many and short-lived
    return buf.getvalue()


class Previewer:
    """One model's previews; the map is fitted on the first preview asked for (under a second for tiny-shapes on
    the CPU), so a server that never sends a preview never pays for it."""

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self._rgb: LatentRGB | None = None

    @property
    def rgb(self) -> LatentRGB:
        if self._rgb is None:
            self._rgb = fit_latent_rgb(self.model)
        return self._rgb

    def png(self, latent: Tensor, height: int, width: int) -> bytes:
        """A preview PNG of one latent [1, C, h, w] of an image of height x width pixels."""
        return preview_png(latent, self.rgb, preview_size(height, width))
