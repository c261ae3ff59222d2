"""The time-conditional UNet eps_theta(z_t, t, tau(y)) of LDM (CompVis `openaimodel.py` UNetModel).

Module names equal the original checkpoint keys under `model.diffusion_model.`, so an SD v1
single-file state dict loads with `load_state_dict(strict=True)` once that prefix is stripped.
Block numbering (input_blocks.N.M / middle_block / output_blocks) follows the original exactly.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import AttentionBlock, SpatialTransformer, normalization, zero_module
from models.layers import Linear


@dataclass(frozen=True)
class UNetConfig:
    """UNetModel arguments of the original configs; defaults are SD v1 (859,520,964 parameters)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors (ds), not pixels
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    #: transformer depth per level, deepest last (SDXL: (1, 2, 10), its first level without attention); the
    #: middle block takes the last level's, as the original's `transformer_depth_middle` default. Empty:
    #: `transformer_depth` everywhere.
    level_depths: tuple[int, ...] = ()
    context_dim: int | None = 768  # None: no cross-attention (attn2 becomes self-attention)
    use_spatial_transformer: bool = True  # False: legacy AttentionBlock (LDM-SR, unconditional LDMs)
    use_linear_in_transformer: bool = False
    num_classes: int | None = None  # label_emb: nn.Embedding(num_classes, 4 * model_channels)
    #: SDXL's added vector y [N, adm_in_channels] (pooled text + micro-conditioning embeddings), added to the
    #: time embedding through label_emb = MLP(adm_in_channels -> 4 mc -> 4 mc) (the original's `num_classes:
    #: sequential`; diffusers' `add_embedding`)
    adm_in_channels: int | None = None
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0
    legacy: bool = False
    #: GroupNorm groups (the original: 32); small UNets on flat-coloured data want several channels a group
    norm_groups: int = 32
    #: per level, whether its transformers' attn1 attends to the context instead of to itself (the SD x4
    #: upscaler: True, True, True, False); None: self-attention everywhere. The middle block keeps its own.
    disable_self_attentions: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if self.context_dim is not None and not self.use_spatial_transformer:
            raise ValueError("context_dim needs use_spatial_transformer (cross-attention lives there)")
        if self.level_depths and len(self.level_depths) != len(self.channel_mult):
            raise ValueError(f"level_depths {self.level_depths} needs one depth per level ({len(self.channel_mult)})")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("num_classes (class labels) and adm_in_channels (a vector) exclude each other")
        if self.model_channels % self.norm_groups:
            raise ValueError(f"model_channels must be a multiple of {self.norm_groups} (norm_groups)")
        if self.disable_self_attentions is not None:
            if len(self.disable_self_attentions) != len(self.channel_mult):
                raise ValueError(f"disable_self_attentions has {len(self.disable_self_attentions)} entries for "
                                 f"{len(self.channel_mult)} levels")
            if any(self.disable_self_attentions) and self.context_dim is None:
                raise ValueError("disable_self_attentions needs a context_dim (attn1 attends to the context)")

    def self_attention_disabled(self, level: int | None) -> bool:
        """Whether the transformers of `level` (None: the middle block) attend to the context in attn1."""
        return level is not None and self.disable_self_attentions is not None and self.disable_self_attentions[level]

    def depth(self, level: int) -> int:
        """Transformer blocks in each SpatialTransformer of `level` (the middle block: the last level's)."""
        return self.level_depths[level] if self.level_depths else self.transformer_depth

    def heads(self, ch: int) -> tuple[int, int]:
        """(heads, d_head) of an attention at `ch` channels: the original's rule, legacy included."""
        if self.num_head_channels == -1:
            heads, d_head = self.num_heads, ch // self.num_heads
        else:
            heads, d_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy and self.use_spatial_transformer:
            d_head = ch // heads
        return heads, d_head


def depths_config(depths: Sequence[int], attention: Sequence[bool]) -> tuple[int, tuple[int, ...]]:
    """(transformer_depth, level_depths) of per-level depths, counting the levels with attention and the last one
    (whose depth the middle block takes, as diffusers' mid block takes the list's last entry): one depth for all of
    them is `transformer_depth` alone (SD 1/2, the SDXL refiner's 4); else per level, 1 at the levels that do not
    count (SDXL base: 1, 2, 10, as its diffusers config writes). Folders and files agree this way."""
    last = len(depths) - 1
    counted = [a or i == last for i, a in enumerate(attention)]
    used = {d for d, c in zip(depths, counted, strict=True) if c}
    if len(used) <= 1:
        return (used.pop() if used else 1), ()
    return 1, tuple(d if c else 1 for d, c in zip(depths, counted, strict=True))


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [N, dim] of timesteps [N]: [cos(t f_i), sin(t f_i)] with
    f_i = max_period^(-i / half), cos first (diffusers: flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding emb [N, E]:
    in_layers (GN, SiLU, conv) -> + emb (or GN * (1 + scale) + shift) -> out_layers (GN, SiLU,
    dropout, zero-init conv); skip is Identity or a 1x1 conv. `up`/`down` resample inside the
    block (resblock_updown models) between in_layers' activation and its conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 dropout: float = 0.0, use_scale_shift_norm: bool = False, up: bool = False,
                 down: bool = False, groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = "up" if up else "down" if down else None
        self.in_layers = nn.Sequential(
            normalization(channels, groups=groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups=groups), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _resample(self, x: Tensor, size: Sequence[int] | None) -> Tensor:
        if self.resample == "up":
            return upsample_nearest(x, size)
        return F.avg_pool2d(x, 2) if self.resample == "down" else x

    def forward(self, x: Tensor, emb: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        h: Tensor
        if self.resample is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x)), output_size))
            x = self._resample(x, output_size)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # [N, C or 2C, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        skip: Tensor = self.skip_connection(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1), key `op`."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.op(x)
        return out


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv, key `conv`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        out: Tensor = self.conv(upsample_nearest(x, output_size))
        return out


