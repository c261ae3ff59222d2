"""`ldm eval --images` measures (models/eval/reconstruction.py): SSIM against an independent computation with
scipy's Gaussian filter (scikit-image's recipe: sigma 1.5 truncated at 3.5 sigma = an 11-pixel window, the
5-pixel border dropped, population statistics) and against the closed form for flat images; LPIPS only from
local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from models.eval.reconstruction import load_lpips, ssim
from models.train.losses import LPIPS


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for ch in range(3):
        x, y = a[..., ch] / 255.0, b[..., ch] / 255.0

        def filt(t: np.ndarray) -> np.ndarray:
            return gaussian_filter(t, 1.5, truncate=3.5)

        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        per_channel.append(s[5:-5, 5:-5].mean())  # the windows that fit: skimage crops (win_size - 1) // 2
    return float(np.mean(per_channel))


def test_ssim_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    got = ssim(Image.fromarray(a), Image.fromarray(b))
    assert got == pytest.approx(_reference_ssim(a, b), abs=1e-9)
    assert 0.0 < got < 1.0
    assert ssim(Image.fromarray(a), Image.fromarray(a)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_flat_images_is_the_luminance_term() -> None:
    # constant images: no variance, so SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with C1 = 0.01^2
    mu_x, mu_y = 51 / 255, 204 / 255  # 0.2 and 0.8
    want = (2 * mu_x * mu_y + 1e-4) / (mu_x**2 + mu_y**2 + 1e-4)  # = 0.3201 / 0.6801
    got = ssim(Image.new("RGB", (16, 16), (51,) * 3), Image.new("RGB", (16, 16), (204,) * 3))
    assert got == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))


def test_lpips_needs_both_local_files(tmp_path: Path) -> None:
    assert load_lpips(None, None) is None
    with pytest.raises(ValueError, match="both --vgg-weights"):
        load_lpips(tmp_path / "vgg.pth", None)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_lpips(tmp_path / "missing.pth", tmp_path / "lin.pth")
    reference = LPIPS()
    torch.save({f"features.{k}": v for k, v in reference.features.state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(reference.lins)}, tmp_path / "lin.pth")
    loaded = load_lpips(tmp_path / "vgg.pth", tmp_path / "lin.pth")
    assert loaded is not None and torch.equal(loaded.lins[0].weight, reference.lins[0].weight)
