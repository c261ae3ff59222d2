"""Every Prometheus metric of the project, defined once (prometheus-client).

Conventions (prometheus.io naming guide): the `ldm_` prefix, base units in the name (`_seconds`, `_bytes`),
`_total` on counters, and only low-cardinality labels: route templates (never raw paths), methods, status
codes, model names, tasks, failure reasons. Never a job id, a prompt or a worker id (Prometheus adds the
scraped `instance`; a worker's identity is in `ldm_worker_info`).

`METRICS` (= `API_METRICS` + `WORKER_METRICS`) is the table of every metric as (name, type, labels, help),
the README renders it; the classes below build their metrics from it, so a name or help text exists once.

Processes: the API process (REST and gRPC in one process) and every worker process each hold their own
`CollectorRegistry` and serve it on their own port: the API on its REST app's `/metrics`, a worker on
`worker_metrics_port` (`start_metrics_server`). On one box (`ldm serve`) the API's `/metrics` also carries every
worker it supervises (`SupervisedWorkersCollector`: it reads their /metrics and adds a `worker_index` label), so one
scrape target sees the whole box; `ldm api` + `ldm worker` deployments keep one target per process. No metric is
written by two processes, so prometheus-client's multiprocess mode (and its mmap files) is not needed; it would be
only if one API served from several forked processes (`uvicorn --workers N`), which this project does not do: scale
the API out with replicas instead.
Nothing is registered in the global default registry, so tests can build as many apps and workers as they like.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.queue import JobQueue, QueueStats

log = logging.getLogger(__name__)

MetricType = Literal["counter", "gauge", "histogram", "info"]


class MetricSpec(NamedTuple):
    """One row of the metrics table: the name as scraped (counters end in `_total`), type, labels, help."""

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str


# ------------------------------------------------------------------------------------------------ the table

API_METRICS: list[MetricSpec] = [
    MetricSpec("ldm_http_requests_total", "counter", ("route", "method", "status"),
               "HTTP requests answered, by route template, method and status code."),
    MetricSpec("ldm_http_request_duration_seconds", "histogram", ("route", "method"),
               "Time to answer an HTTP request (a synchronous endpoint includes the wait for its image)."),
    MetricSpec("ldm_grpc_requests_total", "counter", ("method", "code"),
               "gRPC calls answered, by method and status code name."),
    MetricSpec("ldm_grpc_request_duration_seconds", "histogram", ("method",),
               "Time to answer a gRPC call (a stream: until its last message)."),
    MetricSpec("ldm_queue_depth", "gauge", ("model",),
               "Accepted, unfinished jobs of the model's queue (waiting + claimed by a worker)."),
    MetricSpec("ldm_queue_claimed", "gauge", ("model",),
               "Jobs of the model's queue claimed by a worker and not yet finished."),
    MetricSpec("ldm_queue_oldest_job_age_seconds", "gauge", ("model",),
               "Age of the oldest job no worker has claimed yet; 0 when none waits."),
    MetricSpec("ldm_workers", "gauge", ("model",),
               "Live workers serving the model (heartbeat within 3 intervals)."),
    MetricSpec("ldm_redis_up", "gauge", (),
               "1 when the last queue statistics read from Redis succeeded, else 0."),
    MetricSpec("ldm_auth_failures_total", "counter", ("front_end", "reason"),
               "Calls refused for their credentials, by front end (rest, grpc) and reason (missing, malformed, "
               "unknown, revoked; /metrics without its token counts as rest)."),
    MetricSpec("ldm_quota_rejections_total", "counter", ("front_end", "quota"),
               "Calls refused by a quota or a concurrency cap, by front end (rest, grpc) and quota: per key rate, "
               "in_flight, work, stored_bytes, streams, waiting_calls; per API process server_streams, "
               "server_waiting_calls."),
    MetricSpec("ldm_calls_held", "gauge", ("kind",),
               "Calls holding the API process open now, by kind: streams (SSE, WatchJob), waiting_calls "
               "(synchronous calls waiting for their images)."),
    MetricSpec("ldm_webhook_deliveries_total", "counter", ("outcome",),
               "Webhook delivery attempts by outcome: delivered (2xx), failed (to be retried), dead (out of attempts "
               "or refused: dead-lettered), refused (the host resolved to a forbidden address)."),
]

WORKER_METRICS: list[MetricSpec] = [
    MetricSpec("ldm_job_wait_seconds", "histogram", ("model",),
               "Time from a job's submission to the start of its run on a worker."),
    MetricSpec("ldm_job_run_seconds", "histogram", ("model", "task"),
               "Time from a job's start on a worker to its end (succeeded, failed or cancelled)."),
    MetricSpec("ldm_batch_size", "histogram", ("model", "task"),
               "Images (samples) in one sampler run of a worker."),
    MetricSpec("ldm_batch_duration_seconds", "histogram", ("model", "task"),
               "Time of one batch on the device: text encoding, sampling and decoding (its PNGs encode and its jobs "
               "are stored while the next batch runs: ldm_finish_seconds)."),
    MetricSpec("ldm_sampler_step_seconds", "histogram", ("model",),
               "Time of one sampler step of a batch (between consecutive step callbacks)."),
    MetricSpec("ldm_images_generated_total", "counter", ("model", "task"),
               "Images generated and stored as results."),
    MetricSpec("ldm_jobs_completed_total", "counter", ("model", "status"),
               "Jobs a worker ended, by final status (succeeded, failed, cancelled)."),
    MetricSpec("ldm_job_failures_total", "counter", ("model", "reason"),
               "Jobs failed by a worker, by reason (unsupported, invalid_input, out_of_memory, internal)."),
    MetricSpec("ldm_jobs_reclaimed_total", "counter", ("model",),
               "Jobs taken over from workers that stopped responding."),
    MetricSpec("ldm_jobs_lost_total", "counter", ("model",),
               "Jobs this worker dropped because another worker had taken them over."),
    MetricSpec("ldm_oom_retries_total", "counter", ("model",),
               "Batches split in halves and retried after the accelerator ran out of memory (continuous batching: "
               "steps whose denoiser calls were halved)."),
    MetricSpec("ldm_samples_joined_mid_run_total", "counter", ("model",),
               "Samples admitted into a running step batch (continuous batching) beside samples already running."),
    MetricSpec("ldm_lora_cache_bytes", "gauge", ("model",),
               "Bytes of LoRA adapter tensors the worker holds loaded (at most LDM_LORA_CACHE_MB)."),
    MetricSpec("ldm_lora_cache_adapters", "gauge", ("model",),
               "LoRA adapters the worker holds loaded."),
    MetricSpec("ldm_lora_loads_total", "counter", ("model",),
               "LoRA files read by the worker (cache misses: first use, evicted earlier, or changed on disk)."),
    MetricSpec("ldm_preview_seconds", "histogram", ("model",),
               "Time to make one live preview PNG of a job's current x0 estimate."),
    MetricSpec("ldm_finish_seconds", "histogram", ("model",),
               "Time from a job's last image decoded to its results stored: its PNGs encoding on the PNG threads, "
               "then the Redis write, while the worker runs its next step or batch."),
    MetricSpec("ldm_finish_blocked_seconds_total", "counter", ("model",),
               "Time the worker's loop waited for jobs being finished instead of running the next step: more than "
               "2 x LDM_MAX_BATCH images in hand, LDM_WORKER_FINISH_OVERLAP=false, or a stop."),
    MetricSpec("ldm_time_to_first_step_seconds", "histogram", ("model",),
               "Time from a job's submission to its first sampler step done (queue wait, admission, set-up)."),
    MetricSpec("ldm_queue_position_at_claim", "histogram", ("model",),
               "Jobs that were ahead of a job in its model's queue (its queue_position) when it was queued, observed "
               "as a worker claims it: how deep the queue was that claimed jobs waited in."),
    MetricSpec("ldm_worker_busy_seconds_total", "counter", (),
               "Time the worker spent running jobs (rate() of it is the busy ratio)."),
    MetricSpec("ldm_worker_busy_ratio", "gauge", (),
               "Fraction of the last minute the worker spent running jobs."),
    MetricSpec("ldm_worker_heartbeats_total", "counter", (),
               "Heartbeats the worker wrote to the registry."),
    MetricSpec("ldm_worker_up", "gauge", (),
               "1 while the worker takes jobs; 0 once it is shutting down."),
    MetricSpec("ldm_worker_info", "info", ("worker", "model", "device", "dtype"),
               "The worker's identity: id, model, device and dtype (value 1)."),
    MetricSpec("ldm_accelerator_memory_bytes", "gauge", ("device", "kind"),
               "Accelerator memory by kind (allocated, reserved, peak_allocated, total); absent on CPU."),
]

METRICS: list[MetricSpec] = API_METRICS + WORKER_METRICS
_SPECS = {spec.name: spec for spec in METRICS}

#: latency buckets (seconds): requests and jobs of the tiny model on a CPU take well under a second,
#: SD-size jobs tens of seconds, and a synchronous request waits up to the job deadline
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
_POSITIONS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def metrics_table_markdown(specs: Sequence[MetricSpec] = METRICS) -> str:
    """The table as Markdown, for the README."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.type} | {', '.join(s.labels) or '-'} | {s.help} |" for s in specs]
    return "\n".join(rows)


