"""First-stage autoencoders of LDM (PAPER §3.1, App. G): the released Encoder/Decoder
(CompVis `ldm/modules/diffusionmodules/model.py`) with a KL (diagonal Gaussian) or VQ regulariser.

Module names equal the original checkpoint keys under `first_stage_model.` (`encoder.down.0.block.0
.norm1`, `decoder.up.3.upsample.conv`, `quantize.embedding`, ...), so an original state dict loads
with `load_state_dict(strict=True)` once that prefix is stripped. Latent scaling (SD's 0.18215) is
the pipeline's business, not this module's.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import normalization
from models.noise import randn_per_item


@dataclass(frozen=True)
class AutoencoderConfig:
    """`ddconfig` + `embed_dim` / `n_embed` of the original configs; defaults are kl-f8 (SD v1)."""

    #: identity = no first stage: "latents" are the pixels themselves (the paper's LDM-1, pixel-space diffusion)
    kind: Literal["kl", "vq", "identity"] = "kl"
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # pixel resolutions, as in the original (needs `resolution`)
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 0  # VQ codebook size (kind == "vq")
    mid_attention: bool = True  # False = original `attn_type: none` (no attention anywhere)
    dropout: float = 0.0
    vq_beta: float = 0.25
    #: GroupNorm groups (the original: 32). Few channels per group normalise away absolute levels: at ch=32
    #: (one channel a group) a flat white and a flat gray image look alike to the decoder's last layer, so
    #: small autoencoders for flat-coloured images want fewer groups
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("kl", "vq", "identity"):
            raise ValueError(f"kind must be 'kl', 'vq' or 'identity', got {self.kind!r}")
        if self.kind == "identity" and (self.ch_mult != (1,) or self.embed_dim != self.in_channels):
            raise ValueError("an identity first stage needs ch_mult [1] and embed_dim == in_channels")
        if self.kind == "vq" and self.n_embed <= 0:
            raise ValueError("a VQ autoencoder needs n_embed > 0")
        if self.ch % self.norm_groups:
            raise ValueError(f"ch must be a multiple of {self.norm_groups} (norm_groups, the GroupNorm groups)")

    @property
    def downsample_factor(self) -> int:
        factor: int = 2 ** (len(self.ch_mult) - 1)
        return factor


def _norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return normalization(channels, eps=1e-6, groups=groups)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, norm2, swish, dropout, conv2, plus a 1x1 `nin_shortcut` when in != out."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        # without autograd (inference) SiLU and the residual add overwrite the fresh tensors they are given: one
        # activation less alive at a time, the same bits (at 256 px the decoder's activations peak at 67 MB each)
        inplace = not torch.is_grad_enabled()
        h: Tensor = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip) if inplace else skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over positions; q, k, v, proj_out are 1x1 convs (4-D weights)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        x_norm = self.norm(x)

        def heads(t: Tensor) -> Tensor:  # [N, C, H, W] -> [N, 1, HW, C]
            return t.reshape(n, 1, c, h * w).transpose(2, 3)

        q, k, v = heads(self.q(x_norm)), heads(self.k(x_norm)), heads(self.v(x_norm))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, 1, HW, C], scale C^-0.5
        projected: Tensor = self.proj_out(out.transpose(2, 3).reshape(n, c, h, w))
        return x + projected


class Downsample(nn.Module):
    """Zero pad (0, 1, 0, 1) (asymmetric, as the original) then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(F.pad(x, (0, 1, 0, 1)))
        return out


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


def _attn(channels: int, config: AutoencoderConfig) -> nn.Module:
    return AttnBlock(channels, config.norm_groups) if config.mid_attention else nn.Identity()


class _Level(nn.Module):
    """One resolution level: `block.i` ResnetBlocks, `attn.i` after each when at an attn resolution,
    then an optional `downsample` / `upsample` (the original's anonymous nn.Module)."""

    def __init__(self, channels: Sequence[int], attention: bool, config: AutoencoderConfig,
                 resample: Literal["downsample", "upsample"] | None):
        super().__init__()
        pairs = list(zip(channels[:-1], channels[1:], strict=True))
        self.block = nn.ModuleList([ResnetBlock(i, o, config.dropout, config.norm_groups) for i, o in pairs])
        self.attn = nn.ModuleList([_attn(o, config) for _, o in pairs] if attention else [])
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(channels[-1])
        elif resample == "upsample":
            self.upsample = Upsample(channels[-1])

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h if self.resample is None else getattr(self, self.resample)(h)


class _Mid(nn.Module):
    def __init__(self, channels: int, config: AutoencoderConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config.dropout, config.norm_groups)
        self.attn_1 = _attn(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config.dropout, config.norm_groups)

    def forward(self, h: Tensor) -> Tensor:
        out: Tensor = self.block_2(self.attn_1(self.block_1(h)))
        return out


