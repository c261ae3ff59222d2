"""Per-key quotas, shared by every API replica through Redis: a submission rate, a cap on jobs in flight, a budget
of work and a cap on stored result bytes.

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
- Work: a second token bucket per key, in work units (`work_units`: images x width x height x steps / 1024², so one
  1024x1024 image at one step is 1 unit), `key_work_per_s` sustained and `key_work_burst` at once: the job rate
  counts requests, but an 8-image 1024² request is 256 times a 1-image 256² one for the device. Spent when a job is
  queued (after the jobs-in-flight slot, before the queue's admission), refunded if the queue refuses it; a resend
  whose Idempotency-Key already names a job costs nothing. A request costing more than the burst is accepted from a
  full bucket only and leaves it in debt, so a key can always run the largest request the limits allow, at its rate.
- Stored bytes: the worker adds every result's PNG bytes to its owner's count when it stores them (the settle
  script, service/queue/scripts.py), each entry expiring with the results (`result_ttl_s`); a key at
  `key_max_stored_bytes` is refused new jobs until enough has expired (Retry-After says when). Results of jobs still
  running when the count is read are not in it yet, so a key can pass the cap by at most its jobs in flight.

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

#: rate, in_flight, work, stored_bytes: a key's quotas here; streams, waiting_calls: a key's concurrent calls, and
#: server_streams, server_waiting_calls: the API process's (service/api/calls.py)
Quota = Literal["rate", "in_flight", "work", "stored_bytes", "streams", "waiting_calls", "server_streams",
                "server_waiting_calls"]
WORK_UNIT_PIXELS = 1024 * 1024  # one work unit: a 1024x1024 image at one sampler step
DEFAULT_SIDE = 512  # a request that leaves its size to the model is charged as 512x512
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

# KEYS: bucket.  ARGV: rate per s, burst, cost.  Returns {1, tokens left} or {0, seconds until enough, tokens}.
# A cost above the burst needs a full bucket and leaves it in debt (tokens < 0).
_TAKE_WORK = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(v[1]) or burst, tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local need = math.min(cost, burst)
if tokens < need then return {0, tostring((need - tokens) / rate), tostring(tokens)} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - cost), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens + cost) / rate * 1000) + 1000)
return {1, tostring(tokens - cost)}
"""

