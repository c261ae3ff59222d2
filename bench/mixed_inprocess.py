"""The mixed workload against the worker alone: the scheduler without the front end.

bench/mixed_workload.py measures the whole service (API, SSE followers, the client's parsing, all on the same cores
as the worker); this runs a worker in this process (`Worker` or `ContinuousWorker`, with the batching settings
given) on an embedded Redis, and a thread submits the same Poisson schedule straight to the queue. Latency is the
job record's submission to its end (the queue's clock); the worker's time inside `StepBatch.step` is reported for
continuous modes (the rest of its loop: claims, progress, encode, decode, PNGs).

    python bench/mixed_inprocess.py [--rate 0.25] [--jobs 30] [--step-cost-budget 3] [--admission-order shortest]

Prints one JSON line per mode: static, continuous, and continuous with the policy when one is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.mixed_workload import MAX_BATCH, STEP_CHOICES, schedule
from service.config import Settings
from service.embedded import EmbeddedRedis
from service.metrics import WorkerMetrics
from service.queue import SyncJobQueue
from service.schemas import GenerationRequest
from service.worker.continuous import ContinuousWorker
from service.worker.process import Worker
from service.worker.runner import Runner


def one_mode(runner: Runner, settings: dict[str, Any], rate: float, jobs: int, data: Path) -> dict[str, Any]:
    """Run the schedule through a worker with `settings`; latency percentiles and medians by step count."""
    with EmbeddedRedis(data) as redis:
        config = Settings(redis_url=redis.url, max_batch=MAX_BATCH, **settings)
        with SyncJobQueue(config) as queue, SyncJobQueue(config) as client:
            worker_class = ContinuousWorker if config.batching == "continuous" else Worker
            worker = worker_class(config, queue, runner, WorkerMetrics(), "bench")
            submitted: list[tuple[str, int]] = []
            plan = schedule(rate, jobs)

            def submit() -> None:
                start = time.time()
                for i, (at, steps) in enumerate(plan):
                    time.sleep(max(0.0, start + at - time.time()))
                    request = GenerationRequest(model=runner.name, prompt=f"a red circle {100 + i}", steps=steps,
                                                seed=100 + i)
                    submitted.append((client.submit(request).id, steps))

            in_step = [0.0]
            if isinstance(worker, ContinuousWorker):
                step = worker.batch.step

                def timed(max_rows: int | None = None) -> Any:
                    began = time.perf_counter()
                    try:
                        return step(max_rows)
                    finally:
                        in_step[0] += time.perf_counter() - began

                worker.batch.step = timed  # type: ignore[method-assign]
            submitter = threading.Thread(target=submit)
            submitter.start()
            while submitter.is_alive() or worker.in_hand() or any(
                    not j.status.terminal for j in (client.get(i) for i, _ in submitted) if j is not None):
                worker.step()
            records = [(client.get(i), steps) for i, steps in submitted]
    latency = [((r.finished_at - r.created_at).total_seconds(), steps) for r, steps in records
               if r is not None and r.finished_at is not None]
    values = [v for v, _ in latency]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"settings": settings, "jobs": len(values), "p50_s": round(cuts[49], 2), "p95_s": round(cuts[94], 2),
            "p99_s": round(cuts[98], 2), "mean_s": round(statistics.mean(values), 2),
            "median_latency_by_steps_s": {str(s): round(statistics.median([v for v, n in latency if n == s]), 2)
                                          for s in STEP_CHOICES if any(n == s for _, n in latency)},
            "seconds_in_step_batch": round(in_step[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--rate", type=float, default=0.25, help="offered load, jobs per second")
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker (default 1)")
    parser.add_argument("--step-cost-budget", type=float, default=None)
    parser.add_argument("--admission-order", choices=["fifo", "shortest"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = Runner.load(args.model, device="cpu")
    modes: list[dict[str, Any]] = [{"batching": "static"}, {"batching": "continuous"}]
    if args.step_cost_budget is not None or args.admission_order is not None:
        modes.append({"batching": "continuous", "step_cost_budget": args.step_cost_budget or 0.0,
                      "admission_order": args.admission_order or "fifo"})
    with tempfile.TemporaryDirectory() as tmp:
        for i, settings in enumerate(modes):
            print(json.dumps(one_mode(runner, settings, args.rate, args.jobs, Path(tmp) / str(i))), flush=True)


if __name__ == "__main__":
    main()
