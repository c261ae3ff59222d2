"""`JobQueue`: the job protocol over `redis.asyncio`, written once (the package docstring says why async).

Redis connection errors are retried with exponential backoff `redis_retries` times, then raised as
`QueueUnavailable` (503 / UNAVAILABLE); every socket has a timeout, so no call hangs. Every script is safe to
repeat, so a retry after a lost reply does no harm (a submit retried keeps its job id; a settle already applied
answers ok; a claim retried answers the jobs its lost try took, which the claim script remembers under the
call's token: they would otherwise sit pending for this consumer until the visibility timeout). Payloads are JSON,
never pickle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.queue.errors import IdempotencyConflict, JobNotFound, QueueFull, QueueUnavailable
from service.queue.keys import EVENT_ID, GROUP, IDEMPOTENCY_KEY, JOB_ID, Keys
from service.queue.pool import bounded_pool
from service.queue.priority import read_order
from service.queue.records import Claim, Job, JobEvent, JobStatus, Place, QueueStats, WorkerInfo
from service.queue.scripts import JOB_SLOT, SCRIPTS
from service.schemas import PRIORITIES, GenerationRequest, Priority, admit

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)  # BusyLoadingError (AOF loading) included


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
        owner=f.get("owner", ""), ahead_at_submit=int(f.get("ahead", 0)),
    )


def _priority(value: Any) -> Priority:
    """A job hash's `priority` field (absent in records written before priorities: normal)."""
    text = _s(value) if value is not None else "normal"
    return next((p for p in PRIORITIES if p == text), "normal")


def _moved(shown: tuple[int, float | None] | None, place: Place) -> bool:
    """Whether a watcher should hear of `place`: a new position, or an ETA that came, went or moved by over 10 %
    (the step rate wobbles: an event a second would be noise)."""
    if shown is None or shown[0] != place.queue_position:
        return True
    old, new = shown[1], place.eta_s
    if old is None or new is None:
        return old is not new
    return abs(new - old) > max(1.0, 0.1 * old)


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


# ----------------------------------------------------------------------------------------------- retries

ScriptArg = bytes | str | int | float


@dataclass
class _ClaimTry:
    """One `claim` call across its retries: its token (the claim script's record of what it took) and the streams
    a try has read from (a retry asks those first for what the lost try took)."""

    token: str
    read: set[Priority] = field(default_factory=set)
P = ParamSpec("P")
R = TypeVar("R")


