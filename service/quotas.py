"""Per-key quotas, shared by every API replica through Redis: a submission rate and a cap on jobs in flight.

- Rate: a token bucket per key (`key_rate_limit_per_s` sustained, `key_rate_burst` at once), refilled and spent in
  one Lua script on Redis's clock, so replicas share one bucket and their clocks do not matter. Spent by every
  request that would create a job, before its images are decoded; reads (status, images, events) are free, so a
  throttled client can still collect what it has.
- In flight: at most `key_max_jobs_in_flight` jobs of a key queued or running. A submission reserves a slot (a
  short-lived token in a sorted set, atomically counted with the key's jobs), submits, then swaps the token for
  the job id. A job frees its slot by reaching a terminal state (succeeded, failed, cancelled, expired) or by its
  record expiring: when a key is at its cap, its job ids are checked against their records and the ended ones
  dropped, then the reservation is tried once more. Nothing in the job protocol has to know about quotas, and a
  job can never be released twice or forgotten (a crashed API leaves at most a token, which expires in
  `RESERVATION_S`).

Identity: `Principal.key_id` (a digest prefix), never the key. With authentication off there is no key to count
for, and no quota applies (the global `queue_max_depth` still does): a server without keys is private (loopback,
or `auth_disabled` on a trusted network), and per-address limits would only throttle its one proxy.
Answers: `QuotaExceeded` -> 429 / RESOURCE_EXHAUSTED with Retry-After.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from service.auth import Principal
from service.queue import Job, JobQueue, JobStatus, QueueError, QueueUnavailable, retrying
from service.schemas import GenerationRequest

T = TypeVar("T")

Quota = Literal["rate", "in_flight"]
RESERVATION_S = 60  # a reservation not turned into a job within this long (the API died mid-submit) lapses
_TERMINAL = {s.value.encode() for s in JobStatus if s.terminal}

# KEYS: bucket.  ARGV: rate per s, burst, ttl ms.  Returns {1, tokens left} or {0, seconds until one token}.
_TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(v[1]) or burst, tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then return {0, tostring((1 - tokens) / rate)} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tostring(tokens - 1)}
"""