class Encoder(nn.Module):
    """x [N, in, H, W] -> [N, z_out, H/f, W/f]; z_out = 2 * z_channels for KL (mean, logvar)."""

    def __init__(self, config: AutoencoderConfig, z_out: int):
        super().__init__()
        widths = [config.ch * m for m in (1, *config.ch_mult)]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        n_levels = len(config.ch_mult)
        for i in range(n_levels):
            res = config.resolution // 2**i
            self.down.append(_Level([widths[i]] + [widths[i + 1]] * config.num_res_blocks,
                                    res in config.attn_resolutions, config,
                                    "downsample" if i != n_levels - 1 else None))
        self.mid = _Mid(widths[-1], config)
        self.norm_out = _norm(widths[-1], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], z_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        out: Tensor = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return out


class Decoder(nn.Module):
    """z [N, z_channels, h, w] -> [N, out, h*f, w*f]. `up[i]` is indexed by level, so the
    lowest-resolution (first applied) level is `up[len(ch_mult) - 1]`; no tanh on the output."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        n_levels = len(widths)
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(widths[-1], config)
        self.up = nn.ModuleList(
            _Level([widths[min(i + 1, n_levels - 1)]] + [widths[i]] * (config.num_res_blocks + 1),
                   config.resolution // 2**i in config.attn_resolutions, config, "upsample" if i else None)
            for i in range(n_levels)
        )
        self.norm_out = _norm(widths[0], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        out: Tensor = self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))
        return out


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from params [N, 2C, h, w] (mean, logvar along channels);
    logvar is clamped to [-30, 20] as in the original."""

    def __init__(self, params: Tensor):
        self.mean, logvar = params.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """mean + std * eps; eps per item from `generators` (one per batch item). None draws from
        the global RNG, meant for training loops that seed it; requests always pass generators."""
        if generators is None:
            noise = torch.randn_like(self.mean)
        else:
            mean = self.mean
            noise = randn_per_item(mean.shape, generators, device=mean.device, dtype=mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per item [N]: 0.5 * sum(mu^2 + var - 1 - logvar) over C, H, W."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class VectorQuantizer(nn.Module):
    """taming VectorQuantizer2 (legacy=True): nearest codebook entry, straight-through gradients,
    loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2) (beta on the "wrong" term, as
    the released models were trained)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z [N, C, h, w] -> (z_q [N, C, h, w] straight-through, loss [], indices [N, h, w])."""
        n, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # [N*h*w, C]
        codebook = self.embedding.weight  # [K, C]
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        indices = dist.argmin(dim=1)
        z_q = self.embedding(indices).view(n, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(z, z_q.detach()) + self.beta * F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()
        return z_q.contiguous(), loss, indices.view(n, h, w)


@dataclass
class AutoencoderOutput:
    """`recon` [N, out, H, W]; KL: `posterior`; VQ: codebook `vq_loss` and `indices` [N, h, w]."""

    recon: Tensor
    posterior: DiagonalGaussian | None = None
    vq_loss: Tensor | None = None
    indices: Tensor | None = None


class Autoencoder(nn.Module):
    """AutoencoderKL or VQModelInterface. Images are [N, 3, H, W] in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.identity = config.kind == "identity"
        if self.identity:  # no weights: pixels are the latents
            self.quantize = None
            return
        kl = config.kind == "kl"
        z_out = 2 * config.z_channels if kl else config.z_channels
        self.encoder = Encoder(config, z_out)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(z_out, 2 * config.embed_dim if kl else config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize = None if kl else VectorQuantizer(config.n_embed, config.embed_dim, config.vq_beta)

    def encode(self, x: Tensor) -> DiagonalGaussian | Tensor:
        """KL: the posterior over [N, embed_dim, H/f, W/f]; VQ: the PRE-quantisation latent
        quant_conv(encoder(x)) (LDM's diffusion runs on continuous VQ latents)."""
        if self.identity:  # a point mass at x (logvar at the clamp floor: std 3e-7)
            return DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], dim=1))
        h = self.quant_conv(self.encoder(x))
        return DiagonalGaussian(h) if self.quantize is None else h

    def quantize_latents(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """VQ only: (z_q straight-through, codebook loss, indices)."""
        if self.quantize is None:
            raise ValueError("quantize_latents needs a VQ autoencoder")
        quantized: tuple[Tensor, Tensor, Tensor] = self.quantize(h)
        return quantized

    def _decode(self, z: Tensor) -> Tensor:
        return z if self.identity else self.decoder(self.post_quant_conv(z))

    def decode(self, z: Tensor) -> Tensor:
        """z [N, embed_dim, h, w] -> image [N, out, h*f, w*f]; VQ quantises first ("the VQ
        layer absorbed into the decoder", PAPER §3.1)."""
        if self.quantize is not None:
            z = self.quantize(z)[0]
        return self._decode(z)

    def forward(self, x: Tensor, *, sample_posterior: bool = True,
                generators: Sequence[torch.Generator] | None = None) -> AutoencoderOutput:
        encoded = self.encode(x)
        if isinstance(encoded, DiagonalGaussian):
            z = encoded.sample(generators) if sample_posterior else encoded.mode()
            return AutoencoderOutput(recon=self._decode(z), posterior=encoded)
        z_q, loss, indices = self.quantize_latents(encoded)
        return AutoencoderOutput(recon=self._decode(z_q), vq_loss=loss, indices=indices)
