"""Service benchmark: throughput and latency of the whole service on loopback, batching on and off.

For each batching mode (a worker's max_batch = 8, or 1) it starts the real stack (embedded Redis, `ldm api`,
one `ldm worker`) on free loopback ports, then for each concurrency (1, 4, 16) keeps that many clients
sending `POST /v1/txt2img` for a bounded number of requests, and records every latency. The service's own
overhead at concurrency 1 is the mean end-to-end latency minus the mean model time of a job as the worker
measures it (`ldm_job_run_seconds` from the worker's /metrics). A table goes to stdout, figures to
bench/results/service_bench.json. Not a test: nothing fails.

    python bench/service_bench.py [--model tiny-shapes] [--steps 20] [--requests 48]

`--workload mixed` (bench/mixed_workload.py) compares static and continuous batching (LDM_BATCHING) at one
offered load instead: Poisson arrivals, steps drawn from {10, 20, 50}, then a 10-step job submitted while a batch
of 250-step jobs runs; figures to bench/results/service_bench_mixed.json. `--step-cost-budget` and
`--admission-order` add a third mode: continuous batching with that admission policy (docs/continuous-batching.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.plots import plot_service  # noqa: E402
from bench.results_io import publish  # noqa: E402
from bench.service_stack import api_and_worker  # noqa: E402
from service.embedded import EmbeddedRedis, free_port  # noqa: E402


@contextmanager
def stack(model: str, max_batch: int, data: Path) -> Iterator[tuple[str, str]]:
    """Redis + API + one worker; yields (API base URL, worker metrics URL)."""
    with EmbeddedRedis(data / f"redis-{max_batch}") as redis:
        rest, metrics = free_port(), free_port()
        env = {**os.environ, "LDM_REDIS_URL": redis.url, "LDM_REST_PORT": str(rest), "LDM_GRPC_PORT": "0",
               "LDM_DEFAULT_MODEL": model, "LDM_MAX_BATCH": str(max_batch), "LDM_WORKER_METRICS_PORT": str(metrics),
               "LDM_QUEUE_MAX_DEPTH": "1000"}
        with api_and_worker(env, model, f"http://127.0.0.1:{rest}"):
            yield f"http://127.0.0.1:{rest}", f"http://127.0.0.1:{metrics}/metrics"


def job_run_seconds(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the worker's ldm_job_run_seconds histogram."""
    total = count = 0.0
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith("ldm_job_run_seconds_sum"):
            total += float(line.split()[-1])
        elif line.startswith("ldm_job_run_seconds_count"):
            count += float(line.split()[-1])
    return total, count


async def load(base: str, concurrency: int, requests: int, steps: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            r = await http.post(f"{base}/v1/txt2img", json={"prompt": f"a red circle {i}", "seed": i, "steps": steps})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": requests, "ok": len(latencies), "errors": errors, "wall_s": round(wall, 3),
            "throughput_rps": round(len(latencies) / wall, 3), "p50_s": round(q[49], 3),
            "p95_s": round(q[94], 3), "p99_s": round(q[98], 3), "mean_s": round(statistics.mean(latencies), 4)}


def run(model: str, steps: int, requests: int, concurrencies: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, max_batch in (("batching", 8), ("no_batching", 1)):
            results[mode] = {}
            with stack(model, max_batch, Path(tmp)) as (base, metrics_url):
                asyncio.run(load(base, 1, 4, steps))  # warm-up
                for c in concurrencies:
                    before = job_run_seconds(metrics_url)
                    row = asyncio.run(load(base, c, max(requests, 2 * c), steps))
                    after = job_run_seconds(metrics_url)
                    jobs = after[1] - before[1]
                    row["model_time_mean_s"] = round((after[0] - before[0]) / jobs, 4) if jobs else None
                    results[mode][str(c)] = row
    c1 = results["no_batching"]["1"]
    overhead = c1["mean_s"] - c1["model_time_mean_s"]
    top = str(max(concurrencies))
    return {"setup": {"model": model, "steps": steps, "size": "model default", "requests_per_level": requests,
                      "cpu_cores": os.cpu_count()},
            "results": results,
            "overhead_c1": {"end_to_end_mean_s": c1["mean_s"], "model_time_mean_s": c1["model_time_mean_s"],
                            "overhead_s": round(overhead, 4),
                            "overhead_pct_of_model_time": round(100 * overhead / c1["model_time_mean_s"], 2)},
            "batching_gain_at_max_concurrency": round(results["batching"][top]["throughput_rps"]
                                                      / results["no_batching"][top]["throughput_rps"], 2)}


def report(data: dict[str, Any]) -> str:
    lines = ["| batching | concurrency | throughput (img/s) | p50 (s) | p95 (s) | p99 (s) | errors |",
             "|---|---|---|---|---|---|---|"]
    for mode, rows in data["results"].items():
        for c, r in rows.items():
            lines.append(f"| {'on (max 8)' if mode == 'batching' else 'off'} | {c} | {r['throughput_rps']:.2f} | "
                         f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} | {r['errors']} |")
    o = data["overhead_c1"]
    lines.append(f"\nOverhead at concurrency 1: {o['end_to_end_mean_s']:.3f} s end to end vs "
                 f"{o['model_time_mean_s']:.3f} s model time = {o['overhead_s'] * 1000:.0f} ms "
                 f"({o['overhead_pct_of_model_time']:.1f} % of model time). Batching gain at the highest "
                 f"concurrency: {data['batching_gain_at_max_concurrency']:.2f}x.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes",
                        help="model spec the worker loads (default: the shipped tiny-shapes)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per request (default 20)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default 48)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/service_bench.json "
                        "(closed), bench/results/service_bench_mixed.json (mixed)")
    parser.add_argument("--plot", action="store_true",
                        help="only draw the plot (docs/service_bench*.png, bench/plots.py) from --out; no run")
    parser.add_argument("--workload", choices=["closed", "mixed"], default="closed",
                        help="closed: clients at fixed concurrencies, batching on and off (default); mixed: Poisson "
                        "arrivals of 10/20/50-step jobs, static vs continuous batching")
    parser.add_argument("--rate", type=float, default=1.0, help="mixed: offered load, jobs per second (default 1)")
    parser.add_argument("--jobs", type=int, default=60, help="mixed: jobs per mode (default 60)")
    parser.add_argument("--long-steps", type=int, default=250, help="mixed: steps of the long batch (default 250)")
    parser.add_argument("--step-cost-budget", type=float, default=None,
                        help="mixed: also run continuous batching with this LDM_STEP_COST_BUDGET")
    parser.add_argument("--admission-order", choices=["fifo", "shortest"], default=None,
                        help="mixed: also run continuous batching with this LDM_ADMISSION_ORDER")
    args = parser.parse_args()
    if args.workload == "mixed":
        from bench.mixed_workload import report as mixed_report
        from bench.mixed_workload import run as mixed_run

        mixed = mixed_run(args.model, args.rate, args.jobs, args.long_steps, args.step_cost_budget,
                          args.admission_order)
        publish(mixed, mixed_report(mixed), args.out or ROOT / "bench" / "results" / "service_bench_mixed.json")
        return
    out = args.out or ROOT / "bench" / "results" / "service_bench.json"
    if args.plot:
        print(plot_service(out))
        return
    data = run(args.model, args.steps, args.requests, args.concurrency)
    publish(data, report(data), out)
    print(plot_service(out))


if __name__ == "__main__":
    main()