# KEYS: bucket.  ARGV: cost.  Gives back what a refused submission spent.
_REFUND_WORK = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[1]) end
return 1
"""

# KEYS: stored zset, stored total.  ARGV: cap.  Drops the expired entries, then {1, bytes} when under the cap, or
# {0, bytes, seconds until enough has expired to be under it}.
_STORED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  gone = gone + tonumber(string.match(m, ' (%d+)$'))
end
if gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('DECRBY', KEYS[2], gone)
end
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if total < 0 then redis.call('SET', KEYS[2], 0, 'KEEPTTL'); total = 0 end
local cap = tonumber(ARGV[1])
if total < cap then return {1, total} end
local entries, freed = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), 0
for i = 1, #entries, 2 do
  freed = freed + tonumber(string.match(entries[i], ' (%d+)$'))
  if total - freed < cap then return {0, total, tostring((tonumber(entries[i + 1]) - now) / 1000)} end
end
return {0, total, '1'}
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
    """A key over one of its quotas, or a call over a concurrency cap (-> 429 / RESOURCE_EXHAUSTED with Retry-After
    `retry_after_s`; counted in ldm_quota_rejections_total by `quota`)."""

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
        self._take_work = redis.register_script(_TAKE_WORK)
        self._refund_work = redis.register_script(_REFUND_WORK)
        self._stored = redis.register_script(_STORED)

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
        """`JobQueue.submit` for `principal` (the job's owner) within its stored bytes, its jobs in flight and its
        work budget, checked in that order; raises QuotaExceeded beyond one of them, and PriorityNotAllowed for a
        priority above the key's max_priority."""
        principal.check_priority(request.priority)
        owner = principal.key_id
        if principal.anonymous:
            return await self.queue.submit(request, idempotency_key=idempotency_key, deadline_s=deadline_s)
        await self._check_stored(owner)
        cap = self.settings.key_max_jobs_in_flight
        token = f"r-{uuid.uuid4().hex}" if cap > 0 else None
        if token is not None:
            await self._reserve_slot(owner, token, cap)
        cost = 0.0
        try:
            cost = await self._spend_work(owner, request, idempotency_key)
            job = await self.queue.submit(request, idempotency_key=idempotency_key, deadline_s=deadline_s,
                                          owner=owner)
        except BaseException:
            if cost:
                await self._refund(owner, cost)
            if token is not None:
                await self._release(owner, token)
            raise
        if token is not None:
            await _redis(self.queue, lambda: self._commit(keys=self._slot_keys(owner),
                                                          args=[token, job.id, self._jobs_ttl_ms]))
        return job

    async def stored_bytes(self, principal: Principal) -> int:
        """Bytes of `principal`'s results still stored (expired ones dropped on the way)."""
        allowed, total, *_ = await self._stored_state(principal.key_id, cap=2**62)
        return int(total)

    async def in_flight(self, principal: Principal) -> int:
        """Jobs of `principal` still queued or running (ended ones are dropped on the way)."""
        await self._prune(principal.key_id)
        return int(await _redis(self.queue, lambda: self.queue.redis.scard(self.keys.quota_jobs(principal.key_id))))

    # -- helpers

    async def _stored_state(self, key_id: str, cap: int) -> list[Any]:
        keys = [self.keys.quota_stored(key_id), self.keys.quota_stored_total(key_id)]
        return list(await _redis(self.queue, lambda: self._stored(keys=keys, args=[cap])))

    async def _check_stored(self, key_id: str) -> None:
        cap = self.settings.key_max_stored_bytes
        if cap <= 0:
            return
        allowed, total, *rest = await self._stored_state(key_id, cap)
        if not int(allowed):
            wait = max(1, math.ceil(float(rest[0])))
            raise QuotaExceeded("stored_bytes", f"this API key has {int(total)} bytes of results stored, its limit of "
                                f"{cap} (key_max_stored_bytes); they expire {self.settings.result_ttl_s} s after "
                                f"their job: retry in {wait} s", wait)

    async def _spend_work(self, key_id: str, request: GenerationRequest, idempotency_key: str | None) -> float:
        """Spend the request's work units; 0 spent when there is no budget or the idempotency key already names a
        job (a resend). Raises QuotaExceeded."""
        s = self.settings
        if s.key_work_per_s <= 0:
            return 0.0
        if idempotency_key is not None:
            known = await _redis(self.queue, lambda: self.queue.redis.exists(
                self.keys.idempotency(key_id, idempotency_key)))
            if known:
                return 0.0
        cost = work_units(request)
        allowed, value, *rest = await _redis(self.queue, lambda: self._take_work(
            keys=[self.keys.quota_work(key_id)], args=[repr(s.key_work_per_s), repr(s.key_work_burst), repr(cost)]))
        if not int(allowed):
            wait = max(1, math.ceil(float(value)))
            raise QuotaExceeded("work", f"this request costs {cost:.4g} work units (images x width x height x steps / "
                                f"1024²); this API key has {max(0.0, float(rest[0])):.4g} left of its "
                                f"{s.key_work_burst:g}, refilled at {s.key_work_per_s:g} per second (key_work_per_s): "
                                f"retry in {wait} s, or ask for less", wait)
        return cost

    async def _refund(self, key_id: str, cost: float) -> None:
        with contextlib.suppress(QueueUnavailable):  # lost: the key waits a little longer, no more
            await _redis(self.queue, lambda: self._refund_work(keys=[self.keys.quota_work(key_id)], args=[repr(cost)]))

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


def work_units(request: GenerationRequest) -> float:
    """What a request costs the workers: images x width x height x steps / 1024² (a size left to the model counts as
    `DEFAULT_SIDE` square)."""
    width, height = request.width or DEFAULT_SIDE, request.height or DEFAULT_SIDE
    return request.n * width * height * request.steps / WORK_UNIT_PIXELS