def _base(spec: MetricSpec) -> str:
    """The name prometheus-client wants: counters without `_total` (it adds it), info without `_info`."""
    if spec.type == "counter":
        return spec.name.removesuffix("_total")
    if spec.type == "info":
        return spec.name.removesuffix("_info")
    return spec.name


def _counter(name: str, registry: CollectorRegistry) -> Counter:
    spec = _SPECS[name]
    return Counter(_base(spec), spec.help, spec.labels, registry=registry)


def _gauge(name: str, registry: CollectorRegistry) -> Gauge:
    spec = _SPECS[name]
    return Gauge(spec.name, spec.help, spec.labels, registry=registry)


def _histogram(name: str, registry: CollectorRegistry, buckets: Sequence[float]) -> Histogram:
    spec = _SPECS[name]
    return Histogram(spec.name, spec.help, spec.labels, buckets=buckets, registry=registry)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format and its content type (for a /metrics handler)."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------------------ the API

class QueueStatsCollector(Collector):
    """Queue depth, claimed jobs and oldest waiting age per model, live workers per model, Redis up.

    Collection in prometheus-client is synchronous, the queue is async: the API's /metrics handler awaits
    `refresh(queue)` (at most once per `max_age_s`, so scrapes do not hammer Redis), then renders; `collect`
    serves that snapshot. The models are the default model, those of live workers and those that have a
    job stream in Redis (a queue growing with no worker is the case an alert must see).
    """

    def __init__(self, max_age_s: float = 1.0) -> None:
        self.max_age_s = max_age_s
        self._stats: list[QueueStats] = []
        self._workers: dict[str, int] = {}
        self._redis_up = 0.0
        self._at = float("-inf")
        self._lock = threading.Lock()

    async def refresh(self, queue: JobQueue, models: Iterable[str] | None = None) -> None:
        """Read the queue statistics of `models` (default: discovered, see the class docstring)."""
        if time.monotonic() - self._at < self.max_age_s:
            return
        from service.queue import QueueError  # late: this module must not need Redis to be imported

        try:
            workers = await queue.workers()
            names = set(models) if models is not None else await _known_models(queue, workers)
            stats = [await queue.stats(m) for m in sorted(names)]
        except QueueError as exc:
            log.warning("queue statistics unavailable: %s", exc)
            with self._lock:
                self._stats, self._workers, self._redis_up, self._at = [], {}, 0.0, time.monotonic()
            return
        per_model = {m: sum(m in w.models for w in workers) for m in names}
        with self._lock:
            self._stats, self._workers, self._redis_up, self._at = stats, per_model, 1.0, time.monotonic()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            stats, workers, up = list(self._stats), dict(self._workers), self._redis_up
        families = {name: GaugeMetricFamily(name, _SPECS[name].help, labels=["model"]) for name in
                    ("ldm_queue_depth", "ldm_queue_claimed", "ldm_queue_oldest_job_age_seconds", "ldm_workers")}
        for s in stats:
            families["ldm_queue_depth"].add_metric([s.model], s.depth)
            families["ldm_queue_claimed"].add_metric([s.model], s.pending)
            families["ldm_queue_oldest_job_age_seconds"].add_metric([s.model], s.oldest_waiting_age_s)
        for model, count in workers.items():
            families["ldm_workers"].add_metric([model], count)
        yield from families.values()
        yield GaugeMetricFamily("ldm_redis_up", _SPECS["ldm_redis_up"].help, value=up)


