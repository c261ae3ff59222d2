"""The Redis job queue: the one thing the front ends and the workers share.

Protocol (see the README's architecture section):
- `submit` writes the job hash, its input images and one entry on the model's stream, atomically, unless the
  idempotency key already names a job or the stream holds `queue_max_depth` unfinished jobs (`QueueFull`).
- A worker `claim`s entries with XREADGROUP (consumer group `workers`) and `reclaim`s, with XAUTOCLAIM, entries
  whose worker went silent for the visibility timeout; every delivery counts in `attempts`, and a job out of
  attempts fails into the dead-letter stream. `start` marks it running, `progress` records steps (and keeps the
  entry's idle time at zero), `finish` stores the PNGs, marks it succeeded and only then XACKs, in one script.
- Every state change is one Lua script, fenced by (worker, attempts): a worker that lost its job to another
  (it was presumed dead) cannot overwrite the new owner's result, so no job is answered twice.
- `cancel` of a queued job cancels it at once (its entry is acked and deleted, so no worker runs it); of a
  running job it sets a flag that `progress` reports to the worker between sampler steps.

Why asyncio: the front ends are async (FastAPI, grpc.aio) and must not block their event loop on Redis, so
`JobQueue` is written once over `redis.asyncio`. The worker is a synchronous torch process; `SyncJobQueue`
runs the same coroutines on a private event-loop thread and blocks the caller, so there is one implementation
of every script, key name and retry rule. The thread hop costs ~0.1-0.2 ms a call (measured on loopback: a
batch's `progress` takes 0.37 ms through it against 0.27 ms direct), small beside a sampler step.

Redis connection errors are retried with exponential backoff `redis_retries` times, then raised as
`QueueUnavailable` (503 / UNAVAILABLE); every socket has a timeout, so no call hangs. Every script is safe to
repeat, so a retry after a lost reply does no harm (a submit retried keeps its job id; a settle already applied
answers ok). The one exception is a claim whose reply is lost: its entries stay pending for this consumer and
are reclaimed after the visibility timeout, so the job is late, not lost. Payloads are JSON, never pickle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.schemas import (
    GenerationRequest,
    Job,
    JobEvent,
    JobStatus,
    QueueStats,
    WorkerInfo,
    admit,
)

GROUP = "workers"  # the consumer group on every job stream
EVENTS_MAXLEN = 256  # events kept per job (approximately): progress of a long job needs no more for SSE resume
DEAD_MAXLEN = 10_000  # dead letters kept (approximately)
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
EVENT_ID = re.compile(r"^\d+(-\d+)?$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as an HTTP header carries it
_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)  # BusyLoadingError (AOF loading) included


class QueueError(Exception):
    """Base of the queue's errors."""


class QueueUnavailable(QueueError):
    """Redis could not be reached after the configured retries (-> 503 / UNAVAILABLE)."""


class QueueFull(QueueError):
    """The model's queue holds its limit of unfinished jobs (-> 429 / RESOURCE_EXHAUSTED with Retry-After)."""

    def __init__(self, model: str, depth: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the queue of model {model!r} is full ({depth} of {limit} jobs); retry in {retry_after_s} s")
        self.model, self.depth, self.limit, self.retry_after_s = model, depth, limit, retry_after_s


class JobNotFound(QueueError, KeyError):
    """No job with that id (never existed, or its record expired) (-> 404 / NOT_FOUND)."""

    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


class IdempotencyConflict(QueueError):
    """The idempotency key names a job submitted with a different request (409 over REST, ALREADY_EXISTS gRPC)."""


@dataclass(frozen=True)
class Keys:
    """Every Redis key name, defined once."""

    prefix: str = "ldm"

    def stream(self, model: str) -> str:
        return f"{self.prefix}:jobs:{model}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def result(self, job_id: str, index: int) -> str:
        return f"{self.prefix}:result:{job_id}:{index}"

    def input(self, job_id: str, name: Literal["image", "mask"]) -> str:
        return f"{self.prefix}:input:{job_id}:{name}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def per_job(self, job_id: str) -> list[str]:
        """The keys a job's scripts touch besides the stream: hash, events, image, mask."""
        return [self.job(job_id), self.events(job_id), self.input(job_id, "image"), self.input(job_id, "mask")]


@dataclass(frozen=True)
class Claim:
    """A job delivered to one worker (`consumer`); `job.attempts` fences every later update."""

    job: Job
    entry_id: str
    consumer: str

    @property
    def attempt(self) -> int:
        return self.job.attempts


# ----------------------------------------------------------------------------------------------- Lua scripts
# Per-job keys come in groups of four (Keys.per_job): hash, events, image, mask.

_PRELUDE = """
local function event(key, ttl, body)
  redis.call('XADD', key, 'MAXLEN', '~', '@EVENTS_MAXLEN@', '*', 'data', cjson.encode(body))
  redis.call('PEXPIRE', key, ttl)
end
local function ack(stream, entry)
  redis.call('XACK', stream, '@GROUP@', entry)
  redis.call('XDEL', stream, entry)
end
local function live(ttl, job, events, image, mask)
  for _, key in ipairs({job, events, image, mask}) do redis.call('PEXPIRE', key, ttl) end
end
local function owned(job, consumer, attempt)
  local v = redis.call('HMGET', job, 'worker', 'attempts', 'status')
  if v[1] == consumer and v[2] == attempt then return v[3] end
  return false
end
local function past_deadline(job, now, default_s)
  local v = redis.call('HMGET', job, 'created', 'deadline_s')
  local deadline = v[2] or default_s
  if tonumber(now) - tonumber(v[1]) > tonumber(deadline) then
    return 'deadline exceeded: not started within ' .. deadline .. ' s of submission'
  end
  return false
end
local function settle(job, events, image, mask, status, err, now, ttl, results)
  redis.call('HSET', job, 'status', status, 'finished', now, 'results', results)
  if err then redis.call('HSET', job, 'error', err) end
  local v = redis.call('HMGET', job, 'step', 'total')
  event(events, ttl, {type=status, status=status, step=tonumber(v[1]), total=tonumber(v[2]), results=results,
                      error=err or nil, at=tonumber(now)})
  redis.call('PEXPIRE', job, ttl)
  redis.call('DEL', image, mask)
end
"""

# KEYS: job, stream, events, image, mask, idempotency
# ARGV: id, model, request, fingerprint, now, live ttl ms, idempotency ttl ms, max depth, use idempotency, image, mask,
#       deadline s (the most seconds it may wait to start)
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ARGV[1]} end
if ARGV[9] == '1' then
  local prior = redis.call('GET', KEYS[6])
  if prior then return {'duplicate', prior} end
