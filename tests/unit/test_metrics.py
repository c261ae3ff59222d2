"""service/metrics.py: the table is the truth (names, types, labels), the conventions hold, busy time adds up."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter

from service.metrics import (
    API_METRICS,
    METRICS,
    WORKER_METRICS,
    ApiMetrics,
    BusyMeter,
    WorkerMetrics,
    exposition,
    metrics_table_markdown,
)

#: labels whose values are unbounded: never on a metric
FORBIDDEN_LABELS = {"job", "job_id", "id", "prompt", "seed", "path", "url", "user"}


def declared(registry: CollectorRegistry) -> set[str]:
    """The metric names (as scraped) a registry exposes."""
    suffix = {"counter": "_total", "info": "_info"}
    return {family.name + suffix.get(family.type, "") for family in registry.collect()}


def test_names_follow_the_conventions() -> None:
    names = [s.name for s in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert re.fullmatch(r"ldm_[a-z0-9_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        assert not FORBIDDEN_LABELS & set(spec.labels), spec.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)(_|$)", spec.name), "base units only"
        assert spec.help.endswith("."), spec.name


def test_every_metric_of_the_table_is_served_by_exactly_one_kind_of_process() -> None:
    api, worker = ApiMetrics(), WorkerMetrics()
    worker.describe_worker("w1", "tiny", "cpu", "float32")
    served_api, served_worker = declared(api.registry), declared(worker.registry)
    # families without samples (labelled, never observed; the CUDA collector on CPU) are not collected
    assert set(served_api) <= {s.name for s in API_METRICS}
    assert set(served_worker) <= {s.name for s in WORKER_METRICS}
    assert {"ldm_redis_up", "ldm_http_requests_total"} <= set(served_api)
    assert {"ldm_worker_up", "ldm_worker_info", "ldm_worker_busy_ratio", "ldm_batch_size"} <= set(served_worker)


def test_labels_and_types_match_the_table() -> None:
    api, worker = ApiMetrics(), WorkerMetrics()
    api.observe_http("/v1/jobs/{job_id}", "GET", 200, 0.01)
    api.observe_grpc("Generate", "OK", 0.5)
    api.count_auth_failure("rest", "unknown")
    api.count_quota_rejection("grpc", "rate")
    api.calls_held.labels("streams").set(1)
    api.webhook_deliveries.labels("delivered").inc()
    worker.job_wait.labels("tiny").observe(0.1)
    worker.job_run.labels("tiny", "txt2img").observe(1.0)
    worker.batch_size.labels("tiny", "txt2img").observe(2)
    worker.batch_duration.labels("tiny", "txt2img").observe(1.0)
    worker.step_time.labels("tiny").observe(0.05)
    worker.images.labels("tiny", "txt2img").inc(2)
    worker.jobs_completed.labels("tiny", "succeeded").inc()
    worker.job_failures.labels("tiny", "unsupported").inc()
    worker.jobs_reclaimed.labels("tiny").inc()
    worker.jobs_lost.labels("tiny").inc()
    worker.oom_retries.labels("tiny").inc()
    worker.joined_mid_run.labels("tiny").inc()
    worker.preview_time.labels("tiny").observe(0.01)
    worker.lora_cache_bytes.labels("tiny").set(1024)
    worker.lora_cache_adapters.labels("tiny").set(1)
    worker.lora_loads.labels("tiny").inc()
    worker.first_step.labels("tiny").observe(0.3)
    worker.finish_time.labels("tiny").observe(0.07)
    worker.finish_blocked.labels("tiny").inc(0.01)
    worker.queue_position.labels("tiny").observe(2)
    worker.describe_worker("w1", "tiny", "cpu", "float32")
    text = exposition(api.registry)[0].decode() + exposition(worker.registry)[0].decode()
    for spec in METRICS:
        if spec.name in {"ldm_accelerator_memory_bytes", "ldm_queue_depth", "ldm_queue_claimed",
                         "ldm_queue_oldest_job_age_seconds", "ldm_workers"}:
            continue  # collectors: CUDA only, and the queue's after a refresh (tests/integration/test_worker.py)
        shown = "gauge" if spec.type == "info" else spec.type  # the text format has no info type
        assert f"# TYPE {spec.name} {shown}" in text, spec.name
        sample = re.search(rf"^{spec.name}(_bucket|_count)?(\{{.*\}})? ", text, re.M)
        assert sample is not None, spec.name
        found = set(re.findall(r'(\w+)="', sample.group(2) or "")) - {"le"}
        assert found == set(spec.labels), spec.name


def test_markdown_table_lists_every_metric() -> None:
    table = metrics_table_markdown()
    assert all(f"`{s.name}`" in table for s in METRICS)
    assert len(table.splitlines()) == len(METRICS) + 2


def test_busy_meter_counts_busy_time_and_ratio_over_its_window() -> None:
    counter = Counter("busy_seconds", "test", registry=CollectorRegistry())
    meter = BusyMeter(counter, window_s=10.0)
    born = meter._born
    meter._spans.extend([(born + 1.0, born + 3.0), (born + 5.0, born + 6.0)])
    assert meter.ratio(now=born + 10.0) == pytest.approx(0.3)
    assert meter.ratio(now=born + 14.0) == pytest.approx(0.1)  # the first span slid out of the window
    assert meter.ratio(now=born + 30.0) == 0.0
    with meter.busy():
        assert meter.ratio() > 0.0
    assert counter._value.get() > 0.0
