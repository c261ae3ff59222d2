"""What both training loops share: EMA, warm-up, exact-resume checkpoints, the loss log, the run folder.

A run folder holds `config.yaml` (the resolved training config), `log.csv` (one row per logged step),
`checkpoints/last.pt` (everything needed to resume exactly: model, EMA, optimisers, step, RNG states)
and `samples/` (grids). Resuming restores the RNG states too, so a resumed run computes the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from torch import nn

from models.config import from_dict, to_dict

log = logging.getLogger(__name__)

T = TypeVar("T")


def load_train_config(cls: type[T], path: Path | None, overrides: Mapping[str, Any] | None = None) -> T:
    """A training config from YAML (unknown keys are errors), then `overrides` (CLI flags) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, where=path.name if path else cls.__name__)


def write_resolved_config(run_dir: Path, config: Any, extra: Mapping[str, Any] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = to_dict(config)
    data.update(extra or {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def warmup_lr(step: int, base_lr: float, warmup_steps: int, decay_start: int | None = None,
              total_steps: int = 0, final_fraction: float = 0.1) -> float:
    """Linear warm-up from ~0 to base_lr over `warmup_steps`, then constant (as LDM's LambdaLinearScheduler);
    with `decay_start`, a linear decay from there to final_fraction * base_lr at `total_steps`."""
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup_steps))
    if decay_start is not None and step >= decay_start and total_steps > decay_start:
        progress = min(1.0, (step - decay_start) / (total_steps - decay_start))
        lr *= 1.0 - (1.0 - final_fraction) * progress
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's parameters (LDM's LitEma), with warm-up of the decay
    (min(decay, (1 + n) / (10 + n))) so early averages are not dominated by the random init."""

    def __init__(self, module: nn.Module, decay: float = 0.9999) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadows, values = [], []
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                shadows.append(self.shadow[key])
                values.append(value.detach().float())
            else:
                self.shadow[key].copy_(value)
        torch._foreach_lerp_(shadows, values, 1 - decay)  # one fused launch per group (matters on a GPU)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(p.dtype) for (k, v), p in zip(self.shadow.items(),
                                                                       module.state_dict().values(), strict=True)})


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomic: written to a temporary file and renamed, so a run cut mid-save keeps its last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # our own files: optimiser states and RNG states need the full unpickler (numpy arrays, tuples)
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


class LossLog:
    """Append-only CSV of logged values; survives resume (rows past the resumed step are dropped)."""

    def __init__(self, path: Path, fields: Iterable[str], resume_step: int | None = None) -> None:
        self.path = path
        self.fields = ["step", *fields]
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as fh:
            row = {"step": step, **{k: f"{v:.6g}" for k, v in values.items() if k in self.fields}}
            csv.DictWriter(fh, self.fields).writerow(row)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of images in [-1, 1], on [0, 1]."""
    x, y = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    channels = x.shape[1]
    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)

