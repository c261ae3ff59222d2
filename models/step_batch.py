"""Step-level batching: samples with their own plans share one denoiser call per step.

Language-model servers schedule per iteration (Orca, vLLM): requests join and leave a running batch at every
step. A diffusion step is the same unit. A `StepBatch` holds running samples, one image each, every one with its
own sampler state (models/samplers.py step form: latent, step index, multistep history, generator), conditioning
pair, guidance scale and optional after-step hook (inpainting's blend). `step()` makes one denoiser call over
all of them, whatever their samplers, step counts, timesteps, guidance scales and seeds, advances each sample
and retires those at the end of their plan; `admit` adds a compatible sample between two steps and `cancel`
drops one, so a slot frees at the next step.

A step is all or nothing: an exception from any denoiser call or sampler update (CUDA out of memory, say) leaves
every sample as it was, generators included, so the caller may retry the step with fewer rows per denoiser call
(`step(max_rows=...)`: the running samples in consecutive chunks, one call each) and lose nothing.

An image does not depend on when it joined or on its neighbours: its noise comes from its own generator, its
state is its own, guidance is mixed per row, the sampler arithmetic is elementwise, and on the CPU the layers
are batch-invariant (models/layers.py), so its rows of the model call are the rows it gets alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.diffusion import NoiseSchedule
from models.guidance import Conditioning, guided_eps
from models.samplers import SamplerState, latent, model_input, step, with_latent
from models.unet import UNet

if TYPE_CHECKING:
    from models.lora import AdapterSet

#: denoise(x [N, C, H, W], t [N], cond, uncond, scales [N]) -> guided eps [N, C, H, W]
Denoiser = Callable[[Tensor, Tensor, Conditioning, Conditioning, Tensor], Tensor]
#: after_step(i, x): the VP latent [1, C, H, W] after step i; a tensor it returns replaces it
AfterStep = Callable[[int, Tensor], Tensor | None]


def guided_denoiser(unet: UNet, schedule: NoiseSchedule) -> Denoiser:
    """The model's classifier-free-guided eps over one step's rows (`guided_eps`, as the static path uses)."""

    def denoise(x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scales: Tensor) -> Tensor:
        return guided_eps(unet, schedule, cond, uncond, scales)(x, t)

    return denoise


@dataclass(frozen=True, eq=False)
class StepSample:
    """One image being made: its state (one item) and what its model rows are conditioned on.

    key: the caller's name for it, unique within a batch. cond / uncond: one row each ([1, ...] tensors).
    """

    key: Hashable
    state: SamplerState
    cond: Conditioning
    uncond: Conditioning
    guidance_scale: float = 1.0
    after_step: AfterStep | None = None
    #: LoRA adapters and weights on this sample's rows (models/lora.py; applied by the batch's `around`)
    adapters: AdapterSet = ()

    def __post_init__(self) -> None:
        if self.state.x.shape[0] != 1:
            raise ValueError(f"a step sample is one image, got a state of {self.state.x.shape[0]} items")

    @property
    def latent(self) -> Tensor:
        """The VP latent [1, C, h, w] at its current level (the final latent once `state.done`)."""
        return latent(self.state)

    @property
    def signature(self) -> tuple[object, ...]:
        """What samples sharing a model call must agree on: latent shape, dtype and device, and which
        conditioning tensors exist with what shapes (same model, task and latent size)."""
        x = self.state.x
        return (tuple(x.shape[1:]), x.dtype, x.device, _shapes(self.cond), _shapes(self.uncond))


class StepBatch:
    """The running samples of one model; one `step()` is one denoiser call over all of them."""

    def __init__(self, denoise: Denoiser, max_items: int, *,
                 around: Callable[[Sequence[StepSample]], AbstractContextManager[None]] | None = None) -> None:
        """`around`: a context each denoiser call runs in, given the samples of its rows in order (per-sample
        LoRA adapters); None: nothing."""
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.denoise, self.max_items, self.around = denoise, max_items, around
        self._running: dict[Hashable, StepSample] = {}

    def __len__(self) -> int:
        return len(self._running)

    def __iter__(self) -> Iterator[StepSample]:
        return iter(list(self._running.values()))

    def compatible(self, sample: StepSample) -> bool:
        """Whether `sample` can share a model call with the samples running (any sample can join an empty batch):
        same latent shape, dtype and device, same conditioning shapes (an A1111 prompt of more chunks cannot)."""
        first = next(iter(self._running.values()), None)
        return first is None or first.signature == sample.signature

    def refusal(self, sample: StepSample) -> str | None:
        """Why `sample` cannot join now (None: it can)."""
        if sample.key in self._running:
            return f"a sample with key {sample.key!r} is already running"
        if sample.state.done:
            return f"sample {sample.key!r} has no step left to run"
        if len(self._running) >= self.max_items:
            return f"the batch is full ({self.max_items} samples)"
        first = next(iter(self._running.values()), None)
        if first is not None and first.signature != sample.signature:
            return (f"sample {sample.key!r} does not fit this batch: {_describe(sample.signature)} against "
                    f"{_describe(first.signature)}")
        return None

    def admit(self, sample: StepSample) -> None:
        """Add a sample; it takes part from the next `step()` on. ValueError when `refusal` names a reason."""
        reason = self.refusal(sample)
        if reason is not None:
            raise ValueError(reason)
        self._running[sample.key] = sample

    def cancel(self, key: Hashable) -> bool:
        """Drop a running sample (its slot is free for the next step); False when no such sample runs."""
        return self._running.pop(key, None) is not None

    @torch.inference_mode()
    def step(self, max_rows: int | None = None) -> list[StepSample]:
        """One step of every running sample: denoiser calls over at most `max_rows` samples each (None: all in one
        call), then one sampler update each. Returns the samples that completed a step (their new state; those
        with `state.done` have left the batch). plms' warm-up call completes no step, so a sample in it is not
        returned. All or nothing: when a call or an update raises, the batch is left as it was (see the module
        docstring)."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        samples = list(self._running.values())
        if not samples:
            return []
        rows = max_rows or len(samples)
        eps = torch.cat([self._denoise(samples[start:start + rows]) for start in range(0, len(samples), rows)])
        saved = [[g.get_state() for g in s.state.generators] for s in samples]  # what the updates draw from
        try:
            updated = [replace(s, state=_advance(s, row)) for s, row in zip(samples, eps.split(1), strict=True)]
        except BaseException:
            for s, states in zip(samples, saved, strict=True):
                for g, state in zip(s.state.generators, states, strict=True):
                    g.set_state(state)
            raise
        for new in updated:
            if new.state.done:
                del self._running[new.key]
            else:
                self._running[new.key] = new
        return [new for old, new in zip(samples, updated, strict=True) if new.state.i > old.state.i]

    def _denoise(self, samples: Sequence[StepSample]) -> Tensor:
        """The guided eps [N, C, h, w] of `samples`' rows, in one denoiser call."""
        inputs = [model_input(s.state) for s in samples]
        x = torch.cat([x for x, _ in inputs])  # [N, C, h, w]
        t = torch.cat([t for _, t in inputs])  # [N]
        scales = torch.tensor([s.guidance_scale for s in samples], device=x.device)
        with self.around(samples) if self.around is not None else nullcontext():
            return self.denoise(x, t, _cat([s.cond for s in samples]), _cat([s.uncond for s in samples]), scales)


def _advance(sample: StepSample, eps: Tensor) -> SamplerState:
    """The sampler update of one sample, then its after-step hook when a step completed."""
    state = step(sample.state, eps)
    if sample.after_step is None or state.i == sample.state.i:
        return state
    out = sample.after_step(sample.state.i, latent(state))
    return state if out is None else with_latent(state, out)


def _shapes(c: Conditioning) -> tuple[tuple[int, ...] | None, ...]:
    return tuple(None if v is None else tuple(v.shape[1:]) for v in c.tensors)


def _describe(signature: tuple[object, ...]) -> str:
    shape, dtype, device, cond, _ = signature
    return f"latent {shape} {dtype} on {device}, conditioning (context, concat, class, vector) {cond}"


def _cat(conditionings: Sequence[Conditioning]) -> Conditioning:
    """The rows of every sample's conditioning stacked in order (signatures agree, so all or none exist)."""

    def cat(parts: list[Tensor | None]) -> Tensor | None:
        tensors = [p for p in parts if p is not None]
        return torch.cat(tensors) if tensors else None

    return Conditioning(*(cat(list(parts)) for parts in zip(*(c.tensors for c in conditionings), strict=True)))