async def _known_models(queue: JobQueue, workers: Sequence[Any]) -> set[str]:
    names = {queue.settings.default_model, *(m for w in workers for m in w.models)}
    pattern = f"{queue.keys.prefix}:jobs*"  # every priority's stream: jobs:<m>, jobs-high:<m>, jobs-low:<m>
    async for key in queue.redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
        model = queue.keys.stream_model(key.decode() if isinstance(key, bytes) else str(key))
        if model:
            names.add(model)
    return names


class ApiMetrics:
    """The API process's metrics, in their own registry (served by the REST app's /metrics).

    REST middleware: `observe_http(route_template, method, status, seconds)`; gRPC interceptor:
    `observe_grpc(method, code.name, seconds)`; the /metrics handler: `body, content_type = await
    metrics.render(queue)` (refreshes the queue gauges, at most once a second, then renders).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 worker_urls: Callable[[], Sequence[str]] | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.workers: SupervisedWorkersCollector | None = None
        if worker_urls is not None:  # ldm serve: the supervised workers' metrics too
            self.workers = SupervisedWorkersCollector(worker_urls)
            r.register(self.workers)
        self.http_requests = _counter("ldm_http_requests_total", r)
        self.http_request_duration = _histogram("ldm_http_request_duration_seconds", r, _SECONDS)
        self.grpc_requests = _counter("ldm_grpc_requests_total", r)
        self.grpc_request_duration = _histogram("ldm_grpc_request_duration_seconds", r, _SECONDS)
        self.auth_failures = _counter("ldm_auth_failures_total", r)
        self.quota_rejections = _counter("ldm_quota_rejections_total", r)
        self.calls_held = _gauge("ldm_calls_held", r)
        self.webhook_deliveries = _counter("ldm_webhook_deliveries_total", r)
        self.queue = register_queue_collector(r)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered HTTP request; `route` is the route template (`/v1/jobs/{job_id}`), never the raw path."""
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_request_duration.labels(route, method).observe(seconds)

    def observe_grpc(self, method: str, code: str, seconds: float) -> None:
        """One answered gRPC call; `method` its short name (Generate), `code` the status code name (OK)."""
        self.grpc_requests.labels(method, code).inc()
        self.grpc_request_duration.labels(method).observe(seconds)

    def count_auth_failure(self, front_end: Literal["rest", "grpc"], reason: str) -> None:
        """A call refused for its credentials (reason: missing, malformed, unknown, revoked)."""
        self.auth_failures.labels(front_end, reason).inc()

    def count_quota_rejection(self, front_end: Literal["rest", "grpc"], quota: str) -> None:
        """A call refused by a quota or a concurrency cap (`QuotaExceeded.quota`)."""
        self.quota_rejections.labels(front_end, quota).inc()

    async def render(self, queue: JobQueue | None = None) -> tuple[bytes, str]:
        """Refresh the queue statistics (when a queue is given) and render the registry."""
        if queue is not None:
            await self.queue.refresh(queue)
        if self.workers is not None:
            await self.workers.refresh()
        return exposition(self.registry)


