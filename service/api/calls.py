"""`CallLimits`: caps on the calls that hold an API process for long, per API key and for the whole process.

Two kinds, each with a per-key and a per-process cap (settings `key_max_event_streams` / `max_event_streams`,
`key_max_waiting_calls` / `max_waiting_calls`):
- `streams`: progress streams (SSE `/v1/jobs/{id}/events`, gRPC WatchJob), which anyone may open on their own jobs
  for free and keep open for as long as a job runs;
- `waiting_calls`: synchronous calls waiting for their images (REST /v1/txt2img ..., /v1/images/*, /sdapi/v1/*2img;
  every gRPC call that generates).

Why per process and in memory: what they exhaust is the process's own (its Redis connections: each one holds a
connection of the pool while it blocks on its job's events; its sockets and tasks), so the process counts them, with
no Redis round trip; the settings are checked to fit inside `redis_max_connections` (service/config.py). One
`CallLimits` serves both front ends of a process (`ldm api`, `ldm serve`: service/serve.py). Beyond a cap the call
is refused before anything is queued: `QuotaExceeded` (429 / RESOURCE_EXHAUSTED, Retry-After `queue_retry_after_s`).
Without authentication there is no key, and only the per-process caps apply.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Literal

from service.auth import Principal
from service.config import Settings
from service.metrics import ApiMetrics
from service.quotas import QuotaExceeded

Kind = Literal["streams", "waiting_calls"]
_WHAT: dict[Kind, str] = {"streams": "progress streams open", "waiting_calls": "synchronous calls waiting"}
_SETTINGS: dict[Kind, tuple[str, str]] = {"streams": ("key_max_event_streams", "max_event_streams"),
                                          "waiting_calls": ("key_max_waiting_calls", "max_waiting_calls")}


class CallLimits:
    """Counts of the calls held open, per (kind, key) and per kind; thread-safe (uvicorn and grpc.aio may run on
    different loops of one process)."""

    def __init__(self, settings: Settings, metrics: ApiMetrics | None = None) -> None:
        self.settings, self.metrics = settings, metrics
        self._per_key: Counter[tuple[Kind, str]] = Counter()
        self._total: Counter[Kind] = Counter()
        self._lock = threading.Lock()

    def held(self, kind: Kind, principal: Principal | None = None) -> int:
        """Calls of `kind` held now, by `principal` or by everyone."""
        with self._lock:
            return self._total[kind] if principal is None else self._per_key[kind, principal.key_id]

    def acquire(self, kind: Kind, principal: Principal) -> None:
        """Take a place for a call of `kind`; raises QuotaExceeded at the key's or the process's cap. Pair with
        `release` (or use `hold`)."""
        key_setting, total_setting = _SETTINGS[kind]
        key_cap, total_cap = getattr(self.settings, key_setting), getattr(self.settings, total_setting)
        retry = self.settings.queue_retry_after_s
        with self._lock:
            mine = self._per_key[kind, principal.key_id]
            if not principal.anonymous and mine >= key_cap:
                raise QuotaExceeded(kind, f"this API key has {mine} {_WHAT[kind]}, its limit of {key_cap} "
                                    f"({key_setting}); close one, or retry in {retry} s", retry)
            if self._total[kind] >= total_cap:
                raise QuotaExceeded("server_" + kind,  # type: ignore[arg-type]  # "server_streams" | ...
                                    f"the server has {total_cap} {_WHAT[kind]}, its limit ({total_setting}); "
                                    f"retry in {retry} s", retry)
            self._per_key[kind, principal.key_id] = mine + 1
            self._total[kind] += 1
            total = self._total[kind]
        if self.metrics is not None:
            self.metrics.calls_held.labels(kind).set(total)

    def release(self, kind: Kind, principal: Principal) -> None:
        with self._lock:
            self._per_key[kind, principal.key_id] -= 1
            if self._per_key[kind, principal.key_id] <= 0:
                del self._per_key[kind, principal.key_id]  # no entry left behind per key ever seen
            self._total[kind] -= 1
            total = self._total[kind]
        if self.metrics is not None:
            self.metrics.calls_held.labels(kind).set(total)

    @contextlib.contextmanager
    def hold(self, kind: Kind, principal: Principal) -> Iterator[None]:
        """A place for one call of `kind` while the block runs. Raises QuotaExceeded."""
        self.acquire(kind, principal)
        try:
            yield
        finally:
            self.release(kind, principal)
