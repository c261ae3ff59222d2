"""One scrape target per box: the API of `ldm serve` re-exposes its supervised workers' metrics, each series with a
`worker_index` label, as one valid exposition (real worker metric servers on loopback)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from service.embedded import free_port
from service.metrics import ApiMetrics, WorkerMetrics, start_metrics_server


def test_the_api_metrics_carry_every_supervised_worker_labelled_by_its_slot() -> None:
    workers, servers = [WorkerMetrics(), WorkerMetrics()], []
    for i, w in enumerate(workers):
        w.batch_size.labels("tiny", "txt2img").observe(4 + i)
        w.step_time.labels("tiny").observe(0.02)
        w.first_step.labels("tiny").observe(0.5)
        w.queue_position.labels("tiny").observe(i)
        servers.append(start_metrics_server(w.registry))
    urls = [url for _, url in servers] + [f"http://127.0.0.1:{free_port()}/metrics"]  # a slot restarting: skipped
    try:
        api = ApiMetrics(worker_urls=lambda: urls)
        body, _ = asyncio.run(api.render())
    finally:
        for server, _ in servers:
            server.shutdown()
            server.server_close()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}  # parses: one TYPE per family
    for name in ("ldm_batch_size", "ldm_sampler_step_seconds", "ldm_time_to_first_step_seconds",
                 "ldm_queue_position_at_claim", "ldm_http_requests"):
        assert name in families, name
    sums = {s.labels["worker_index"]: s.value for s in families["ldm_batch_size"].samples
            if s.name == "ldm_batch_size_sum"}
    assert sums == {"0": 4.0, "1": 5.0}
    assert {s.labels.get("worker_index") for s in families["ldm_worker_up"].samples} == {"0", "1"}


def test_without_supervised_workers_the_api_serves_only_its_own() -> None:
    body, _ = asyncio.run(ApiMetrics().render())
    assert b"ldm_batch_size" not in body and b"ldm_http_requests_total" in body
