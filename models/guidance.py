"""Wrappers that turn the UNet into the epsilon function a sampler walks (STYLE.md #3).

The samplers know nothing of prediction types, conditioning or guidance: `model_eps` converts the
UNet's output to epsilon, and `guided_eps` adds classifier-free guidance by doubling the batch once
(unconditional first, as the original code and diffusers do). One exception: on a zero-terminal-SNR schedule,
where epsilon carries no x0 at the last level, `model_eps` returns v itself, which guidance mixes as diffusers
does and the sampler step converts (models/samplers.py `SamplingPlan.model_output`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.diffusion import NoiseSchedule
from models.unet import UNet

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conditioning:
    """What one batch is conditioned on; every tensor has the batch as its first dimension."""

    context: torch.Tensor | None = None  # [N, L, D] cross-attention tokens
    concat: torch.Tensor | None = None  # [N, C', h, w] stacked on the latent (mask + masked latent, low-res image)
    class_labels: torch.Tensor | None = None  # [N] long, the "adm" class vector
    vector: torch.Tensor | None = None  # [N, adm_in_channels] SDXL's pooled text + micro-conditioning embeddings

    def rows(self, rows: slice) -> Conditioning:
        """The conditioning of some items (rows of the batch)."""
        return Conditioning(*(None if v is None else v[rows] for v in self.tensors))

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every field, in order (None where absent)."""
        return self.context, self.concat, self.class_labels, self.vector


def model_eps(unet: UNet, schedule: NoiseSchedule, cond: Conditioning) -> EpsFn:
    """Epsilon from the UNet, whatever it predicts; concat inputs are stacked on the latent here."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = x if cond.concat is None else torch.cat([x, cond.concat.to(x.dtype)], dim=1)
        y = cond.vector if cond.vector is not None else cond.class_labels
        out: torch.Tensor = unet(x_in, t, context=cond.context, y=y)
        if schedule.prediction_type == "v_prediction" and not schedule.config.rescale_betas_zero_snr:
            out = schedule.eps_from_v(out, x, t)  # zero terminal SNR: v itself (samplers.SamplingPlan.model_output)
        return out

    return eps


def guided_eps(unet: UNet, schedule: NoiseSchedule, cond: Conditioning, uncond: Conditioning,
               scales: torch.Tensor) -> EpsFn:
    """Classifier-free guidance: eps_u + s * (eps_c - eps_u) with a scale per item ([N]).

    Items whose scale is exactly 1 get eps_c itself, so an image does not change with the
    scales of the other requests in its batch. When every scale is 1 the batch is not doubled.
    """
    if bool((scales == 1).all()):
        return model_eps(unet, schedule, cond)
    if _lengths_differ(cond.context, uncond.context):
        return _separate_guided_eps(model_eps(unet, schedule, cond), model_eps(unet, schedule, uncond), scales)
    both = Conditioning(*(_stack(u, c) for u, c in zip(uncond.tensors, cond.tensors, strict=True)))
    eps_both = model_eps(unet, schedule, both)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e_u, e_c = eps_both(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        s = scales.to(e_c.dtype).view(-1, *([1] * (e_c.ndim - 1)))
        return torch.where(s == 1, e_c, e_u + s * (e_c - e_u))

    return eps


def _lengths_differ(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape[1] != b.shape[1]


def _separate_guided_eps(eps_c: EpsFn, eps_u: EpsFn, scales: torch.Tensor) -> EpsFn:
    """Guidance when the prompt's and the negative prompt's contexts have different lengths (A1111-syntax prompts
    of different chunk counts): two model calls, unpadded, as AUTOMATIC1111 does by default."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e_u, e_c = eps_u(x, t), eps_c(x, t)
        s = scales.to(e_c.dtype).view(-1, *([1] * (e_c.ndim - 1)))
        return torch.where(s == 1, e_c, e_u + s * (e_c - e_u))

    return eps


def _stack(uncond: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor | None:
    """[uncond; cond] along the batch, for the doubled CFG batch."""
    if uncond is None or cond is None:
        if uncond is not cond:
            raise ValueError("conditional and unconditional inputs must both be given or both be None")
        return None
    return torch.cat([uncond, cond])