class SupervisedWorkersCollector(Collector):
    """The metrics of the workers `ldm serve` supervises, re-exposed by the API: each worker's series with a
    `worker_index` label (its slot, 0 to workers - 1: low cardinality, stable across restarts). Like the queue
    collector, the /metrics handler awaits `refresh()` (it reads each worker's /metrics over loopback, 2 s timeout; a
    worker that does not answer, starting or restarting, is left out of that scrape) and `collect` serves the copy."""

    def __init__(self, urls: Callable[[], Sequence[str]]) -> None:
        self.urls = urls
        self._families: list[Metric] = []
        self._lock = threading.Lock()

    async def refresh(self) -> None:
        import httpx  # late: only the one-box API needs it here
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        async with httpx.AsyncClient(timeout=2.0) as client:
            for index, url in enumerate(self.urls()):
                try:
                    text = (await client.get(url)).text
                except httpx.HTTPError:
                    continue
                for family in text_string_to_metric_families(text):
                    into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                    into.samples += [s._replace(labels={**s.labels, "worker_index": str(index)})
                                     for s in family.samples]
        with self._lock:
            self._families = list(merged.values())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._families


def register_queue_collector(registry: CollectorRegistry, max_age_s: float = 1.0) -> QueueStatsCollector:
    """Register a `QueueStatsCollector` in `registry`; the caller `await`s its `refresh(queue)` before a scrape."""
    collector = QueueStatsCollector(max_age_s)
    registry.register(collector)
    return collector


# ------------------------------------------------------------------------------------------------ the worker

