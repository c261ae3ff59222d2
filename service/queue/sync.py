"""`SyncJobQueue`: `JobQueue` for a synchronous caller (the torch worker, tests).

The coroutines run on a private event-loop thread and each call blocks the caller, so there is one implementation
of every script, key name and retry rule. The thread hop costs ~0.1-0.2 ms a call (measured on loopback: a
batch's `progress` takes 0.37 ms through it against 0.27 ms direct), small beside a sampler step.

Each method is `JobQueue`'s, wrapped once by `_blocking`: same name, arguments, types and docstring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from service.config import Settings
from service.queue.client import JobQueue
from service.queue.errors import QueueUnavailable

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(method: Callable[Concatenate[JobQueue, P], Coroutine[Any, Any, R]],
              ) -> Callable[Concatenate[SyncJobQueue, P], R]:
    """`method` of `JobQueue` as a method of `SyncJobQueue` that runs it on the queue's loop and waits."""

    @functools.wraps(method)
    def call(self: SyncJobQueue, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self.queue, *args, **kwargs))

    return call


class SyncJobQueue:
    """`JobQueue` for a synchronous caller: every call blocks until done, never longer than the retry budget
    allows (then `QueueUnavailable`)."""

    def __init__(self, settings: Settings, *, url: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ldm-queue-io", daemon=True)
        self._thread.start()
        s = settings
        per_try = s.redis_connect_timeout_s + s.redis_timeout_s
        self._limit_s = (s.redis_retries + 1) * per_try + s.redis_retries * 2.0 + 1.0

        async def build() -> JobQueue:  # on the loop's thread: the Redis client belongs to that loop
            return JobQueue(settings, url=url)

        self.queue = self._run(build())

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=self._limit_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise QueueUnavailable(f"Redis call did not complete in {self._limit_s:.0f} s") from exc

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.queue.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> SyncJobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # front ends (tests use them)
    ping = _blocking(JobQueue.ping)
    submit = _blocking(JobQueue.submit)
    get = _blocking(JobQueue.get)
    result = _blocking(JobQueue.result)
    cancel = _blocking(JobQueue.cancel)
    # workers
    claim = _blocking(JobQueue.claim)
    reclaim = _blocking(JobQueue.reclaim)
    start = _blocking(JobQueue.start)
    progress = _blocking(JobQueue.progress)
    keepalive = _blocking(JobQueue.keepalive)
    finish = _blocking(JobQueue.finish)
    fail = _blocking(JobQueue.fail)
    cancelled = _blocking(JobQueue.cancelled)
    is_cancelled = _blocking(JobQueue.is_cancelled)
    inputs = _blocking(JobQueue.inputs)
    # registry, stats
    heartbeat = _blocking(JobQueue.heartbeat)
    deregister = _blocking(JobQueue.deregister)
    workers = _blocking(JobQueue.workers)
    stats = _blocking(JobQueue.stats)
