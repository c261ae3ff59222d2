"""Per-item Gaussian noise: each batch item draws from its own generator, so an image does not
depend on the batch it was generated in (the rule diffusers follows with a list of generators)."""

from collections.abc import Sequence

import torch


def randn_per_item(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw `shape` = [N, ...] noise, item i from `generators[i]`, on the generator's device.

    Draws happen in fp32 on the generator's device (CPU for seeds that must reproduce across
    machines) and are then moved and cast, exactly as diffusers' `randn_tensor` does.
    """
    shape = list(shape)
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per batch item: {shape[0]} items, {len(generators)} generators")
    draws = [
        torch.randn([1, *shape[1:]], generator=g, device=g.device, dtype=torch.float32) for g in generators
    ]
    return torch.cat(draws).to(device=device, dtype=dtype)


def generators_from_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per item: what a request's seed means everywhere in this project."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
