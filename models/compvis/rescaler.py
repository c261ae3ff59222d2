"""The conditioner of the zoo's semantic-synthesis models: latent-diffusion's `SpatialRescaler`
(`ldm/modules/encoders/modules.py`) over a one-hot label map.

A label map (mode-L PNG: pixel value = label 0..K-1) becomes a {0, 1} one-hot [N, K, H, W]; the rescaler
interpolates it by `multiplier` (bilinear 0.5 for the zoo) `n_stages` times and maps the channels with a 1x1
convolution without bias (`channel_mapper`), giving the concat input [N, out, H / 2^n, W / 2^n]. There is no
null map (no classifier-free guidance): the original samples these models conditionally only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.conditioning import ConditionError

Method = Literal["nearest", "bilinear", "bicubic", "area"]


@dataclass(frozen=True)
class SpatialRescalerConfig:
    """SpatialRescaler's arguments; semantic_synthesis256: 2 stages, 182 -> 3 channels, no bias."""

    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: int | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if self.n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {self.n_stages}")
        if self.method not in ("nearest", "bilinear", "bicubic", "area"):
            raise ValueError(f"SpatialRescaler: method {self.method!r} is not supported for 2-D maps")

    @property
    def channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def downsample(self) -> int:
        """How much smaller than the map its encoding is (the first stage's factor, for the concat to fit)."""
        return round((1 / self.multiplier) ** self.n_stages)


class SpatialRescaler(nn.Module):
    """one-hot [N, K, H, W] -> [N, out, H', W']; `one_hot` reads label-map images."""

    def __init__(self, config: SpatialRescalerConfig) -> None:
        super().__init__()
        self.config = config
        self.n_labels = config.in_channels
        self.channel_mapper = (nn.Conv2d(config.in_channels, config.out_channels, 1, bias=config.bias)
                               if config.out_channels is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        mode = cast(Method, self.config.method)
        for _ in range(self.config.n_stages):
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=mode)
        return x if self.channel_mapper is None else self.channel_mapper(x)

    def one_hot(self, maps: Sequence[Image.Image | np.ndarray | Tensor]) -> Tensor:
        """Label maps (mode-L images or integer arrays [H, W], all one size) -> {0, 1} one-hot [N, K, H, W]."""
        arrays = []
        for i, m in enumerate(maps):
            if isinstance(m, Image.Image):
                if m.mode not in ("L", "P"):
                    raise ConditionError(f"label map {i}: expected a single-channel image (mode L or P: pixel = "
                                         f"label), got mode {m.mode}")
                arr = np.asarray(m, dtype=np.int64)
            else:
                arr = np.asarray(m.cpu() if isinstance(m, Tensor) else m).astype(np.int64)
            if arr.ndim != 2:
                raise ConditionError(f"label map {i}: expected [H, W], got shape {arr.shape}")
            if arr.min() < 0 or arr.max() >= self.n_labels:
                raise ConditionError(f"label map {i}: labels must be in 0..{self.n_labels - 1}, found "
                                     f"{int(arr.min())}..{int(arr.max())}")
            arrays.append(arr)
        if len({a.shape for a in arrays}) != 1:
            raise ConditionError(f"label maps in one batch must share a size, got {sorted({a.shape for a in arrays})}")
        labels = torch.from_numpy(np.stack(arrays))
        return F.one_hot(labels, self.n_labels).permute(0, 3, 1, 2).float()

    def encode(self, prompts: Sequence[str]) -> NoReturn:
        raise ConditionError("a semantic-synthesis model is conditioned on a label map, not on a prompt "
                             "(use semantic2img, `ldm generate --map`)")