def upsample_nearest(x: Tensor, size: Sequence[int] | None) -> Tensor:
    """Nearest x2, or to `size` [H, W]: the skip's size when an odd size was halved on the way down
    (a 72 px image has a 9x9 latent: 9 -> 5 -> 3 -> 2 down, so 2 -> 3 -> 5 -> 9 up)."""
    if size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=tuple(size), mode="nearest")


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks take the timestep embedding and SpatialTransformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None,  # type: ignore[override]
                output_size: Sequence[int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, output_size if layer.resample == "up" else None)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """eps_theta: x [N, in, H, W], timesteps [N], context [N, L, context_dim], y [N] -> [N, out, H, W].
    Any H and W: upsamplers take the size of the skip they meet, as diffusers' forward_upsample_size."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        self.emb_dim = 4 * mc
        self.time_embed = nn.Sequential(
            Linear(mc, self.emb_dim), nn.SiLU(), Linear(self.emb_dim, self.emb_dim)
        )
        self.label_emb: nn.Module | None = None
        if config.num_classes is not None:  # key `label_emb.weight`, as the original's nn.Embedding
            self.label_emb = nn.Embedding(config.num_classes, self.emb_dim)
        elif config.adm_in_channels is not None:  # keys `label_emb.0.0.*`, `label_emb.0.2.*`, as the original
            self.label_emb = nn.Sequential(nn.Sequential(
                Linear(config.adm_in_channels, self.emb_dim), nn.SiLU(), Linear(self.emb_dim, self.emb_dim)))
        skip_channels = self._build_input_blocks()
        ch = skip_channels[-1]
        last = len(config.channel_mult) - 1
        self.middle_block = TimestepEmbedSequential(self._res(ch, ch), self._attention(ch, last, middle=True),
                                                    self._res(ch, ch))
        self._build_output_blocks(skip_channels)
        self.out = nn.Sequential(
            normalization(mc, groups=config.norm_groups), nn.SiLU(),
            zero_module(nn.Conv2d(mc, config.out_channels, 3, padding=1)),
        )

    def _res(self, ch: int, out: int, *, up: bool = False, down: bool = False) -> ResBlock:
        c = self.config
        return ResBlock(ch, self.emb_dim, out, c.dropout, c.use_scale_shift_norm, up=up, down=down,
                        groups=c.norm_groups)

    def _attention(self, ch: int, level: int, *, middle: bool = False) -> nn.Module:
        """The attention of a block at `level` (`middle`: the middle block, which takes the last level's depth)."""
        c = self.config
        heads, d_head = c.heads(ch)
        if c.use_spatial_transformer:
            return SpatialTransformer(ch, heads, d_head, c.depth(level), c.context_dim,
                                      c.use_linear_in_transformer, c.dropout, c.norm_groups,
                                      c.self_attention_disabled(None if middle else level))
        # the original hands AttentionBlock num_head_channels = d_head (legacy: -1 -> num_heads)
        return AttentionBlock(ch, heads if c.legacy and c.num_head_channels == -1 else ch // d_head, c.norm_groups)

    def _build_input_blocks(self) -> list[int]:
        """input_blocks.0 = conv_in; per level num_res_blocks x [ResBlock(+attn)], then a
        Downsample (not after the last level). Returns the channels of every skip, in order."""
        c = self.config
        ch, ds = c.model_channels, 1
        conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [self._res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = self._res(ch, ch, down=True) if c.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        return skip_channels

    def _build_output_blocks(self, skip_channels: list[int]) -> None:
        """Per level (deepest first) num_res_blocks + 1 x [ResBlock(ch + skip), attn?, Upsample?];
        the upsampler closes every level but level 0 (sub-index .1 without attention, .2 with)."""
        c = self.config
        skip_channels = list(skip_channels)
        ch, ds = skip_channels[-1], 2 ** (len(c.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(ch + skip_channels.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch, level))
                if level and i == c.num_res_blocks:
                    layers.append(self._res(ch, ch, up=True) if c.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        """y: class labels [N] (num_classes) or the added vector [N, adm_in_channels] (SDXL)."""
        if (y is None) != (self.label_emb is None):
            raise ValueError("pass y (class labels [N], or SDXL's vector [N, adm_in_channels]) if and only if the "
                             "model takes one")
        timesteps = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.label_emb is not None and y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype) if y.is_floating_point() else y).to(emb.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        out: Tensor = self.out(h)
        return out
