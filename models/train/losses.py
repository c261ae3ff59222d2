"""The first stage's losses (PAPER App. G; CompVis `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`):
L1 reconstruction + LPIPS perceptual loss, a learned output log-variance, a KL or codebook term, and a
PatchGAN discriminator with the hinge loss whose generator term is weighted adaptively by the ratio of
the last decoder layer's gradient norms.

LPIPS needs pretrained VGG16 features, which cannot be downloaded here: `LPIPS.from_files` reads a local
torchvision-layout VGG16 state dict (`features.N.weight`) and LPIPS' linear heads (`lin0.model.1.weight`
... as in the `lpips` package's vgg.pth). Without them the perceptual weight is 0 and the trainer says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# VGG16 `features` layer list: ints are 3x3 conv widths, "M" a 2x2 max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# indices (in `features`) of the ReLUs whose outputs LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _load_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"perceptual-loss weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), VGG16 variant, frozen."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        self.shift: Tensor
        self.scale: Tensor
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: Path, lpips_path: Path) -> LPIPS:
        model = cls()
        vgg = {k.removeprefix("features."): v for k, v in _load_state(vgg_path).items() if k.startswith("features.")}
        model.features.load_state_dict(vgg, strict=True)
        lin = _load_state(lpips_path)
        model.lins.load_state_dict({f"{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(5)}, strict=True)
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in _TAPS:
                out.append(h)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-image distance [N] of images in [-1, 1]."""
        total = a.new_zeros(a.shape[0])
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b), strict=True):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayerDiscriminator): one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # weights_init of the original
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.main(x)
        return out


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, scale: float) -> Tensor:
    """lambda = ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4]."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * scale