end
local depth = redis.call('XLEN', KEYS[2])
if depth >= tonumber(ARGV[8]) then return {'full', tostring(depth)} end
local ttl = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'model', ARGV[2], 'status', 'queued', 'request', ARGV[3], 'fp', ARGV[4],
           'created', ARGV[5], 'step', 0, 'total', 0, 'attempts', 0, 'results', 0, 'cancel', 0)
redis.call('HSET', KEYS[1], 'deadline_s', ARGV[12])
if ARGV[10] ~= '' then redis.call('SET', KEYS[4], ARGV[10], 'PX', ttl) end
if ARGV[11] ~= '' then redis.call('SET', KEYS[5], ARGV[11], 'PX', ttl) end
redis.call('HSET', KEYS[1], 'entry', redis.call('XADD', KEYS[2], '*', 'job', ARGV[1]))
redis.call('PEXPIRE', KEYS[1], ttl)
event(KEYS[3], ttl, {type='queued', status='queued', step=0, total=0, results=0, at=tonumber(ARGV[5])})
if ARGV[9] == '1' then redis.call('SET', KEYS[6], ARGV[1] .. ' ' .. ARGV[4], 'PX', ARGV[7]) end
return {'new', ARGV[1]}
"""

# After XREADGROUP (claim) or XAUTOCLAIM (reclaim): count the delivery, or settle jobs that must not run.
# KEYS: stream, dead, then 4 per entry.  ARGV: consumer, now, live ttl, final ttl, deadline s, max attempts,
# reclaim (0/1), model, then per entry: entry id, job id.  Returns {entry, HGETALL} per job to run.
_TAKE = """
local stream, dead, consumer, now = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local live_ttl, final_ttl, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local out = {}
for i = 1, (#ARGV - 8) / 2 do
  local entry, id, b = ARGV[7 + 2 * i], ARGV[8 + 2 * i], 4 * i - 1
  local job, events, image, mask = KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3]
  local status = redis.call('HGET', job, 'status')
  local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
  if (not status) or status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    ack(stream, entry)
  elseif redis.call('HGET', job, 'cancel') == '1' then
    settle(job, events, image, mask, 'cancelled', false, now, final_ttl, 0)
    ack(stream, entry)
  elseif ARGV[7] == '1' and attempts >= max_attempts then
    local err = 'gave up after ' .. attempts .. ' attempts: the workers running it stopped responding'
    settle(job, events, image, mask, 'failed', err, now, final_ttl, 0)
    redis.call('XADD', dead, 'MAXLEN', '~', '@DEAD_MAXLEN@', '*', 'job', id, 'model', ARGV[8],
               'attempts', attempts, 'error', err, 'at', now)
    ack(stream, entry)
  elseif status == 'queued' and past_deadline(job, now, ARGV[5]) then
    settle(job, events, image, mask, 'failed', past_deadline(job, now, ARGV[5]), now, final_ttl, 0)
    ack(stream, entry)
  else
    redis.call('HINCRBY', job, 'attempts', 1)
    redis.call('HSET', job, 'status', 'queued', 'worker', consumer, 'step', 0)
    if status == 'running' then
      redis.call('HSET', job, 'total', 0)
      event(events, live_ttl, {type='requeued', status='queued', step=0, total=0, results=0, at=tonumber(now)})
    end
    live(live_ttl, job, events, image, mask)
    out[#out + 1] = {entry, redis.call('HGETALL', job)}
  end
end
return out
"""

# KEYS: stream, then 4 per claim.  ARGV: consumer, now, live ttl, then per claim: entry, attempt, total steps.
_START = """
local stream, consumer, now, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, (#ARGV - 3) / 3 do
  local entry, attempt, total, b = ARGV[1 + 3 * i], ARGV[2 + 3 * i], ARGV[3 + 3 * i], 4 * i - 2
  local job, events, image, mask = KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3]
  local status = owned(job, consumer, attempt)
  if status == 'queued' then
    redis.call('HSET', job, 'status', 'running', 'started', now, 'step', 0, 'total', total)
    event(events, ttl, {type='started', status='running', step=0, total=tonumber(total), results=0, at=tonumber(now)})
    redis.call('XCLAIM', stream, '@GROUP@', consumer, 0, entry, 'JUSTID')
    live(ttl, job, events, image, mask)
    out[i] = 'ok'
  elseif status == 'running' then
    out[i] = 'ok'
  elseif status == 'cancelled' then
    ack(stream, entry)
    out[i] = 'cancelled'
  else
    out[i] = 'lost'
  end
end
return out
"""

# Progress of running jobs, or a keep-alive of claimed ones (step ''): resets the entries' idle time.
# KEYS: stream, then 4 per claim.  ARGV: consumer, now, live ttl, step, total, then per claim: entry, attempt.
_PROGRESS = """
local stream, consumer, now, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, (#ARGV - 5) / 2 do
  local entry, attempt, b = ARGV[4 + 2 * i], ARGV[5 + 2 * i], 4 * i - 2
  local job, events, image, mask = KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3]
  local status = owned(job, consumer, attempt)
  if status == 'cancelled' then
    out[i] = 'cancel'
  elseif status ~= 'running' and status ~= 'queued' then
    out[i] = 'lost'
  else
    if ARGV[4] ~= '' and status == 'running' then
      redis.call('HSET', job, 'step', ARGV[4], 'total', ARGV[5])
      event(events, ttl, {type='progress', status='running', step=tonumber(ARGV[4]), total=tonumber(ARGV[5]),
                          results=0, at=tonumber(now)})
    end
    redis.call('XCLAIM', stream, '@GROUP@', consumer, 0, entry, 'JUSTID')
    live(ttl, job, events, image, mask)
    out[i] = redis.call('HGET', job, 'cancel') == '1' and 'cancel' or 'ok'
  end
end
return out
"""

# Terminal state by the owning worker: results stored first, XACK last, all in one script.
# KEYS: stream, 4 per job, result keys...  ARGV: consumer, attempt, entry, now, final ttl, status, error, PNGs...
_SETTLE = """
local status = owned(KEYS[2], ARGV[1], ARGV[2])
if status == ARGV[6] then return 'ok' end
if status ~= 'queued' and status ~= 'running' then return 'lost' end
local ttl = tonumber(ARGV[5])
for i = 6, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ttl) end
if ARGV[6] == 'succeeded' then redis.call('HSET', KEYS[2], 'step', redis.call('HGET', KEYS[2], 'total')) end
settle(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[6], ARGV[7] ~= '' and ARGV[7], ARGV[4], ttl, #KEYS - 5)
ack(KEYS[1], ARGV[3])
return 'ok'
"""

# KEYS: stream, 4 per job.  ARGV: now, final ttl, live ttl.  Returns the status after, or nil if no such job.
_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return false end
if status == 'queued' then
  settle(KEYS[2], KEYS[3], KEYS[4], KEYS[5], 'cancelled', false, ARGV[1], tonumber(ARGV[2]), 0)
  ack(KEYS[1], redis.call('HGET', KEYS[2], 'entry'))
  return 'cancelled'
end
if status == 'running' and redis.call('HGET', KEYS[2], 'cancel') ~= '1' then
  redis.call('HSET', KEYS[2], 'cancel', 1)
  local v = redis.call('HMGET', KEYS[2], 'step', 'total')
  event(KEYS[3], tonumber(ARGV[3]), {type='cancel_requested', status='running', step=tonumber(v[1]),
                                     total=tonumber(v[2]), results=0, at=tonumber(ARGV[1])})
end
return status
"""

# A job never delivered to a worker whose deadline has passed fails now, as a claim would fail it: so a job that no
# worker takes (none running for its model) ends at its deadline for whoever reads it, instead of staying queued.
# KEYS: stream, 4 per job.  ARGV: now, final ttl, default deadline s.  Returns the status after (nil: no such job).
_EXPIRE = """
local v = redis.call('HMGET', KEYS[2], 'status', 'attempts')
if not v[1] then return false end
local late = v[1] == 'queued' and tonumber(v[2] or '0') == 0 and past_deadline(KEYS[2], ARGV[1], ARGV[3])
if late then
  settle(KEYS[2], KEYS[3], KEYS[4], KEYS[5], 'failed', late, ARGV[1], tonumber(ARGV[2]), 0)
  ack(KEYS[1], redis.call('HGET', KEYS[2], 'entry'))
  return 'failed'
end
return v[1]
"""

# KEYS: idempotency.  ARGV: the value it must still hold.  Drops a key whose job record has expired.
_FORGET = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


_SCRIPTS = {"submit": _SUBMIT, "take": _TAKE, "start": _START, "progress": _PROGRESS, "settle": _SETTLE,
            "cancel": _CANCEL, "expire": _EXPIRE, "forget": _FORGET}


def _lua(body: str) -> str:
    source = _PRELUDE + body
    tokens = {"@GROUP@": GROUP, "@EVENTS_MAXLEN@": str(EVENTS_MAXLEN), "@DEAD_MAXLEN@": str(DEAD_MAXLEN)}
    for token, value in tokens.items():
        source = source.replace(token, value)
    return source


# ----------------------------------------------------------------------------------------------- decoding

def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _time(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), tz=UTC) if value else None