# KEYS: jobs (set), reservations (zset).  ARGV: cap, token, reservation s, ttl ms.  Returns {1|0, slots used}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
local used = redis.call('SCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if used >= tonumber(ARGV[1]) then return {0, used} end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 1000)
return {1, used + 1}
"""

# KEYS: jobs, reservations.  ARGV: token, job id, ttl ms.
_COMMIT = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class QuotaExceeded(QueueError):
    """A key over one of its quotas (-> 429 / RESOURCE_EXHAUSTED with Retry-After `retry_after_s`)."""

    def __init__(self, quota: Quota, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.quota, self.retry_after_s = quota, retry_after_s


class Quotas:
    """The quotas over one front end's JobQueue (its Redis client and retry rules)."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue, self.settings = queue, queue.settings
        self.keys = queue.keys  # every key name is in service/queue/keys.py
        redis = queue.redis
        self._take = redis.register_script(_TAKE_TOKEN)
        self._reserve = redis.register_script(_RESERVE)
        self._commit = redis.register_script(_COMMIT)

    async def take_token(self, principal: Principal) -> None:
        """Spend one submission of `principal`'s rate; raises QuotaExceeded when the bucket is empty."""
        s = self.settings
        if principal.anonymous or s.key_rate_limit_per_s <= 0:
            return
        ttl_ms = math.ceil(s.key_rate_burst / s.key_rate_limit_per_s * 1000) + 1000
        allowed, value = await _redis(self.queue, lambda: self._take(
            keys=[self.keys.quota_bucket(principal.key_id)],
            args=[repr(s.key_rate_limit_per_s), s.key_rate_burst, ttl_ms]))
        if not int(allowed):
            wait = max(1, math.ceil(float(value)))
            raise QuotaExceeded("rate", f"rate limit of this API key exceeded ({s.key_rate_limit_per_s:g} jobs/s, "
                                f"bursts of {s.key_rate_burst}); retry in {wait} s", wait)

    async def submit(self, principal: Principal, request: GenerationRequest, *, idempotency_key: str | None = None,
                     deadline_s: float | None = None) -> Job:
        """`JobQueue.submit` for `principal` (the job's owner) within its cap of jobs in flight; raises QuotaExceeded
        beyond it, and PriorityNotAllowed for a priority above the key's max_priority."""
        principal.check_priority(request.priority)
        cap = self.settings.key_max_jobs_in_flight
        owner = principal.key_id
        if principal.anonymous or cap <= 0:
            return await self.queue.submit(request, idempotency_key=idempotency_key, deadline_s=deadline_s,
                                           owner=owner)
        token = f"r-{uuid.uuid4().hex}"
        await self._reserve_slot(principal.key_id, token, cap)
        try:
            job = await self.queue.submit(request, idempotency_key=idempotency_key, deadline_s=deadline_s,
                                          owner=owner)
        except BaseException:
            await self._release(principal.key_id, token)
            raise
        await _redis(self.queue, lambda: self._commit(keys=self._slot_keys(principal.key_id),
                                                      args=[token, job.id, self._jobs_ttl_ms]))
        return job

    async def in_flight(self, principal: Principal) -> int:
        """Jobs of `principal` still queued or running (ended ones are dropped on the way)."""
        await self._prune(principal.key_id)
        return int(await _redis(self.queue, lambda: self.queue.redis.scard(self.keys.quota_jobs(principal.key_id))))

    # -- helpers

    @property
    def _jobs_ttl_ms(self) -> int:
        """The set outlives any unfinished job record it names (see JobQueue's live TTL)."""
        return int((self.settings.job_deadline_s + self.settings.result_ttl_s) * 1000)

    def _slot_keys(self, key_id: str) -> list[str]:
        return [self.keys.quota_jobs(key_id), self.keys.quota_reservations(key_id)]

    async def _reserve_slot(self, key_id: str, token: str, cap: int) -> None:
        args: list[str | int] = [cap, token, RESERVATION_S, self._jobs_ttl_ms]
        for attempt in range(2):  # the second round after dropping jobs that have ended
            ok, used = await _redis(self.queue, lambda: self._reserve(keys=self._slot_keys(key_id), args=args))
            if int(ok):
                return
            if attempt == 0:
                await self._prune(key_id)
        retry = self.settings.queue_retry_after_s
        raise QuotaExceeded("in_flight", f"this API key has {int(used)} jobs in flight (queued or running), its limit "
                            f"of {cap}; retry when one has finished (in about {retry} s)", retry)

    async def _prune(self, key_id: str) -> None:
        """Drop the key's jobs that have ended or expired. Not atomic, and need not be: a job that has ended never
        runs again, so removing it can only be right."""
        redis, key = self.queue.redis, self.keys.quota_jobs(key_id)
        members = [m for m in await _redis(self.queue, lambda: redis.smembers(key)) if isinstance(m, bytes)]
        if not members:
            return

        async def statuses() -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for job_id in members:
                    pipe.hget(self.queue.keys.job(job_id.decode()), "status")
                return list(await pipe.execute())

        found = await _redis(self.queue, statuses)
        ended = [m for m, status in zip(members, found, strict=True) if status is None or status in _TERMINAL]
        if ended:
            await _redis(self.queue, lambda: redis.srem(key, *ended))

    async def _release(self, key_id: str, token: str) -> None:
        with contextlib.suppress(QueueUnavailable):  # else the reservation lapses by itself after RESERVATION_S
            await _redis(self.queue, lambda: self.queue.redis.zrem(self.keys.quota_reservations(key_id), token))


@retrying
async def _redis(queue: JobQueue, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` under the queue's retry rules: connection errors retried with backoff, then QueueUnavailable."""
    return await call()