def retrying(fn: Callable[Concatenate[JobQueue, P], Awaitable[R]]) -> Callable[Concatenate[JobQueue, P],
                                                                                 Coroutine[Any, Any, R]]:
    """Retry an operation on connection errors with exponential backoff, then raise QueueUnavailable.
    Every operation is safe to repeat (its scripts check what is already done)."""

    @functools.wraps(fn)
    async def wrapper(self: JobQueue, /, *args: P.args, **kwargs: P.kwargs) -> R:
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
        # one bounded pool (service/queue/pool.py); the client owns it, so aclose() closes its connections
        self.redis = aioredis.Redis.from_pool(bounded_pool(url, settings))
        self._groups: set[str] = set()
        self._lua = {name: self.redis.register_script(source) for name, source in SCRIPTS.items()}

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

    @retrying
    async def ping(self) -> None:
        """Raises QueueUnavailable when Redis cannot be reached (for /readyz)."""
        await self.redis.ping()

    async def submit(self, request: GenerationRequest, *, idempotency_key: str | None = None,
                     deadline_s: float | None = None, owner: str = "") -> Job:
        """Admit and enqueue a job for API key `owner` (its key id; "" without authentication). Raises
        pydantic.ValidationError (bad request), QueueFull, IdempotencyConflict, QueueUnavailable. The same
        idempotency key of the same owner answers with the same job (each owner has its own key space). `deadline_s`:
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
                                          deadline, owner)
            if job is not None:
                return job
        raise QueueUnavailable("could not submit: the idempotency key kept naming an expired job")

    @retrying
    async def _submit_once(self, request: GenerationRequest, fingerprint: str, idem: str | None, job_id: str,
                           now: float, deadline_s: float, owner: str) -> Job | None:
        assert request.model is not None
        k, s = self.keys, self.settings
        keys = [k.job(job_id), k.stream(request.model, request.priority), k.events(job_id), k.input(job_id, "image"),
                k.input(job_id, "mask"), k.idempotency(owner, idem or "-"), *k.streams(request.model)]
        args: list[ScriptArg] = [
            job_id, request.model, request.model_dump_json(), fingerprint, repr(now), self._live_ttl_ms,
            s.idempotency_ttl_s * 1000, s.queue_max_depth, 1 if idem else 0, request.stored_image or b"",
            request.mask or b"",
            repr(float(deadline_s)), owner, request.priority, request.steps * request.n,
            PRIORITIES.index(request.priority) + 1]
        kind, value = (_s(v) for v in await self._lua["submit"](keys=keys, args=args))
        if kind == "full":
            raise QueueFull(request.model, int(value), s.queue_max_depth, s.queue_retry_after_s)
        if kind == "duplicate":
            prior_id, prior_fp = value.split(" ", 1)
            if prior_fp != fingerprint:  # no job id in the message: an answer names only the caller's own jobs
                raise IdempotencyConflict(f"idempotency key {idem!r} was used for a different request; use a new "
                                          "key for a new request")
            prior = await self._get(prior_id)
            if prior is None:
                await self._lua["forget"](keys=[keys[5]], args=[value])
            return prior
        return Job(id=job_id, model=request.model, status=JobStatus.queued, request=request,
                   created_at=datetime.fromtimestamp(now, tz=UTC), step=0, total=0, attempts=0, results=0,
                   deadline_s=deadline_s, owner=owner)

    async def _get(self, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(self.keys.job(job_id)) if JOB_ID.match(job_id) else {}
        return _job_from_hash(raw) if raw else None

    @retrying
    async def get(self, job_id: str) -> Job | None:
        """The job's record, or None (unknown id, or expired). A job still waiting for its first worker past its
        deadline fails here (`_EXPIRE`), so it ends on time even when no worker is there to claim it."""
        job = await self._get(job_id)
        if job is None or job.status != JobStatus.queued or job.attempts:
            return job
        deadline = job.deadline_s if job.deadline_s is not None else self.settings.job_deadline_s
        if time.time() - job.created_at.timestamp() <= deadline:
            return job
        keys = [self._stream_of(job), *self.keys.per_job(job_id)]
        await self._lua["expire"](keys=keys, args=[repr(time.time()), self._final_ttl_ms,
                                                   repr(self.settings.job_deadline_s)])
        return await self._get(job_id)

    @retrying
    async def place(self, job: Job) -> Place | None:
        """Where a queued job stands (None once it is not queued): the jobs workers will take before it, in priority
        order without aging (aging only moves a job forward), and `eta_s`: the sample-steps of the work ahead, the
        work the model's workers hold and its own, over their summed recent step rate (None before any worker has
        measured one)."""
        found = await self._lua["position"](keys=[self.keys.job(job.id), *self.keys.streams(job.model)])
        if found is None:
            return None
        ahead, work = int(found[0]), int(found[1])
        workers = await self.workers(job.model)
        rate = sum(w.step_rate for w in workers)
        own = 0 if job.attempts else job.request.steps * job.request.n  # a claimed job is in its worker's hand
        in_hand = sum(w.steps_in_hand for w in workers)
        return Place(ahead, round((work + in_hand + own) / rate, 1) if rate > 0 else None)

    async def with_place(self, job: Job) -> Job:
        """`job` with its `queue_position` and `eta_s` filled in while it is queued."""
        if job.status != JobStatus.queued:
            return job
        place = await self.place(job)
        if place is None:
            return job
        return job.model_copy(update={"queue_position": place.queue_position, "eta_s": place.eta_s})

    @retrying
    async def result(self, job_id: str, index: int) -> bytes | None:
        """PNG bytes of result `index`, or None (no such result, or expired)."""
        if not JOB_ID.match(job_id) or index < 0:
            return None
        png: bytes | None = await self.redis.get(self.keys.result(job_id, index))  # type: ignore[assignment]
        return png

    @retrying
    async def cancel(self, job_id: str) -> JobStatus:
        """Cancel: a queued job is cancelled at once and never runs; a running job gets a flag its worker reads
        between steps (the status stays running until the worker stops). Raises JobNotFound."""
        model, priority = (await self.redis.hmget(self.keys.job(job_id), ["model", "priority"])
                           if JOB_ID.match(job_id) else (None, None))
        if model is None:
            raise JobNotFound(job_id)
        keys = [self.keys.stream(_s(model), _priority(priority)), *self.keys.per_job(job_id)]
        status = await self._lua["cancel"](keys=keys, args=[repr(time.time()), self._final_ttl_ms, self._live_ttl_ms])
        if status is None:
            raise JobNotFound(job_id)
        return JobStatus(_s(status))

    @retrying
    async def events(self, job_id: str, after: str = "0-0", *, block_ms: int = 0, count: int = 100) -> list[JobEvent]:
        """Progress events after event id `after` (SSE Last-Event-ID), oldest first; with `block_ms` > 0 waits
        that long for one when none is there yet."""
        if not EVENT_ID.match(after):
            raise ValueError(f"not an event id: {after!r}")
        block = self._block_ms(block_ms) if block_ms > 0 else None
        reply: Any = await self.redis.xread({self.keys.events(job_id): after}, count=count, block=block)
        return [JobEvent(id=_s(entry), **json.loads(fields[b"data"]))
                for _, entries in reply or [] for entry, fields in entries]

    async def latest_preview(self, job_id: str, within: int) -> str | None:
        """The base64 PNG of the job's newest preview among its last `within` events, or None: A1111's
        `current_image`. A job with `preview_every` k has one every k progress events (one event a step)."""
        reply: Any = await self.redis.xrevrange(self.keys.events(job_id), count=max(1, within))
        for _, fields in reply or []:
            preview = json.loads(fields[b"data"]).get("preview")
            if preview:
                return str(preview)
        return None

    async def follow(self, job_id: str, after: str = "0-0", *, poll_s: float = 1.0, until: float | None = None,
                     positions: bool = False) -> AsyncGenerator[list[JobEvent], None]:
        """The job's events after `after` as they come, in batches, up to and with the terminal one: the one loop
        behind SSE, the synchronous REST calls, gRPC's waiting calls and `wait`. A poll of `poll_s` with no event
        yields [] (callers keep a stream alive or check their own stop there) once the record says the job still
        runs; a job that ended without an event we saw (or whose record expired) ends the iteration after the
        events written just after our read. `until` (a `time.monotonic()` instant) ends it early, without a
        terminal event: the caller's timeout. With `positions`, a quiet poll of a queued job whose place changed
        yields a `position` event (not stored; its id is the last stored event's, so resuming from it loses
        nothing)."""
        shown: tuple[int, float | None] | None = None
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
            place = await self.place(job) if positions and job.status == JobStatus.queued else None
            if place is not None and _moved(shown, place):
                shown = (place.queue_position, place.eta_s)
                yield [JobEvent(id=after, type="position", status=JobStatus.queued, queue_position=place.queue_position,
                                eta_s=place.eta_s, at=time.time())]
                continue
            yield []

    async def wait(self, job_id: str, *, timeout_s: float) -> Job | None:
        """Wait (following events) until the job ends or `timeout_s` passes; the job's record then."""
        async with contextlib.aclosing(self.follow(job_id, until=time.monotonic() + timeout_s)) as batches:
            async for _ in batches:
                pass
        return await self.get(job_id)

    # ------------------------------------------------------------------------------------------ workers

    def _stream_of(self, job: Job) -> str:
        return self.keys.stream(job.model, job.request.priority)

    async def _ensure_group(self, model: str) -> None:
        """The consumer group on each of `model`'s streams (every priority's)."""
        if model in self._groups:
            return
        for stream in self.keys.streams(model):
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups.add(model)

    async def _take_entries(self, stream: str, model: str, consumer: str,
                            entries: Sequence[tuple[Any, Any]]) -> list[Claim]:
        """Run the take script on entries taken over from `stream` (reclaim); the claims that may run."""
        entries = [(e, f) for e, f in entries if e is not None and f]  # 6.2 XAUTOCLAIM: deleted entries are nil
        if not entries:
            return []
        s, k = self.settings, self.keys
        keys = [stream, k.dead]
        args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms, self._final_ttl_ms,
                                 repr(s.job_deadline_s), s.max_attempts, 1, model]
        for entry, fields in entries:
            job_id = _s(fields[b"job"])
            keys += k.per_job(job_id)
            args += [entry, job_id]
        taken = await self._lua["take"](keys=keys, args=args)
        return [Claim(_job_from_hash(_pairs(h)), _s(e), consumer) for e, h in taken]

    async def _heads(self, model: str) -> tuple[list[Priority], dict[Any, Any]]:
        """The priorities of `model` with jobs waiting, in the order to read them (service/queue/priority.py), and
        each stream's last delivered entry id."""
        *heads, (seconds, micros) = await self._lua["heads"](keys=self.keys.streams(model))
        now_ms = int(seconds) * 1000 + int(micros) / 1000
        waited = [(now_ms - int(_s(first).split("-")[0])) / 1000 if first else None for _, first in heads]
        delivered: dict[Any, Any] = {s: _s(last) for s, (last, _) in zip(self.keys.streams(model), heads, strict=True)}
        return read_order(list(zip(PRIORITIES, waited, strict=True)), self.settings.priority_aging_s), delivered

    async def claim(self, model: str, consumer: str, *, count: int | None = None,
                    block_ms: int | None = None) -> list[Claim]:
        """Up to `count` (max_batch) new jobs for `consumer`, high priority before normal before low with aging
        (`_heads`); waits at most `block_ms` (max_wait_ms) when none is there, and returns at once with what
        there is otherwise. Cancelled and expired jobs are acknowledged and skipped. Safe to retry: should a
        reply be lost, the retry answers the jobs the lost try took (the claim script remembers them under this
        call's token), which would otherwise wait for the visibility timeout."""
        return await self._claim(model, consumer, _ClaimTry(uuid.uuid4().hex), count, block_ms)

    @retrying
    async def _claim(self, model: str, consumer: str, attempt: _ClaimTry, count: int | None,
                     block_ms: int | None) -> list[Claim]:
        await self._ensure_group(model)
        count = count or self.settings.max_batch
        claims: list[Claim] = []
        try:
            for priority in [p for p in PRIORITIES if p in attempt.read]:  # a retry: what the lost tries took
                if len(claims) < count:
                    claims += await self._claim_from(model, priority, consumer, attempt.token, count - len(claims))
            if claims:
                return claims
            order, delivered = await self._heads(model)
            wait_ms = block_ms or self.settings.max_wait_ms
            if not order and wait_ms > 1:  # wait for the first entry no worker has been given (XREAD after each
                # group's last delivered id returns at once if one came since the look), then look again
                await self.redis.xread(delivered, count=1, block=self._block_ms(wait_ms))
                order, _ = await self._heads(model)
            for priority in order:
                if len(claims) >= count:
                    break
                attempt.read.add(priority)
                claims += await self._claim_from(model, priority, consumer, attempt.token, count - len(claims))
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):  # a stream deleted under us: recreate next call
                self._groups.discard(model)
                return []
            raise
        return claims

    async def _claim_from(self, model: str, priority: Priority, consumer: str, token: str, count: int) -> list[Claim]:
        """The claim script on one stream: up to `count` new entries read and taken (or, on a retry of the same
        `token`, the jobs an earlier try took)."""
        s, k = self.settings, self.keys
        keys = [k.stream(model, priority), k.dead, k.claimed(token, priority)]
        args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms, self._final_ttl_ms,
                                 repr(s.job_deadline_s), s.max_attempts, 0, model, count,
                                 int(s.visibility_timeout_s * 1000), *k.per_job(JOB_SLOT)]
        taken = await self._lua["claim"](keys=keys, args=args)
        return [Claim(_job_from_hash(_pairs(h)), _s(e), consumer) for e, h in taken]

    @retrying
    async def reclaim(self, model: str, consumer: str, *, count: int | None = None,
                      min_idle_ms: int | None = None) -> list[Claim]:
        """Take over up to `count` jobs whose worker has been silent longer than the visibility timeout.
        Each counts as an attempt; a job out of attempts fails into the dead-letter stream instead."""
        await self._ensure_group(model)
        idle = min_idle_ms if min_idle_ms is not None else int(self.settings.visibility_timeout_s * 1000)
        count = count or self.settings.max_batch
        claims: list[Claim] = []
        for stream in self.keys.streams(model):  # highest priority first
            if len(claims) >= count:
                break
            try:
                reply: Any = await self.redis.xautoclaim(stream, GROUP, consumer, idle, "0-0",
                                                         count=count - len(claims))
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._groups.discard(model)
                    return claims
                raise
            claims += await self._take_entries(stream, model, consumer, reply[1])
        return claims

    def _group_by_stream(self, claims: Sequence[Claim]) -> dict[str, list[Claim]]:
        groups: dict[str, list[Claim]] = {}
        for c in claims:
            groups.setdefault(self._stream_of(c.job), []).append(c)
        return groups

    @retrying
    async def start(self, claims: Sequence[Claim]) -> list[Claim]:
        """Mark claimed jobs running; the ones that may run (cancelled ones are acknowledged and dropped,
        ones another worker took over are dropped)."""
        runnable: list[Claim] = []
        for stream, group in self._group_by_stream(claims).items():
            for consumer in {c.consumer for c in group}:
                mine = [c for c in group if c.consumer == consumer]
                keys = [stream]
                args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms]
                for c in mine:
                    keys += self.keys.per_job(c.job.id)
                    args += [c.entry_id, c.attempt, c.job.request.steps]
                outcome = await self._lua["start"](keys=keys, args=args)
                runnable += [c for c, o in zip(mine, outcome, strict=True) if _s(o) == "ok"]
        return runnable

    @retrying
    async def progress(self, claims: Sequence[Claim], step: int | None, total: int | None = None,
                       previews: Mapping[str, bytes] | None = None) -> dict[str, Literal["cancel", "lost"]]:
        """Record `step` of `total` for running jobs (an event each) and keep their entries from being taken
        over; with step None only keep claimed jobs alive. `previews`: job id -> a preview PNG its event carries
        (base64 in the event's `preview`). Answers the jobs to stop: "cancel" (cancellation asked: stop and call
        `cancelled`) or "lost" (another worker has it now: drop it silently)."""
        previews = previews or {}
        stop: dict[str, Literal["cancel", "lost"]] = {}
        for stream, group in self._group_by_stream(claims).items():
            for consumer in {c.consumer for c in group}:
                mine = [c for c in group if c.consumer == consumer]
                keys = [stream]
                args: list[ScriptArg] = [consumer, repr(time.time()), self._live_ttl_ms,
                                   "" if step is None else step, "" if total is None else total]
                for c in mine:
                    keys += self.keys.per_job(c.job.id)
                    preview = previews.get(c.job.id)
                    args += [c.entry_id, c.attempt, "" if preview is None else base64.b64encode(preview).decode()]
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
        job_id, owner = claim.job.id, claim.job.owner
        keys = [self._stream_of(claim.job), *self.keys.per_job(job_id),
                self.keys.quota_stored(owner or "-"), self.keys.quota_stored_total(owner or "-"),
                *(self.keys.result(job_id, i) for i in range(len(pngs)))]
        args: list[ScriptArg] = [claim.consumer, claim.attempt, claim.entry_id, repr(time.time()),
                                 self._final_ttl_ms, status.value, error, 1 if owner else 0, *pngs]
        return _s(await self._lua["settle"](keys=keys, args=args)) == "ok"

    @retrying
    async def finish(self, claim: Claim, pngs: Sequence[bytes]) -> bool:
        """Store the result PNGs (with the result TTL), mark the job succeeded, then XACK, atomically. False
        when this worker no longer owns the job (nothing is written: the new owner answers)."""
        return await self._settle_claim(claim, JobStatus.succeeded, pngs=pngs)

    @retrying
    async def fail(self, claim: Claim, error: str) -> bool:
        """Mark the job failed with `error` (shown to the client) and XACK it; False if no longer owned."""
        return await self._settle_claim(claim, JobStatus.failed, error=error)

    @retrying
    async def cancelled(self, claim: Claim) -> bool:
        """The worker stopped the job on a cancel request: mark it cancelled and XACK it."""
        return await self._settle_claim(claim, JobStatus.cancelled)

    @retrying
    async def is_cancelled(self, job_id: str) -> bool:
        """Whether cancellation was asked for (or the job is already cancelled)."""
        cancel, status = await self.redis.hmget(self.keys.job(job_id), ["cancel", "status"])
        return cancel == b"1" or status == JobStatus.cancelled.value.encode()

    @retrying
    async def inputs(self, job_id: str) -> tuple[bytes | None, bytes | None]:
        """The job's input (image, mask) bytes, None where absent; a semantic job's label map is its image."""
        values: Any = await self.redis.mget([self.keys.input(job_id, "image"), self.keys.input(job_id, "mask")])
        return values[0], values[1]

    # ------------------------------------------------------------------------------------------ registry, stats

    @retrying
    async def heartbeat(self, worker: WorkerInfo) -> None:
        """Say `worker` is alive; it counts as gone 3 heartbeat intervals after its last call."""
        now = time.time()
        info = worker.model_copy(update={"last_seen": now})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(worker.id), info.model_dump_json(), px=int(self.settings.heartbeat_ttl_s * 1000))
            pipe.zadd(self.keys.workers, {worker.id: now})
            await pipe.execute()

    @retrying
    async def deregister(self, worker_id: str) -> None:
        """A worker shutting down cleanly leaves the registry at once."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.zrem(self.keys.workers, worker_id)
            await pipe.execute()

    @retrying
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

    @retrying
    async def stats(self, model: str) -> QueueStats:
        """Depth, claimed and waiting jobs and the oldest waiting job's age (Redis clock) of `model`'s queue: its
        streams of every priority together."""
        parts = [await self._stream_stats(model, stream) for stream in self.keys.streams(model)]
        return QueueStats(model=model, depth=sum(p.depth for p in parts), pending=sum(p.pending for p in parts),
                          waiting=sum(p.waiting for p in parts),
                          oldest_waiting_age_s=max(p.oldest_waiting_age_s for p in parts))

    async def _stream_stats(self, model: str, stream: str) -> QueueStats:
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

    @retrying
    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead letters (jobs that ran out of attempts), newest first."""
        entries: Any = await self.redis.xrevrange(self.keys.dead, count=count)
        return [{"entry": _s(e), **{_s(k): _s(v) for k, v in f.items()}} for e, f in entries]