def _job_from_hash(raw: Mapping[Any, Any]) -> Job:
    f = {_s(k): _s(v) for k, v in raw.items()}
    return Job(
        id=f["id"], model=f["model"], status=JobStatus(f["status"]),
        request=GenerationRequest.model_validate_json(f["request"]),
        created_at=datetime.fromtimestamp(float(f["created"]), tz=UTC),
        started_at=_time(f.get("started")), finished_at=_time(f.get("finished")),
        step=int(f.get("step", 0)), total=int(f.get("total", 0)), attempts=int(f.get("attempts", 0)),
        error=f.get("error") or None, results=int(f.get("results", 0)), cancel_requested=f.get("cancel") == "1",
        worker=f.get("worker") or None, deadline_s=float(f["deadline_s"]) if f.get("deadline_s") else None,
    )


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


# ----------------------------------------------------------------------------------------------- retries

ScriptArg = bytes | str | int | float
P = ParamSpec("P")
R = TypeVar("R")


def _retrying(fn: Callable[Concatenate[JobQueue, P], Awaitable[R]]) -> Callable[Concatenate[JobQueue, P],
                                                                                 Coroutine[Any, Any, R]]:
    """Retry an operation on connection errors with exponential backoff, then raise QueueUnavailable.
    Every operation is safe to repeat (its scripts check what is already done)."""

    @functools.wraps(fn)
    async def wrapper(self: JobQueue, *args: P.args, **kwargs: P.kwargs) -> R:
        s = self.settings
        for attempt in range(s.redis_retries + 1):
            try:
                return await fn(self, *args, **kwargs)
            except _RETRYABLE as exc:
                if attempt == s.redis_retries:
                    raise QueueUnavailable(f"Redis unreachable after {attempt + 1} tries: {exc}") from exc
                delay = min(2.0, s.redis_backoff_s * 2**attempt)
                await asyncio.sleep(delay * random.uniform(0.75, 1.0))
        raise AssertionError("unreachable")

    return wrapper