class BusyMeter:
    """Busy time of a worker: a counter of busy seconds and the busy fraction of the last `window_s`."""

    def __init__(self, counter: Counter, window_s: float = 60.0) -> None:
        self.counter = counter
        self.window_s = window_s
        self._born = time.monotonic()
        self._spans: deque[tuple[float, float]] = deque()
        self._since: float | None = None
        self._lock = threading.Lock()

    @contextmanager
    def busy(self) -> Iterator[None]:
        start = time.monotonic()
        with self._lock:
            self._since = start
        try:
            yield
        finally:
            end = time.monotonic()
            with self._lock:
                self._since = None
                self._spans.append((start, end))
            self.counter.inc(end - start)

    def ratio(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        horizon = max(self._born, now - self.window_s)
        with self._lock:
            while self._spans and self._spans[0][1] <= horizon:
                self._spans.popleft()
            spans = [*self._spans, *([(self._since, now)] if self._since is not None else [])]
        busy = sum(max(0.0, min(end, now) - max(start, horizon)) for start, end in spans)
        return busy / (now - horizon) if now > horizon else 0.0


class AcceleratorMemoryCollector(Collector):
    """torch.cuda memory of the worker's device(s); yields nothing on a machine without CUDA."""

    def collect(self) -> Iterator[Metric]:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return
        if not torch.cuda.is_available():
            return
        family = GaugeMetricFamily("ldm_accelerator_memory_bytes", _SPECS["ldm_accelerator_memory_bytes"].help,
                                   labels=["device", "kind"])
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], torch.cuda.memory_allocated(index))
            family.add_metric([device, "reserved"], torch.cuda.memory_reserved(index))
            family.add_metric([device, "peak_allocated"], torch.cuda.max_memory_allocated(index))
            family.add_metric([device, "total"], torch.cuda.get_device_properties(index).total_memory)
        yield family


class WorkerMetrics:
    """One worker process's metrics, in their own registry (served by `start_metrics_server`)."""

    def __init__(self, registry: CollectorRegistry | None = None, busy_window_s: float = 60.0) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.job_wait = _histogram("ldm_job_wait_seconds", r, _SECONDS)
        self.job_run = _histogram("ldm_job_run_seconds", r, _SECONDS)
        self.batch_size = _histogram("ldm_batch_size", r, _BATCH_SIZES)
        self.batch_duration = _histogram("ldm_batch_duration_seconds", r, _SECONDS)
        self.step_time = _histogram("ldm_sampler_step_seconds", r, _STEP_SECONDS)
        self.images = _counter("ldm_images_generated_total", r)
        self.jobs_completed = _counter("ldm_jobs_completed_total", r)
        self.job_failures = _counter("ldm_job_failures_total", r)
        self.jobs_reclaimed = _counter("ldm_jobs_reclaimed_total", r)
        self.jobs_lost = _counter("ldm_jobs_lost_total", r)
        self.oom_retries = _counter("ldm_oom_retries_total", r)
        self.joined_mid_run = _counter("ldm_samples_joined_mid_run_total", r)
        self.preview_time = _histogram("ldm_preview_seconds", r, _STEP_SECONDS)
        self.lora_cache_bytes = _gauge("ldm_lora_cache_bytes", r)
        self.lora_cache_adapters = _gauge("ldm_lora_cache_adapters", r)
        self.lora_loads = _counter("ldm_lora_loads_total", r)
        self.finish_time = _histogram("ldm_finish_seconds", r, _STEP_SECONDS)
        self.finish_blocked = _counter("ldm_finish_blocked_seconds_total", r)
        self.first_step = _histogram("ldm_time_to_first_step_seconds", r, _SECONDS)
        self.queue_position = _histogram("ldm_queue_position_at_claim", r, _POSITIONS)
        self.busy = BusyMeter(_counter("ldm_worker_busy_seconds_total", r), busy_window_s)
        self.busy_ratio = _gauge("ldm_worker_busy_ratio", r)
        self.busy_ratio.set_function(self.busy.ratio)
        self.heartbeats = _counter("ldm_worker_heartbeats_total", r)
        self.up = _gauge("ldm_worker_up", r)
        spec = _SPECS["ldm_worker_info"]
        self.info = Info(_base(spec), spec.help, registry=r)
        r.register(AcceleratorMemoryCollector())

    def describe_worker(self, worker: str, model: str, device: str, dtype: str) -> None:
        self.info.info({"worker": worker, "model": model, "device": device, "dtype": dtype})


def metrics_app(registry: CollectorRegistry) -> Any:
    """A WSGI app serving `registry` (to mount in another server)."""
    return make_wsgi_app(registry)


def start_metrics_server(registry: CollectorRegistry, port: int = 0,
                         host: str = "127.0.0.1") -> tuple[WSGIServer, str]:
    """Serve `registry` at http://host:port/metrics from a daemon thread (port 0 = a free port); the server
    (`.shutdown()` stops it) and its URL."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound_port = server.server_address[1]
    shown = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return server, f"http://{shown}:{bound_port}/metrics"
