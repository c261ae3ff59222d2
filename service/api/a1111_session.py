"""What AUTOMATIC1111's API keeps between calls, kept per caller in Redis: its options and its current job.

A1111 is one user's server: `POST /sdapi/v1/options` changes the model for everyone, and `GET progress`,
`POST interrupt` and `skip` act on the one job running. Here many callers share the service, so each API key (all
anonymous callers together, when the server has no keys) has its own options and its own "current job": the
latest one it started through /sdapi/v1. Kept in Redis, so every API replica sees them; they expire after
`OPTIONS_TTL_S` unused (options) and with the job's record (the current job).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from service.auth import Principal
from service.queue import JobQueue, retrying

T = TypeVar("T")
OPTIONS_TTL_S = 30 * 24 * 3600
MAX_OPTIONS_BYTES = 16 * 1024  # options are a few names and numbers; a client storing more is refused


class OptionsTooLarge(ValueError):
    """The options a caller sets would pass `MAX_OPTIONS_BYTES`."""


@dataclass(frozen=True)
class A1111Keys:
    """The Redis key names of the A1111 state, under the service's prefix."""

    prefix: str

    def options(self, who: str) -> str:
        return f"{self.prefix}:sdapi:options:{who}"

    def current(self, who: str) -> str:
        return f"{self.prefix}:sdapi:current:{who}"


@retrying
async def _redis(queue: JobQueue, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` under the queue's retry rules."""
    return await call()


@dataclass(frozen=True)
class A1111Session:
    """One caller's A1111 state on the queue's Redis."""

    queue: JobQueue
    principal: Principal

    @property
    def _keys(self) -> A1111Keys:
        return A1111Keys(self.queue.settings.key_prefix)

    @property
    def _who(self) -> str:
        return self.principal.key_id or "anonymous"

    async def options(self) -> dict[str, Any]:
        raw = await _redis(self.queue, lambda: self.queue.redis.get(self._keys.options(self._who)))
        return dict(json.loads(raw)) if raw else {}

    async def set_options(self, update: dict[str, Any]) -> dict[str, Any]:
        """Merge `update` into the caller's options (not atomic: the last of two concurrent writers wins, as
        in A1111)."""
        merged = {**await self.options(), **update}
        blob = json.dumps(merged)
        if len(blob) > MAX_OPTIONS_BYTES:
            raise OptionsTooLarge(f"options would be {len(blob)} bytes; the limit is {MAX_OPTIONS_BYTES}")
        await _redis(self.queue, lambda: self.queue.redis.set(self._keys.options(self._who), blob, ex=OPTIONS_TTL_S))
        return merged

    async def set_current(self, job_id: str) -> None:
        ttl = int(self.queue.settings.job_deadline_s + self.queue.settings.result_ttl_s)
        await _redis(self.queue, lambda: self.queue.redis.set(self._keys.current(self._who), job_id, ex=ttl))

    async def current(self) -> str | None:
        raw = await _redis(self.queue, lambda: self.queue.redis.get(self._keys.current(self._who)))
        return raw.decode() if isinstance(raw, bytes) else raw
