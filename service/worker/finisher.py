"""Finishing jobs off the step loop: a job's PNGs encode and its results go to Redis while the next step runs.

When a job's last image is decoded, the worker hands the job over (its images' PNG futures, encoding on the runner's
PNG threads) and goes on at once with the next step or batch; the finisher's thread waits for those PNGs, stores
the job and acknowledges it (`Worker._finish`), or fails it alone when one of its PNGs failed. On a GPU the device
runs the next step while the CPU encodes and writes: at batch 8 of SD-1.5 at 512 px on an H200 the PNGs alone are
about a tenth of a batch's time (docs/benchmarks.md), time the device otherwise sits idle.

- Ownership: a job handed over is the finisher's; the worker's loop no longer reads or writes it. The finisher's
  thread is the only one that settles it, and the claim is released when it is settled (the heartbeat keeps it
  alive until then).
- Bounded: at most `limit` images in hand; `hand` waits for the oldest jobs beyond that, so a worker that makes
  images faster than it can encode them slows down instead of piling them up (the wait is a metric).
- Errors: what settling raises (Redis unavailable) is raised in the worker's loop at its next `collect`, where the
  loop's reset and retry take it; the job stays pending in Redis and is taken over after the visibility timeout.
- `overlap=False` (LDM_WORKER_FINISH_OVERLAP=false) settles each job before `hand` returns: the order of events of
  a worker without a finisher.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("service.worker")


@dataclass(frozen=True)
class _Handed:
    settled: Future[None]
    images: int


class Finisher:
    """One thread that settles the jobs handed to it, in order (see the module docstring)."""

    def __init__(self, limit: int, *, overlap: bool = True, on_blocked: Callable[[float], None] | None = None) -> None:
        """`limit`: the most images in hand before `hand` waits (at least one job's are taken whatever its size);
        `on_blocked(seconds)`: the loop waited that long for the finisher."""
        self.limit = limit
        self.overlap = overlap
        self.on_blocked = on_blocked
        self._pool: ThreadPoolExecutor | None = None
        self._handed: deque[_Handed] = deque()

    def __len__(self) -> int:
        """Jobs handed over and not yet settled (or settled, with what they raised not yet collected)."""
        return len(self._handed)

    def hand(self, settle: Callable[[], None], images: int) -> None:
        """Run `settle` (a job's: wait for its PNGs, store it) on the finisher's thread, after the jobs handed
        before it; `images`: how many it holds, for the limit. Beyond the limit, wait for the oldest jobs (what
        they raised is raised here, the job handed all the same)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ldm-finish")
        self._handed.append(_Handed(self._pool.submit(settle), images))
        if not self.overlap:
            self.drain()
            return
        in_hand = sum(h.images for h in self._handed)
        if in_hand <= self.limit:
            return
        began = time.monotonic()
        try:
            while len(self._handed) > 1 and in_hand > self.limit:
                in_hand -= self._settled_first()
        finally:
            self._blocked(time.monotonic() - began)

    def collect(self) -> None:
        """Forget the jobs settled; raise what the first of them to fail raised."""
        while self._handed and self._handed[0].settled.done():
            self._settled_first()

    def drain(self) -> None:
        """Wait until every job handed over is settled; raise what the first of them to fail raised."""
        if not self._handed:
            return
        began = time.monotonic()
        try:
            while self._handed:
                self._settled_first()
        finally:
            self._blocked(time.monotonic() - began)

    def discard(self) -> None:
        """Wait for the jobs handed over and drop what they raised (the loop lost Redis and starts over)."""
        while self._handed:
            handed = self._handed.popleft()
            try:
                handed.settled.result()
            except Exception as exc:  # the queue's, already handled by the reset that called us
                log.debug("finisher: dropped %s after a reset", type(exc).__name__)

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _settled_first(self) -> int:
        """Wait for the oldest job; its images. What it raised is raised here, once: it leaves the line first."""
        handed = self._handed.popleft()
        handed.settled.result()
        return handed.images

    def _blocked(self, seconds: float) -> None:
        if self.on_blocked is not None and seconds > 0:
            self.on_blocked(seconds)