# ----------------------------------------------------------------------------------------------- the queue

class JobQueue:
    """The job protocol over `redis.asyncio`. One instance per process and event loop; close with `aclose()`."""

    def __init__(self, settings: Settings, *, url: str | None = None) -> None:
        url = url or settings.redis_url
        if not url:
            raise ValueError("no Redis URL: set LDM_REDIS_URL, or start the embedded Redis (service.embedded)")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_connect_timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=False)
        self._groups: set[str] = set()
        self._lua = {name: self.redis.register_script(_lua(body)) for name, body in _SCRIPTS.items()}

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> JobQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- TTLs in milliseconds
    @property
    def _live_ttl_ms(self) -> int:
        """Records of unfinished jobs outlive their deadline by the result TTL."""
        return int((self.settings.job_deadline_s + self.settings.result_ttl_s) * 1000)

    @property
    def _final_ttl_ms(self) -> int:
        return self.settings.result_ttl_s * 1000

    def _block_ms(self, block_ms: int) -> int:
        """A blocking read must end well inside the socket timeout; 0 would block forever, so at least 1."""
        return max(1, min(block_ms, int(self.settings.redis_timeout_s * 800)))

    # ------------------------------------------------------------------------------------------ front ends

    @_retrying
    async def ping(self) -> None:
        """Raises QueueUnavailable when Redis cannot be reached (for /readyz)."""
        await self.redis.ping()

    async def submit(self, request: GenerationRequest, *, idempotency_key: str | None = None,
                     deadline_s: float | None = None) -> Job:
        """Admit and enqueue a job. Raises pydantic.ValidationError (bad request), QueueFull,
        IdempotencyConflict, QueueUnavailable. The same idempotency key answers with the same job. `deadline_s`:
        the job fails (deadline exceeded) rather than start later than this after submission; at most, and by
        default, `job_deadline_s`."""
        if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
            raise ValueError("an idempotency key is 1-255 printable ASCII characters")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        fingerprint = request.fingerprint()
        admitted = admit(request, self.settings)
        deadline = min(deadline_s or self.settings.job_deadline_s, self.settings.job_deadline_s)
        for _ in range(2):  # a second round only when the key's job record has expired
            # the id and time are chosen once per round, so a retry after a lost reply finds its own job
            job = await self._submit_once(admitted, fingerprint, idempotency_key, uuid.uuid4().hex, time.time(),
                                          deadline)
            if job is not None:
                return job
        raise QueueUnavailable("could not submit: the idempotency key kept naming an expired job")

    @_retrying
    async def _submit_once(self, request: GenerationRequest, fingerprint: str, idem: str | None, job_id: str,
                           now: float, deadline_s: float) -> Job | None:
        assert request.model is not None
        k, s = self.keys, self.settings
        keys = [k.job(job_id), k.stream(request.model), k.events(job_id), k.input(job_id, "image"),
                k.input(job_id, "mask"), k.idempotency(idem or "-")]
        args: list[ScriptArg] = [
            job_id, request.model, request.model_dump_json(), fingerprint, repr(now), self._live_ttl_ms,
            s.idempotency_ttl_s * 1000, s.queue_max_depth, 1 if idem else 0, request.stored_image or b"",
            request.mask or b"",
            repr(float(deadline_s))]
        kind, value = (_s(v) for v in await self._lua["submit"](keys=keys, args=args))
        if kind == "full":
            raise QueueFull(request.model, int(value), s.queue_max_depth, s.queue_retry_after_s)
        if kind == "duplicate":
            prior_id, prior_fp = value.split(" ", 1)
            if prior_fp != fingerprint:
                raise IdempotencyConflict(f"idempotency key {idem!r} was used for a different request (job {prior_id})")
            prior = await self._get(prior_id)
            if prior is None:
                await self._lua["forget"](keys=[keys[5]], args=[value])
            return prior
        return Job(id=job_id, model=request.model, status=JobStatus.queued, request=request,
                   created_at=datetime.fromtimestamp(now, tz=UTC), step=0, total=0, attempts=0, results=0,
                   deadline_s=deadline_s)

    async def _get(self, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(self.keys.job(job_id)) if JOB_ID.match(job_id) else {}
        return _job_from_hash(raw) if raw else None

    @_retrying
    async def get(self, job_id: str) -> Job | None:
        """The job's record, or None (unknown id, or expired). A job still waiting for its first worker past its
        deadline fails here (`_EXPIRE`), so it ends on time even when no worker is there to claim it."""
        job = await self._get(job_id)
        if job is None or job.status != JobStatus.queued or job.attempts:
            return job
        deadline = job.deadline_s if job.deadline_s is not None else self.settings.job_deadline_s
        if time.time() - job.created_at.timestamp() <= deadline:
            return job
        keys = [self.keys.stream(job.model), *self.keys.per_job(job_id)]
        await self._lua["expire"](keys=keys, args=[repr(time.time()), self._final_ttl_ms,
                                                   repr(self.settings.job_deadline_s)])
        return await self._get(job_id)

    @_retrying
    async def result(self, job_id: str, index: int) -> bytes | None:
        """PNG bytes of result `index`, or None (no such result, or expired)."""
        if not JOB_ID.match(job_id) or index < 0:
            return None
        png: bytes | None = await self.redis.get(self.keys.result(job_id, index))  # type: ignore[assignment]
        return png

    @_retrying
    async def cancel(self, job_id: str) -> JobStatus:
        """Cancel: a queued job is cancelled at once and never runs; a running job gets a flag its worker reads
        between steps (the status stays running until the worker stops). Raises JobNotFound."""
        model = await self.redis.hget(self.keys.job(job_id), "model") if JOB_ID.match(job_id) else None
        if model is None:
            raise JobNotFound(job_id)
        keys = [self.keys.stream(_s(model)), *self.keys.per_job(job_id)]
        status = await self._lua["cancel"](keys=keys, args=[repr(time.time()), self._final_ttl_ms, self._live_ttl_ms])
        if status is None:
            raise JobNotFound(job_id)
        return JobStatus(_s(status))

    @_retrying
    async def events(self, job_id: str, after: str = "0-0", *, block_ms: int = 0, count: int = 100) -> list[JobEvent]:
        """Progress events after event id `after` (SSE Last-Event-ID), oldest first; with `block_ms` > 0 waits
        that long for one when none is there yet."""
        if not EVENT_ID.match(after):
            raise ValueError(f"not an event id: {after!r}")
        block = self._block_ms(block_ms) if block_ms > 0 else None
        reply: Any = await self.redis.xread({self.keys.events(job_id): after}, count=count, block=block)
        return [JobEvent(id=_s(entry), **json.loads(fields[b"data"]))
                for _, entries in reply or [] for entry, fields in entries]

    async def follow(self, job_id: str, after: str = "0-0", *, poll_s: float = 1.0,
                     until: float | None = None) -> AsyncGenerator[list[JobEvent], None]:
        """The job's events after `after` as they come, in batches, up to and with the terminal one: the one loop
        behind SSE, the synchronous REST calls, gRPC's waiting calls and `wait`. A poll of `poll_s` with no event
        yields [] (callers keep a stream alive or check their own stop there) once the record says the job still
        runs; a job that ended without an event we saw (or whose record expired) ends the iteration after the
        events written just after our read. `until` (a `time.monotonic()` instant) ends it early, without a
        terminal event: the caller's timeout."""
        while True:
            block_s = poll_s if until is None else min(poll_s, until - time.monotonic())
            if block_s <= 0:
                return
            events = await self.events(job_id, after, block_ms=max(1, int(block_s * 1000)))
            terminal = next((i for i, e in enumerate(events) if e.terminal), None)
            if terminal is not None:
                yield events[: terminal + 1]
                return
            if events:
                after = events[-1].id
                yield events
                continue
            job = await self.get(job_id)  # quiet: `get` also fails a job left unclaimed past its deadline
            if job is None or job.status.terminal:
                late = await self.events(job_id, after)
                if late:
                    yield late
                return
            yield []

    async def wait(self, job_id: str, *, timeout_s: float) -> Job | None:
        """Wait (following events) until the job ends or `timeout_s` passes; the job's record then."""
        async with contextlib.aclosing(self.follow(job_id, until=time.monotonic() + timeout_s)) as batches:
            async for _ in batches:
                pass
        return await self.get(job_id)

    # ------------------------------------------------------------------------------------------ workers

    async def _ensure_group(self, model: str) -> None:
        if model in self._groups:
            return
        try:
            await self.redis.xgroup_create(self.keys.stream(model), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(model)

    async def _take_entries(self, model: str, consumer: str, entries: Sequence[tuple[Any, Any]],
                            *, reclaim: bool) -> list[Claim]:
        """Run the take script on delivered entries; the claims that may run."""
        entries = [(e, f) for e, f in entries if e is not None and f]  # 6.2 XAUTOCLAIM: deleted entries are nil
        if not entries:
            return []
        s, k = self.settings, self.keys
        keys = [k.stream(model), k.dead]
        args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms, self._final_ttl_ms,
                                 repr(s.job_deadline_s), s.max_attempts, int(reclaim), model]
        for entry, fields in entries:
            job_id = _s(fields[b"job"])
            keys += k.per_job(job_id)
            args += [entry, job_id]
        taken = await self._lua["take"](keys=keys, args=args)
        return [Claim(_job_from_hash(_pairs(h)), _s(e), consumer) for e, h in taken]

    @_retrying
    async def claim(self, model: str, consumer: str, *, count: int | None = None,
                    block_ms: int | None = None) -> list[Claim]:
        """Up to `count` (max_batch) new jobs for `consumer`; waits at most `block_ms` (max_wait_ms) when
        none is there, and returns at once with what there is otherwise. Cancelled and expired jobs are
        acknowledged and skipped."""
        await self._ensure_group(model)
        stream = self.keys.stream(model)
        try:
            reply: Any = await self.redis.xreadgroup(
                GROUP, consumer, {stream: ">"}, count=count or self.settings.max_batch,
                block=self._block_ms(block_ms or self.settings.max_wait_ms))
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted under us: recreate on the next call
                self._groups.discard(model)
                return []
            raise
        entries = [entry for _, batch in reply or [] for entry in batch]
        return await self._take_entries(model, consumer, entries, reclaim=False)

    @_retrying
    async def reclaim(self, model: str, consumer: str, *, count: int | None = None,
                      min_idle_ms: int | None = None) -> list[Claim]:
        """Take over up to `count` jobs whose worker has been silent longer than the visibility timeout.
        Each counts as an attempt; a job out of attempts fails into the dead-letter stream instead."""
        await self._ensure_group(model)
        idle = min_idle_ms if min_idle_ms is not None else int(self.settings.visibility_timeout_s * 1000)
        try:
            reply: Any = await self.redis.xautoclaim(self.keys.stream(model), GROUP, consumer, idle, "0-0",
                                                count=count or self.settings.max_batch)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._groups.discard(model)
                return []
            raise
        return await self._take_entries(model, consumer, reply[1], reclaim=True)

    @staticmethod
    def _group_by_model(claims: Sequence[Claim]) -> dict[str, list[Claim]]:
        groups: dict[str, list[Claim]] = {}
        for c in claims:
            groups.setdefault(c.job.model, []).append(c)
        return groups

    @_retrying
    async def start(self, claims: Sequence[Claim]) -> list[Claim]:
        """Mark claimed jobs running; the ones that may run (cancelled ones are acknowledged and dropped,
        ones another worker took over are dropped)."""
        runnable: list[Claim] = []
        for model, group in self._group_by_model(claims).items():
            for consumer in {c.consumer for c in group}:
                mine = [c for c in group if c.consumer == consumer]
                keys = [self.keys.stream(model)]
                args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms]
                for c in mine:
                    keys += self.keys.per_job(c.job.id)
                    args += [c.entry_id, c.attempt, c.job.request.steps]
                outcome = await self._lua["start"](keys=keys, args=args)
                runnable += [c for c, o in zip(mine, outcome, strict=True) if _s(o) == "ok"]
        return runnable

    @_retrying
    async def progress(self, claims: Sequence[Claim], step: int | None, total: int | None = None,
                       ) -> dict[str, Literal["cancel", "lost"]]:
        """Record `step` of `total` for running jobs (an event each) and keep their entries from being taken
        over; with step None only keep claimed jobs alive. Answers the jobs to stop: "cancel" (cancellation
        asked: stop and call `cancelled`) or "lost" (another worker has it now: drop it silently)."""
        stop: dict[str, Literal["cancel", "lost"]] = {}
        for model, group in self._group_by_model(claims).items():
            for consumer in {c.consumer for c in group}:
                mine = [c for c in group if c.consumer == consumer]
                keys = [self.keys.stream(model)]
                args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms,
                                   "" if step is None else step, "" if total is None else total]
                for c in mine:
                    keys += self.keys.per_job(c.job.id)
                    args += [c.entry_id, c.attempt]
                outcome = await self._lua["progress"](keys=keys, args=args)
                for c, o in zip(mine, outcome, strict=True):
                    if _s(o) in ("cancel", "lost"):
                        stop[c.job.id] = "cancel" if _s(o) == "cancel" else "lost"
        return stop

    async def keepalive(self, claims: Sequence[Claim]) -> dict[str, Literal["cancel", "lost"]]:
        """Keep claimed jobs waiting for their turn in this worker from being taken over (see `progress`)."""
        return await self.progress(claims, None)

    async def _settle_claim(self, claim: Claim, status: JobStatus, error: str = "",
                            pngs: Sequence[bytes] = ()) -> bool:
        job_id = claim.job.id
        keys = [self.keys.stream(claim.job.model), *self.keys.per_job(job_id),
                *(self.keys.result(job_id, i) for i in range(len(pngs)))]
        args: list[ScriptArg] = [claim.consumer, claim.attempt, claim.entry_id, repr(time.time()),
                                 self._final_ttl_ms, status.value, error, *pngs]
        return _s(await self._lua["settle"](keys=keys, args=args)) == "ok"

    @_retrying
    async def finish(self, claim: Claim, pngs: Sequence[bytes]) -> bool:
        """Store the result PNGs (with the result TTL), mark the job succeeded, then XACK, atomically. False
        when this worker no longer owns the job (nothing is written: the new owner answers)."""
        return await self._settle_claim(claim, JobStatus.succeeded, pngs=pngs)

    @_retrying
    async def fail(self, claim: Claim, error: str) -> bool:
        """Mark the job failed with `error` (shown to the client) and XACK it; False if no longer owned."""
        return await self._settle_claim(claim, JobStatus.failed, error=error)

    @_retrying
    async def cancelled(self, claim: Claim) -> bool:
        """The worker stopped the job on a cancel request: mark it cancelled and XACK it."""
        return await self._settle_claim(claim, JobStatus.cancelled)

    @_retrying
    async def is_cancelled(self, job_id: str) -> bool:
        """Whether cancellation was asked for (or the job is already cancelled)."""
        cancel, status = await self.redis.hmget(self.keys.job(job_id), ["cancel", "status"])
        return cancel == b"1" or status == JobStatus.cancelled.value.encode()

    @_retrying
    async def inputs(self, job_id: str) -> tuple[bytes | None, bytes | None]:
        """The job's input (image, mask) bytes, None where absent; a semantic job's label map is its image."""
        values: Any = await self.redis.mget([self.keys.input(job_id, "image"), self.keys.input(job_id, "mask")])
        return values[0], values[1]

    # ------------------------------------------------------------------------------------------ registry, stats

    @_retrying
    async def heartbeat(self, worker: WorkerInfo) -> None:
        """Say `worker` is alive; it counts as gone 3 heartbeat intervals after its last call."""
        now = time.time()
        info = worker.model_copy(update={"last_seen": now})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(worker.id), info.model_dump_json(), px=int(self.settings.heartbeat_ttl_s * 1000))
            pipe.zadd(self.keys.workers, {worker.id: now})
            await pipe.execute()

    @_retrying
    async def deregister(self, worker_id: str) -> None:
        """A worker shutting down cleanly leaves the registry at once."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.zrem(self.keys.workers, worker_id)
            await pipe.execute()

    @_retrying
    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        """Live workers (serving `model`, if given); entries of expired ones are pruned."""
        ids = [_s(i) for i in await self.redis.zrange(self.keys.workers, 0, -1)]
        if not ids:
            return []
        values = await self.redis.mget([self.keys.worker(i) for i in ids])
        gone = [i for i, v in zip(ids, values, strict=True) if v is None]
        if gone:
            await self.redis.zrem(self.keys.workers, *gone)
        alive = [WorkerInfo.model_validate_json(v) for v in values if v is not None]
        return [w for w in alive if model is None or model in w.models]

    @_retrying
    async def stats(self, model: str) -> QueueStats:
        """Depth, claimed and waiting jobs and the oldest waiting job's age (Redis clock) of `model`'s queue."""
        stream = self.keys.stream(model)
        depth = await self.redis.xlen(stream)
        if depth == 0:
            return QueueStats(model=model, depth=0, pending=0, waiting=0, oldest_waiting_age_s=0.0)
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:  # the stream vanished between the calls
            groups = []
        group = next((g for g in groups if _s(g["name"]) == GROUP), None)
        pending = int(group["pending"]) if group else 0
        start = "(" + _s(group["last-delivered-id"]) if group else "-"
        first = await self.redis.xrange(stream, min=start, max="+", count=1)
        seconds, micros = await self.redis.time()
        age = max(0.0, seconds + micros / 1e6 - int(_s(first[0][0]).split("-")[0]) / 1000) if first else 0.0
        return QueueStats(model=model, depth=depth, pending=pending, waiting=max(0, depth - pending),
                          oldest_waiting_age_s=age)

    @_retrying
    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead letters (jobs that ran out of attempts), newest first."""
        entries: Any = await self.redis.xrevrange(self.keys.dead, count=count)
        return [{"entry": _s(e), **{_s(k): _s(v) for k, v in f.items()}} for e, f in entries]


