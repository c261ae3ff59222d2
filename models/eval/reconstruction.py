"""`ldm eval --images DIR`: score a first stage (a CompVis zoo autoencoder, or a zoo LDM's first stage) on a
folder of images by reconstruction, the measures of the paper's Table 8 that need no generative statistics:
PSNR and SSIM on [0, 1] pixels, and LPIPS (its "PSIM") where VGG16 and LPIPS weights are given as local files.

SSIM is Wang et al. 2004's: an 11 x 11 Gaussian window (sigma 1.5) over each channel, K1 = 0.01, K2 = 0.03,
population statistics, averaged over the windows that fit inside the image ("valid": the image must be at least
11 pixels a side) and over the three channels; the same as scikit-image's `structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`.

LPIPS is models/train/losses.py's VGG16 variant: it cannot be built without its weights (a torchvision VGG16
state dict and the `lpips` package's linear heads, vgg.pth), which are never downloaded here, so it is reported
only when both files are given (`--vgg-weights`, `--lpips-weights`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.autoencoder import Autoencoder
from models.compvis.first_stage import psnr, reconstruct
from models.images import to_tensor
from models.train.losses import LPIPS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _gaussian_window() -> torch.Tensor:
    r = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * SIGMA**2))
    return g / g.sum()


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM of two RGB images of one size (see the module docstring)."""
    x = torch.from_numpy(np.asarray(a.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)[:, None]
    y = torch.from_numpy(np.asarray(b.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)[:, None]
    if x.shape != y.shape:
        raise ValueError(f"images of different sizes: {a.size} and {b.size}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {a.width}x{a.height}")
    g = _gaussian_window()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region
        return F.conv2d(F.conv2d(t, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = K1**2, K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


@dataclass(frozen=True)
class ImageScore:
    name: str
    psnr: float
    ssim: float
    lpips: float | None


@dataclass(frozen=True)
class ReconstructionReport:
    model: str
    scores: list[ImageScore]

    def mean(self, field: str) -> float | None:
        values = [getattr(s, field) for s in self.scores]
        if any(v is None for v in values):
            return None
        return float(np.mean(values))

    def to_json(self) -> dict[str, object]:
        def number(v: float | None) -> float | str | None:  # JSON has no infinity: an exact copy's PSNR is "inf"
            return "inf" if v is not None and math.isinf(v) else v

        return {"model": self.model, "images": len(self.scores),
                "mean": {k: number(self.mean(k)) for k in ("psnr", "ssim", "lpips")},
                "per_image": [{"image": s.name, "psnr": number(s.psnr), "ssim": s.ssim, "lpips": s.lpips}
                              for s in self.scores]}


def image_files(folder: Path) -> list[Path]:
    """The PNG and JPEG files of a folder, sorted by name; an error when it holds none."""
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {folder}: no PNG or JPEG files in the folder")
    return files


def load_lpips(vgg_weights: Path | None, lpips_weights: Path | None) -> LPIPS | None:
    """LPIPS from its two local files, None when neither is given; one without the other is an error."""
    if vgg_weights is None and lpips_weights is None:
        return None
    if vgg_weights is None or lpips_weights is None:
        raise ValueError("LPIPS needs both --vgg-weights (a torchvision VGG16 state dict) and --lpips-weights (the "
                         "lpips package's linear heads, vgg.pth); nothing is downloaded")
    return LPIPS.from_files(vgg_weights, lpips_weights)


@torch.inference_mode()
def evaluate_reconstruction(autoencoder: Autoencoder, files: Sequence[Path], name: str,
                            lpips: LPIPS | None = None) -> ReconstructionReport:
    """Encode and decode each image (KL: the posterior mean; VQ: quantised) and score it against the original."""
    scores = []
    for path in files:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            raise ValueError(f"{path}: not a readable image ({err})") from None
        out = reconstruct(autoencoder, image)
        distance = None
        if lpips is not None:
            param = next(lpips.parameters())
            distance = float(lpips(to_tensor([image]).to(param), to_tensor([out]).to(param))[0])
        scores.append(ImageScore(path.name, psnr(image, out), ssim(image, out), distance))
    return ReconstructionReport(name, scores)


def format_reconstruction(report: ReconstructionReport) -> str:
    lines = ["image\tPSNR (dB)\tSSIM\tLPIPS"]
    for s in report.scores:
        lines.append(f"{s.name}\t{s.psnr:.2f}\t{s.ssim:.4f}\t{'-' if s.lpips is None else f'{s.lpips:.4f}'}")
    lpips = report.mean("lpips")
    lines.append(f"mean of {len(report.scores)}\t{report.mean('psnr'):.2f}\t{report.mean('ssim'):.4f}\t"
                 f"{'- (needs --vgg-weights and --lpips-weights)' if lpips is None else f'{lpips:.4f}'}")
    return "\n".join(lines)


def write_reconstruction_report(report: ReconstructionReport, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return path
