"""The bounded Redis connection pool of one process: `redis_max_connections` at most, and a call that finds them all
busy waits for one (`redis_pool_timeout_s`) instead of opening another.

redis-py's default pool opens a connection for every concurrent command and never refuses, so a thousand open
progress streams (each blocking on its job's events) would be a thousand Redis connections from one API process,
and one process could use up Redis's `maxclients` for everyone. A wait that times out raises `QueueUnavailable` at
once (503 / UNAVAILABLE), not a connection error: the queue's retries are for a Redis that went away, not for a
pool that is busy, where retrying would only wait again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config import Settings
from service.queue.errors import QueueUnavailable


class BoundedPool(aioredis.BlockingConnectionPool):
    """A `BlockingConnectionPool` whose wait for a free connection ends in `QueueUnavailable`."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise QueueUnavailable(f"all {self.max_connections} Redis connections of this process stayed busy "
                                       f"for {self.timeout:g} s (redis_max_connections)") from exc
            raise


def bounded_pool(url: str, settings: Settings) -> BoundedPool:
    """The pool for `url` with the settings' size, wait and socket timeouts."""
    pool: BoundedPool = BoundedPool.from_url(
        url, max_connections=settings.redis_max_connections, timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_connect_timeout_s,
        retry=Retry(NoBackoff(), 0),  # no retries inside redis-py: the queue's own (`retrying`) decide
        client_name=settings.key_prefix)  # CLIENT LIST names the deployment's connections
    return pool
