"""The Redis job queue: the one thing the front ends and the workers share.

- `keys`: every Redis key name, defined once; `scripts`: the Lua scripts, one per state change;
- `records`: what the queue stores and answers (`Job`, `JobStatus`, `JobEvent`, `Claim`, `WorkerInfo`, `QueueStats`);
- `client`: `JobQueue`, the protocol over `redis.asyncio`; `sync`: `SyncJobQueue`, the same for a blocking caller;
- `errors`: what the front ends map to status codes.

Protocol (see the README's architecture section):
- `submit` writes the job hash, its input images and one entry on the model's stream, atomically, unless the
  idempotency key already names a job or the stream holds `queue_max_depth` unfinished jobs (`QueueFull`).
- A worker `claim`s entries with XREADGROUP (consumer group `workers`; read and taken in one script, which a
  retry after a lost reply can answer again) and `reclaim`s, with XAUTOCLAIM, entries whose worker went silent
  for the visibility timeout; every delivery counts in `attempts`, and a job out of
  attempts fails into the dead-letter stream. `start` marks it running, `progress` records steps (and keeps the
  entry's idle time at zero), `finish` stores the PNGs, marks it succeeded and only then XACKs, in one script.
- Every state change is one Lua script, fenced by (worker, attempts): a worker that lost its job to another
  (it was presumed dead) cannot overwrite the new owner's result, so no job is answered twice.
- `cancel` of a queued job cancels it at once (its entry is acked and deleted, so no worker runs it); of a
  running job it sets a flag that `progress` reports to the worker between sampler steps.

Why asyncio: the front ends are async (FastAPI, grpc.aio) and must not block their event loop on Redis, so
`JobQueue` is written once over `redis.asyncio`. The worker is a synchronous torch process; `SyncJobQueue`
runs the same coroutines on a private event-loop thread and blocks the caller.
"""

from __future__ import annotations

from service.queue.client import JobQueue, retrying
from service.queue.errors import IdempotencyConflict, JobNotFound, QueueError, QueueFull, QueueUnavailable
from service.queue.keys import EVENT_ID, GROUP, IDEMPOTENCY_KEY, JOB_ID, Keys
from service.queue.records import (
    TERMINAL_EVENTS,
    Claim,
    EventType,
    Job,
    JobEvent,
    JobStatus,
    Place,
    QueueStats,
    WorkerInfo,
)
from service.queue.sync import SyncJobQueue

__all__ = [
    "EVENT_ID", "GROUP", "IDEMPOTENCY_KEY", "JOB_ID", "TERMINAL_EVENTS", "Claim", "EventType", "IdempotencyConflict",
    "Job", "JobEvent", "JobNotFound", "JobQueue", "JobStatus", "Keys", "Place", "QueueError", "QueueFull", "QueueStats",
    "QueueUnavailable", "SyncJobQueue", "WorkerInfo", "retrying",
]
