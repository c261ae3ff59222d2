"""The gRPC server: ldm.v1.Diffusion (`servicer.py`, behind `interceptor.py`), the standard health service and
server reflection (off by default once API keys are configured: `grpc_reflection`) on one grpc.aio server, on a
TLS port when `tls_cert_file` is set, and its life: start, watch Redis, stop gracefully.

Health: "" and "ldm.v1.Diffusion" are SERVING while Redis answers a ping, checked every
`grpc_health_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import weakref
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.calls import CallLimits
from service.api.grpc.guard import CallGuard, receive_limit
from service.api.grpc.interceptor import StatusInterceptor
from service.api.grpc.servicer import DiffusionServicer
from service.api.grpc.stubs import SERVICE_NAME, pb_grpc
from service.auth import Authenticator
from service.config import Settings
from service.metrics import ApiMetrics
from service.queue import JobQueue, QueueUnavailable
from service.tls import grpc_credentials, tls_files

log = logging.getLogger(__name__)


@dataclass
class _Runtime:
    """What lives beside one server: its queue, health service and the task that watches Redis."""

    port: int
    queue: JobQueue
    owns_queue: bool
    servicer: DiffusionServicer
    health: health.aio.HealthServicer
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


_RUNTIMES: weakref.WeakKeyDictionary[grpc.aio.Server, _Runtime] = weakref.WeakKeyDictionary()


async def _watch_redis(runtime: _Runtime, interval_s: float) -> None:
    """Health: SERVING for "" and ldm.v1.Diffusion while Redis answers a ping, NOT_SERVING otherwise (and
    until the first ping, a few milliseconds after start)."""
    for service in ("", SERVICE_NAME):
        await runtime.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    last = None
    while not runtime.stopping.is_set():  # a flag, not only cancellation: redis-py may swallow a cancel
        try:
            await runtime.queue.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except QueueUnavailable as exc:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            if last != status:
                log.warning("gRPC health: NOT_SERVING (%s)", exc)
        for service in ("", SERVICE_NAME):
            await runtime.health.set(service, status)
        last = status
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.stopping.wait(), interval_s)


async def _run_beside(server: grpc.aio.Server, runtime: _Runtime, interval_s: float) -> None:
    """Watch Redis while the server lives; when it stops, finish abandoned-job cancellations, close the queue."""
    watcher = asyncio.create_task(_watch_redis(runtime, interval_s))
    try:
        await server.wait_for_termination()
    finally:
        runtime.stopping.set()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.sleep(0)  # let the done-callbacks of the last calls schedule their cancellations
        await runtime.servicer.drain()
        if runtime.owns_queue:
            await runtime.queue.aclose()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reflection_enabled(settings: Settings) -> bool:
    """`grpc_reflection`: auto = only while no API key is configured (it describes the API to any caller)."""
    if settings.grpc_reflection != "auto":
        return settings.grpc_reflection == "on"
    return not Authenticator(settings).enabled


def create_grpc_server(settings: Settings, queue: JobQueue | None = None, *, metrics: ApiMetrics | None = None,
                       limits: CallLimits | None = None) -> grpc.aio.Server:
    """A gRPC server bound to `grpc_host:grpc_port` (port 0: any free port, see `bound_port`) with
    ldm.v1.Diffusion, health checking and reflection (`grpc_reflection`), TLS when configured (service/tls.py); not
    started. Call it inside the event loop that will run it. Without `queue` it opens its own on `settings` and
    closes it when the server stops. With `metrics` (the API process's, shared with the REST app) every call is
    counted in `ldm_grpc_requests_total` and timed. `limits`: the process's caps on streams and waiting calls,
    shared with the REST app; by default its own. At most `grpc_max_concurrent_rpcs` calls run at once, and no
    request is received longer than the largest method's limit (service/api/grpc/guard.py)."""
    owns_queue = queue is None
    queue = queue if queue is not None else JobQueue(settings)
    servicer = DiffusionServicer(queue, settings)
    guard = CallGuard(Authenticator(settings), servicer.quotas, limits or CallLimits(settings, metrics))
    server = grpc.aio.server(
        interceptors=[StatusInterceptor(metrics, guard)], maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", receive_limit(settings)),
                 ("grpc.max_send_message_length", settings.grpc_max_message_bytes)])
    pb_grpc.add_DiffusionServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled(settings):
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
    address, credentials = _address(settings.grpc_host, settings.grpc_port), grpc_credentials(settings)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    runtime = _Runtime(port, queue, owns_queue, servicer, health_servicer)
    runtime.task = asyncio.get_running_loop().create_task(
        _run_beside(server, runtime, settings.grpc_health_interval_s))
    _RUNTIMES[server] = runtime
    return server


def bound_port(server: grpc.aio.Server) -> int:
    """The port a server made by `create_grpc_server` listens on."""
    return _RUNTIMES[server].port


async def stop_grpc(server: grpc.aio.Server, grace_s: float | None) -> None:
    """Graceful stop: health says NOT_SERVING, new calls are refused, running ones get `grace_s` seconds
    (None: aborted at once); then the server's own queue is closed."""
    runtime = _RUNTIMES.get(server)
    if runtime is not None:
        await runtime.health.enter_graceful_shutdown()
    await server.stop(grace_s)
    if runtime is not None and runtime.task is not None:
        await runtime.task


async def serve_grpc(settings: Settings, queue: JobQueue | None = None, *, stop: asyncio.Event | None = None,
                     metrics: ApiMetrics | None = None) -> None:
    """Run the gRPC server until `stop` is set (without one: until SIGINT or SIGTERM), then stop gracefully
    (`grpc_shutdown_grace_s`)."""
    server = create_grpc_server(settings, queue, metrics=metrics)
    await server.start()
    log.info("gRPC (ldm.v1.Diffusion, health%s) on %s%s", ", reflection" if reflection_enabled(settings) else "",
             _address(settings.grpc_host, bound_port(server)), " with TLS" if tls_files(settings) else "")
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_grpc(server, settings.grpc_shutdown_grace_s)
