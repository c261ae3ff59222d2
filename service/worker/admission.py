"""Who joins a continuous batch, and how many may step together: the admission policy, pure (no Redis, no torch).

Joining is free on an accelerator below its saturation, where a step of k samples costs about what a step of one
does; on a CPU it is not (a step of 8 samples of `tiny-shapes` measured 4x a solo step), and every sample that joins
slows the samples already running. Two settings of `LDM_BATCHING=continuous` say what to do about it:

- `LDM_STEP_COST_BUDGET` (solo steps; 0 = none): the most a step may cost, as a multiple of a step of one sample.
  The worker measures its steps (`StepCosts`: a moving average of the step time at each batch size, fitted with
  cost(k) = a + b k), and `step_capacity` is the most samples whose estimated cost stays within the budget. Until two
  batch sizes are measured, a step of k samples is taken to cost k solo steps (the pessimistic guess, which the
  measurements then relax). A step always carries at least one sample, so a budget never stops the worker.
- `LDM_ADMISSION_ORDER`: which waiting job takes a free slot. `fifo` (the default): arrival order. `shortest`: the
  least work left first (sample-steps: images x steps), which lowers the median latency of mixed step counts; with
  aging, so that long work cannot starve: a job that has waited `LDM_PRIORITY_AGING_S` goes before every job that has
  not, oldest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

AdmissionOrder = Literal["fifo", "shortest"]
#: weight of a new step time in a batch size's moving average
SMOOTHING = 0.2


@dataclass(frozen=True)
class Waiting:
    """A claimed job waiting to start: `work` sample-steps (images x steps), waiting for `waited_s` seconds."""

    work: int
    waited_s: float


def admission_order(waiting: Sequence[Waiting], order: AdmissionOrder, aging_s: float) -> list[int]:
    """The indices of `waiting` (given in arrival order) in the order they may take free slots.

    fifo: arrival order. shortest: the jobs that waited `aging_s` or more first, oldest first; then the others by least
    work, ties in arrival order."""
    if order == "fifo":
        return list(range(len(waiting)))
    if aging_s <= 0:
        raise ValueError(f"aging_s must be positive, got {aging_s}")
    aged = sorted((i for i, w in enumerate(waiting) if w.waited_s >= aging_s), key=lambda i: -waiting[i].waited_s)
    fresh = sorted((i for i, w in enumerate(waiting) if w.waited_s < aging_s), key=lambda i: waiting[i].work)
    return aged + fresh


class StepCosts:
    """Measured step times by batch size (moving averages) and the affine cost model fitted to them."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        """A step of `size` samples took `seconds`."""
        if size < 1 or seconds <= 0:
            return
        before = self.seconds.get(size)
        self.seconds[size] = seconds if before is None else (1 - SMOOTHING) * before + SMOOTHING * seconds

    def relative(self, size: int) -> float:
        """The estimated cost of a step of `size` samples, in solo steps (k until two sizes are measured)."""
        model = self.model()
        if model is None:
            return float(size)
        a, b = model
        return (a + b * size) / (a + b)

    def model(self) -> tuple[float, float] | None:
        """(a, b) of cost(k) = a + b k, least squares over the measured sizes' averages, with a >= 0 and b >= 0 (a
        step never gets cheaper with more samples, nor costs less than nothing); None with fewer than two sizes."""
        if len(self.seconds) < 2:
            return None
        sizes, times = list(self.seconds), list(self.seconds.values())
        mean_k, mean_t = sum(sizes) / len(sizes), sum(times) / len(times)
        var = sum((k - mean_k) ** 2 for k in sizes)
        b = max(0.0, sum((k - mean_k) * (t - mean_t) for k, t in zip(sizes, times, strict=True)) / var)
        a = mean_t - b * mean_k
        if a < 0:  # through the origin instead: cost proportional to the samples
            a, b = 0.0, sum(k * t for k, t in zip(sizes, times, strict=True)) / sum(k * k for k in sizes)
        if a + b <= 0:
            return None
        return a, b


def step_capacity(costs: StepCosts, budget: float, max_batch: int) -> int:
    """The most samples a step may carry: `max_batch`, or fewer so that its estimated cost stays within `budget` solo
    steps (0: no budget); at least 1."""
    if budget <= 0:
        return max_batch
    capacity = 1
    while capacity < max_batch and costs.relative(capacity + 1) <= budget:
        capacity += 1
    return capacity
