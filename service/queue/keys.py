"""Every Redis key name of the service, defined once, and the formats of the ids that go into them.

Everything lives under one prefix (`Settings.key_prefix`, default `ldm`), so several deployments can share a
Redis. Each model has one job stream per priority: `ldm:jobs:<model>` (normal, the name it had before priorities),
`ldm:jobs-high:<model>` and `ldm:jobs-low:<model>` (a model name may hold ':', so the priority goes before it); KEDA
scales the workers on the three together (deploy/k8s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from service.schemas import PRIORITIES, Priority

GROUP = "workers"  # the consumer group on every job stream
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
EVENT_ID = re.compile(r"^\d+(-\d+)?$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as an HTTP header carries it


@dataclass(frozen=True)
class Keys:
    """Every Redis key name: the job protocol's and the per-key quotas' (service/quotas.py)."""

    prefix: str = "ldm"

    def stream(self, model: str, priority: Priority = "normal") -> str:
        """The job stream of `model`'s jobs of `priority`."""
        kind = "jobs" if priority == "normal" else f"jobs-{priority}"
        return f"{self.prefix}:{kind}:{model}"

    def claimed(self, token: str, priority: Priority) -> str:
        """What one claim call took from a stream of `priority` (entry and job ids), kept briefly for its retry."""
        return f"{self.prefix}:claimed:{token}:{priority}"

    def streams(self, model: str) -> list[str]:
        """`model`'s job streams, highest priority first."""
        return [self.stream(model, p) for p in PRIORITIES]

    def stream_model(self, key: str) -> str | None:
        """The model whose job stream `key` is (any priority); None for another key."""
        for p in PRIORITIES:
            prefix = self.stream("", p)
            if key.startswith(prefix):
                return key[len(prefix):]
        return None

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def result(self, job_id: str, index: int) -> str:
        return f"{self.prefix}:result:{job_id}:{index}"

    def input(self, job_id: str, name: Literal["image", "mask"]) -> str:
        return f"{self.prefix}:input:{job_id}:{name}"

    def idempotency(self, owner: str, key: str) -> str:
        """Idempotency key `key` of API key `owner` ("" without authentication): each API key has its own key
        space, so one tenant's key never names another's job."""
        return f"{self.prefix}:idem:{owner or '-'}:{key}"

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

    def quota_bucket(self, key_id: str) -> str:
        """The submission-rate token bucket of API key `key_id`."""
        return f"{self.prefix}:quota:rate:{key_id}"

    def quota_jobs(self, key_id: str) -> str:
        """The ids of API key `key_id`'s jobs in flight."""
        return f"{self.prefix}:quota:jobs:{key_id}"

    def quota_reservations(self, key_id: str) -> str:
        """API key `key_id`'s slots reserved by submissions under way."""
        return f"{self.prefix}:quota:reserved:{key_id}"

    def quota_work(self, key_id: str) -> str:
        """The work-units token bucket of API key `key_id`."""
        return f"{self.prefix}:quota:work:{key_id}"

    def quota_stored(self, key_id: str) -> str:
        """API key `key_id`'s stored results: a zset of '<entry> <bytes>' scored by their expiry (ms)."""
        return f"{self.prefix}:quota:stored:{key_id}"

    def quota_stored_total(self, key_id: str) -> str:
        """The bytes `quota_stored(key_id)` lists, summed."""
        return f"{self.prefix}:quota:stored-bytes:{key_id}"
