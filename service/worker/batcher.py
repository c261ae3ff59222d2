"""The batching decision: claimed jobs in, batches of samples out. A pure function (no Redis, no torch).

Jobs are compatible when their `BatchKey`s are equal (model, task, size, sampler, steps, karras, eta,
strength): they can share one sampler run, with prompts, seeds and guidance scales varying per sample.
A job asking for `n` images becomes `n` samples with seeds `seed + i`. A batch holds at most `max_batch`
samples; a bigger group is cut into consecutive batches, so a job's samples may span two batches (the
caller collects them by `Sample.index`). Order is first in, first out: samples keep the jobs' order inside
a batch, and batches come in the order of their first sample's job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.schemas import BatchKey, GenerationRequest

T = TypeVar("T")


@dataclass(frozen=True)
class Sample(Generic[T]):
    """Image `index` (of the job's `n`) of `job`, made with `seed`."""

    job: T
    index: int
    seed: int


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Samples that run as one sampler call; `key` is what they share."""

    key: BatchKey
    samples: tuple[Sample[T], ...]

    @property
    def jobs(self) -> list[T]:
        """The distinct jobs with a sample here, in order (the worker's one way to go from samples to jobs)."""
        seen: list[T] = []
        for s in self.samples:
            if not any(s.job is j for j in seen):
                seen.append(s.job)
        return seen

    def __len__(self) -> int:
        return len(self.samples)


def claim_request(item: Any) -> GenerationRequest:
    """The request of a `service.queue.Claim` (the default accessor)."""
    request: GenerationRequest = item.job.request
    return request


def make_batches(jobs: Sequence[T], max_batch: int, *,
                 request: Callable[[T], GenerationRequest] = claim_request,
                 key: Callable[[T], BatchKey] | None = None) -> list[Batch[T]]:
    """Group `jobs` (in arrival order) into batches of at most `max_batch` samples.

    `request(job)` gives a job's `GenerationRequest` (default: a `Claim`'s); `key(job)` its batch key
    (default: `request(job).batch_key()`; the worker passes one with the input image's size filled in).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    groups: dict[BatchKey, list[tuple[int, Sample[T]]]] = {}
    for position, job in enumerate(jobs):
        r = request(job)
        k = key(job) if key is not None else r.batch_key()
        groups.setdefault(k, []).extend((position, Sample(job, i, seed)) for i, seed in enumerate(r.seeds()))
    batches: list[tuple[int, Batch[T]]] = []
    for k, samples in groups.items():
        for start in range(0, len(samples), max_batch):
            chunk = samples[start:start + max_batch]
            batches.append((chunk[0][0], Batch(k, tuple(s for _, s in chunk))))
    batches.sort(key=lambda pb: pb[0])  # stable: chunks of one group keep their order
    return [b for _, b in batches]