# ----------------------------------------------------------------------------------------------- sync facade

class SyncJobQueue:
    """`JobQueue` for a synchronous caller (the torch worker): the coroutines run on a private event-loop
    thread; every call blocks until done, never longer than the retry budget allows."""

    def __init__(self, settings: Settings, *, url: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ldm-queue-io", daemon=True)
        self._thread.start()
        s = settings
        per_try = s.redis_connect_timeout_s + s.redis_timeout_s
        self._limit_s = (s.redis_retries + 1) * per_try + s.redis_retries * 2.0 + 1.0

        async def build() -> JobQueue:
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

    def ping(self) -> None:
        self._run(self.queue.ping())

    def submit(self, request: GenerationRequest, *, idempotency_key: str | None = None) -> Job:
        return self._run(self.queue.submit(request, idempotency_key=idempotency_key))

    def get(self, job_id: str) -> Job | None:
        return self._run(self.queue.get(job_id))

    def result(self, job_id: str, index: int) -> bytes | None:
        return self._run(self.queue.result(job_id, index))

    def cancel(self, job_id: str) -> JobStatus:
        return self._run(self.queue.cancel(job_id))

    def claim(self, model: str, consumer: str, *, count: int | None = None, block_ms: int | None = None) -> list[Claim]:
        return self._run(self.queue.claim(model, consumer, count=count, block_ms=block_ms))

    def reclaim(self, model: str, consumer: str, *, count: int | None = None,
                min_idle_ms: int | None = None) -> list[Claim]:
        return self._run(self.queue.reclaim(model, consumer, count=count, min_idle_ms=min_idle_ms))

    def start(self, claims: Sequence[Claim]) -> list[Claim]:
        return self._run(self.queue.start(claims))

    def progress(self, claims: Sequence[Claim], step: int | None, total: int | None = None,
                 ) -> dict[str, Literal["cancel", "lost"]]:
        return self._run(self.queue.progress(claims, step, total))

    def keepalive(self, claims: Sequence[Claim]) -> dict[str, Literal["cancel", "lost"]]:
        return self._run(self.queue.keepalive(claims))

    def finish(self, claim: Claim, pngs: Sequence[bytes]) -> bool:
        return self._run(self.queue.finish(claim, pngs))

    def fail(self, claim: Claim, error: str) -> bool:
        return self._run(self.queue.fail(claim, error))

    def cancelled(self, claim: Claim) -> bool:
        return self._run(self.queue.cancelled(claim))

    def is_cancelled(self, job_id: str) -> bool:
        return self._run(self.queue.is_cancelled(job_id))

    def inputs(self, job_id: str) -> tuple[bytes | None, bytes | None]:
        return self._run(self.queue.inputs(job_id))

    def heartbeat(self, worker: WorkerInfo) -> None:
        self._run(self.queue.heartbeat(worker))

    def deregister(self, worker_id: str) -> None:
        self._run(self.queue.deregister(worker_id))

    def workers(self, model: str | None = None) -> list[WorkerInfo]:
        return self._run(self.queue.workers(model))

    def stats(self, model: str) -> QueueStats:
        return self._run(self.queue.stats(model))
