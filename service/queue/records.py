"""The queue's records: what it stores about a job (`Job`, its `JobEvent`s), a job in a worker's hands (`Claim`),
what a worker says about itself (`WorkerInfo`) and a queue's state (`QueueStats`).

The request inside a `Job` is the front ends' `GenerationRequest` (service/schemas.py, with its admission rules);
these records are only what the queue adds around it. Their JSON is what the REST API answers and what the Redis
hashes and event streams hold (written by the scripts in service/queue/scripts.py, read by the client).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import GenerationRequest, LabelSet, Sampler, Task


class JobStatus(StrEnum):
    """queued -> running -> succeeded | failed | cancelled (a reclaimed job goes back to queued)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobInfo(BaseModel):
    """What a client may see of a job (GET /v1/jobs/{id} answers it, images excluded): not who submitted it nor
    which worker host runs it (`Job` adds those)."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    status: JobStatus
    request: GenerationRequest
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = Field(default=0, description="sampler steps done in the current attempt")
    total: int = Field(default=0, description="sampler steps of the job (0 before it starts)")
    attempts: int = Field(default=0, description="deliveries to a worker so far")
    error: str | None = None
    results: int = Field(default=0, description="result images stored (n once succeeded)")
    cancel_requested: bool = False
    deadline_s: float | None = Field(
        default=None, description="seconds after submission by which the job must start, else it fails (deadline "
        "exceeded) without running")
    queue_position: int | None = Field(default=None, description="while queued: the jobs workers will take before "
                                       "it (0 = next), in priority order")
    eta_s: float | None = Field(default=None, description="while queued: estimated seconds until it is done, from "
                                "the workers' recent step rate and the work ahead of it (None = not known yet)")


class Job(JobInfo):
    """A job's record as stored in `ldm:job:<id>`: what a client sees, plus what only the service uses."""

    worker: str | None = Field(default=None, description="the worker holding the job, if any (its host name: "
                               "never shown to clients)")
    owner: str = Field(default="", description="key id of the API key that submitted it (service/auth.py); \"\" "
                       "when submitted without authentication")
    ahead_at_submit: int = Field(default=0, description="jobs waiting ahead of it (priority order) when it was queued")


EventType = Literal["queued", "started", "progress", "requeued", "cancel_requested", "succeeded", "failed",
                    "cancelled", "position"]
TERMINAL_EVENTS: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class JobEvent(BaseModel):
    """One entry of `ldm:events:<id>`; `id` is the stream entry id, usable as SSE `Last-Event-ID`."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    status: JobStatus
    step: int = 0
    total: int = 0
    results: int = 0
    error: str | None = None
    preview: str | None = Field(default=None, description="progress of a job asking for previews: a small PNG of "
                                "its current denoised estimate, base64")
    queue_position: int | None = Field(default=None, description="`position` events (sent to watchers of a queued "
                                       "job when its place changes; not stored: their id is the last stored "
                                       "event's): the jobs ahead of it")
    eta_s: float | None = Field(default=None, description="`position` events: estimated seconds until it is done")
    at: float = Field(description="Unix time of the event")

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


@dataclass(frozen=True)
class Place:
    """Where a queued job stands: jobs ahead of it, and the estimated seconds until it is done (None: unknown)."""

    queue_position: int
    eta_s: float | None


@dataclass(frozen=True)
class Claim:
    """A job delivered to one worker (`consumer`); `job.attempts` fences every later update."""

    job: Job
    entry_id: str
    consumer: str

    @property
    def attempt(self) -> int:
        return self.job.attempts


class WorkerInfo(BaseModel):
    """What a worker says about itself in its heartbeat."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9._:@-]{1,128}$")
    models: list[str]
    tasks: list[Task] = Field(default_factory=list,
                              description="tasks its model can do (empty = not said: assume any)")
    labels: LabelSet | None = Field(default=None, description="the labels its model takes (class, layout and "
                                    "semantic models; None = not said: the worker checks them)")
    default_guidance: dict[Task, float] = Field(
        default_factory=dict, description="the guidance_scale each task of its model gets when a request gives none "
        "(the front ends fill it in; empty = not said: the task's default)")
    default_sampler: Sampler | None = Field(
        default=None, description="the sampler its model's jobs get when a request names none (the front ends fill it "
        "in; None = not said: dpmpp_2m)")
    sampler_guidance: dict[Sampler, dict[Task, float]] = Field(
        default_factory=dict, description="for a sampler with a default scale of its own on this model (PLMS on "
        "shapes-class), the guidance_scale each task gets with it when a request gives none; replaces "
        "default_guidance for that sampler")
    missing_null: str | None = Field(default=None, description="the null condition its model lacks ('null class'), "
                                     "which guidance needs: it takes guidance_scale 1 only (None = it has one)")
    options: list[str] | None = Field(
        default=None, description="the request fields only some models take that its model takes (original_size, "
        "crops_coords_top_left, target_size: SDXL; noise_level: the SD x4 upscaler); None = not said: the worker "
        "checks them")
    refiners: list[str] = Field(default_factory=list, description="the SDXL refiners it holds beside its model, "
                                "by the name a request's `refiner` gives (LDM_WORKER_REFINER)")
    host: str = ""
    pid: int = 0
    device: str = ""
    started_at: float = 0.0
    busy: bool = False
    last_seen: float = 0.0
    step_rate: float = Field(default=0.0, ge=0, description="sample-steps per second over its recent steps (0 = "
                             "none measured yet): the queue's ETAs")
    steps_in_hand: int = Field(default=0, ge=0, description="sample-steps left of the jobs it holds")


class QueueStats(BaseModel):
    """One model's queue, for metrics and Retry-After."""

    model: str
    depth: int = Field(description="accepted, unfinished jobs (waiting + claimed)")
    pending: int = Field(description="jobs claimed by a worker and not yet acknowledged")
    waiting: int = Field(description="jobs no worker has claimed yet")
    oldest_waiting_age_s: float = Field(description="age of the oldest job no worker has claimed; 0 if none")
