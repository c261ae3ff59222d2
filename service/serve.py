"""`ldm serve` (one box: embedded Redis, REST + gRPC, supervised workers) and `ldm api` (front ends only).

The front ends run in this process on one event loop; each worker is a child process started through
the `ldm` console script (so `ps` shows `ldm worker`), restarted with backoff when it dies. Ctrl-C or
SIGTERM stops the front ends, then the workers (they finish the batch in hand), then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from service.api.calls import CallLimits
from service.api.grpc import bound_port, create_grpc_server, reflection_enabled, stop_grpc
from service.api.rest import create_app, uvicorn_config
from service.auth import check_exposure, is_loopback
from service.config import Settings
from service.embedded import EmbeddedRedis, free_port
from service.metrics import ApiMetrics
from service.placeholders import refuse_placeholder_secrets
from service.queue import JobQueue
from service.tls import rest_scheme, tls_files

log = logging.getLogger(__name__)
WORKER_STOP_TIMEOUT_S = 120.0  # a worker finishes its batch in hand before it exits


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: this module decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def ldm_command() -> list[str]:
    """How to start `ldm ...` again: the console script beside this interpreter, else `python -m`."""
    script = Path(sys.executable).with_name("ldm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


@dataclass
class WorkerSupervisor:
    """Keeps `count` worker processes alive for one model spec; restarts a dead one with backoff."""

    model_spec: str
    env: dict[str, str]
    count: int = 1
    restarts: int = 0
    metrics_host: str = "127.0.0.1"
    first_metrics_port: int = 0  # 0: a free port per slot; else slot i serves on this + i
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # each slot's /metrics port, kept across restarts
    _started: list[float] = field(default_factory=list)  # monotonic start time per slot
    _due: list[float | None] = field(default_factory=list)  # when a dead slot restarts
    _backoff: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.procs, self._started = [], []
        self._due, self._backoff = [None] * self.count, [1.0] * self.count
        first = self.first_metrics_port
        self.ports = [first + i if first else free_port() for i in range(self.count)]
        for i in range(self.count):
            self.procs.append(self._spawn(i))
            self._started.append(time.monotonic())

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        cmd = [*ldm_command(), "worker", "--model", self.model_spec, "--worker-id", f"serve-{os.getpid()}-{i}"]
        env = {**self.env, "LDM_WORKER_METRICS_PORT": str(self.ports[i]), "LDM_WORKER_METRICS_HOST": self.metrics_host}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # Ctrl-C reaches serve only
        log.info("event=worker_started index=%d pid=%d", i, proc.pid)
        return proc

    def metrics_urls(self) -> list[str]:
        """Each slot's worker /metrics, in slot order (the API's /metrics re-exposes them: one target per box)."""
        host = "127.0.0.1" if self.metrics_host in ("0.0.0.0", "::", "") else self.metrics_host
        return [f"http://{host}:{port}/metrics" for port in self.ports]

    def poll(self) -> None:
        """Restart exited workers after 1, 2, 4 ... 30 s; a worker that lived a minute resets its backoff."""
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                continue
            due = self._due[i]
            if due is None:
                if now - self._started[i] > 60:
                    self._backoff[i] = 1.0
                self._due[i] = now + self._backoff[i]
                log.warning("event=worker_exited index=%d code=%s restart_in_s=%.0f", i, proc.returncode,
                            self._backoff[i])
                self._backoff[i] = min(30.0, self._backoff[i] * 2)
            elif now >= due:
                self.procs[i], self._started[i], self._due[i] = self._spawn(i), now, None
                self.restarts += 1

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("event=worker_killed pid=%d reason=stop_timeout", proc.pid)
                proc.kill()
                proc.wait()


async def run_front_ends(settings: Settings, *, stop: asyncio.Event,
                         supervisor: WorkerSupervisor | None = None, banner: bool = False) -> None:
    """REST and gRPC on one loop until `stop` is set; polls the supervisor meanwhile. Refuses to start (ValueError)
    beyond loopback without authentication (service/auth.py `check_exposure`), and says how it authenticates.
    Both front ends share one job queue (one bounded Redis pool: `redis_max_connections` for the process), one set
    of metrics and one count of streams and waiting calls (service/api/calls.py)."""
    auth = check_exposure(settings)
    log.info("event=front_ends_auth %s", auth)
    exposed = [h for h in {settings.rest_host, settings.grpc_host} if not is_loopback(h)]
    if exposed and tls_files(settings) is None and not auth.startswith("authentication: OFF"):
        log.warning("event=plain_text_keys hosts=%s note=API keys cross the network in clear unless a proxy in front "
                    "ends TLS; set LDM_TLS_CERT_FILE and LDM_TLS_KEY_FILE otherwise", ",".join(sorted(exposed)))
    metrics = ApiMetrics(worker_urls=supervisor.metrics_urls if supervisor is not None else None)
    limits = CallLimits(settings, metrics)
    async with JobQueue(settings) as queue:
        await _run_both(settings, queue, metrics, limits, stop=stop, supervisor=supervisor, auth=auth if banner
                        else None)


async def _run_both(settings: Settings, queue: JobQueue, metrics: ApiMetrics, limits: CallLimits, *,
                    stop: asyncio.Event, supervisor: WorkerSupervisor | None, auth: str | None) -> None:
    """`run_front_ends` once its shared parts are made; prints the banner when given `auth`."""
    app = create_app(settings, queue, metrics=metrics, limits=limits)
    # set on stop, before uvicorn's graceful shutdown: a synchronous call still waiting for its job answers 503 at
    # once (the job goes on; service/api/submit.py) instead of being cut off with a 500 when the grace runs out
    draining = app.state.draining = asyncio.Event()
    rest = _Server(uvicorn_config(app, settings, log_level="warning"))
    grpc_server = create_grpc_server(settings, queue, metrics=metrics, limits=limits)
    await grpc_server.start()
    rest_task = asyncio.create_task(rest.serve())
    while not rest.started and not rest_task.done():
        await asyncio.sleep(0.05)
    if rest_task.done():  # e.g. the port is taken: surface uvicorn's error
        await stop_grpc(grpc_server, None)
        rest_task.result()
        raise RuntimeError(f"the REST server could not start on {settings.rest_host}:{settings.rest_port}")
    if auth is not None:
        print(_banner(settings, bound_port(grpc_server), auth), flush=True)
    try:
        while not stop.is_set():
            if supervisor is not None:
                supervisor.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        draining.set()
        rest.should_exit = True
        await stop_grpc(grpc_server, settings.grpc_shutdown_grace_s)
        await rest_task


def _banner(settings: Settings, grpc_port: int, auth: str) -> str:
    base = f"{rest_scheme(settings)}://{settings.rest_host}:{settings.rest_port}"
    reflection = ", reflection" if reflection_enabled(settings) else ""
    tls = " with TLS" if tls_files(settings) else ""
    key = "" if auth.startswith("authentication: OFF") else "-H 'Authorization: Bearer $LDM_API_KEY' "
    return "\n".join([
        f"ldm-serve is up. Model: {settings.default_model}",
        f"  REST  {base}   (docs {base}/docs, metrics {base}/metrics)",
        f"  gRPC  {settings.grpc_host}:{grpc_port}{tls}   (ldm.v1.Diffusion, health{reflection})",
        f"  {auth}",
        "Try:",
        f"  curl -s -X POST {base}/v1/txt2img -H 'Content-Type: application/json' {key}\\",
        "       -d '{\"prompt\": \"a red circle on the left\", \"seed\": 1}' -o out.png",
        "Ctrl-C stops everything.",
    ])


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


def run_api(settings: Settings) -> int:
    """`ldm api`: the REST and gRPC front ends against an existing Redis."""
    if settings.redis_url is None:
        raise ValueError("ldm api needs a Redis: set LDM_REDIS_URL (or run `ldm serve`, which starts one)")
    check_exposure(settings)  # before anything starts
    refuse_placeholder_secrets(settings)

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await run_front_ends(settings, stop=stop, banner=True)

    asyncio.run(main())
    return 0


def run_serve(settings: Settings, model_spec: str, *, workers: int = 1) -> int:
    """`ldm serve`: embedded Redis unless LDM_REDIS_URL is set, the front ends, and supervised workers."""
    check_exposure(settings)  # before Redis and the workers start
    refuse_placeholder_secrets(settings)
    from service.worker.runner import served_name  # here: it imports torch, which `ldm api` never needs

    name = served_name(model_spec)
    redis: EmbeddedRedis | None = None
    if settings.redis_url is None:
        redis = EmbeddedRedis(settings.data_dir / "redis", port=settings.embedded_redis_port or None)
        url = redis.start()
        log.info("event=embedded_redis url=%s data=%s", redis.url_without_password, settings.data_dir / "redis")
        settings = settings.model_copy(update={"redis_url": url})
    settings = settings.model_copy(update={"default_model": name})
    env = {**os.environ, "LDM_REDIS_URL": str(settings.redis_url), "LDM_DEFAULT_MODEL": name}
    supervisor = WorkerSupervisor(model_spec, env, count=workers, metrics_host=settings.worker_metrics_host,
                                  first_metrics_port=settings.worker_metrics_port)
    try:
        supervisor.start()

        async def main() -> None:
            stop = asyncio.Event()
            _stop_on_signals(stop)
            await run_front_ends(settings, stop=stop, supervisor=supervisor, banner=True)

        asyncio.run(main())
    finally:
        supervisor.stop()
        if redis is not None:
            redis.stop()
    return 0
