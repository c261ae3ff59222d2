"""The mixed workload of `service_bench.py --workload mixed`: static vs continuous batching at one offered load.

For each mode (LDM_BATCHING=static, then continuous; LDM_MAX_BATCH=8 both; then, when a policy is given,
continuous with that LDM_STEP_COST_BUDGET and LDM_ADMISSION_ORDER) it starts the real stack (embedded Redis,
`ldm api`, one `ldm worker`), then:
1. solo: a 10-step job alone, three times (the median is the solo latency);
2. mixed: `jobs` jobs with Poisson arrivals at `rate` jobs/s, steps drawn from {10, 20, 50} (the same seeded
   schedule in both modes), each submitted by POST /v1/jobs and followed over its SSE events: latency (submission to
   the terminal event), time to first step (submission to the first `progress` event) and throughput (jobs done per
   second from the first submission to the last end);
3. short behind long: half a batch (4) of `long_steps`-step jobs, and once they run, a 10-step job: its latency
   against its solo latency.
Event times are the server's (`at`, Unix time) against the client's clock on the same machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.service_stack import api_and_worker
from service.embedded import EmbeddedRedis, free_port

STEP_CHOICES = (10, 20, 50)
MAX_BATCH = 8
LONG_JOBS = MAX_BATCH // 2  # half a batch: in continuous mode the short job has a free slot to join


#: what every continuous mode runs with unless its policy says otherwise (not inherited from the caller's shell)
NO_POLICY = {"LDM_STEP_COST_BUDGET": "0", "LDM_ADMISSION_ORDER": "fifo"}


def modes(budget: float | None, order: str | None) -> dict[str, dict[str, str]]:
    """Mode label -> the worker's batching settings: static, continuous, and continuous with the policy (if any)."""
    found = {"static": {"LDM_BATCHING": "static", **NO_POLICY},
             "continuous": {"LDM_BATCHING": "continuous", **NO_POLICY}}
    if budget is not None or order is not None:
        policy = {"LDM_STEP_COST_BUDGET": str(budget or 0), "LDM_ADMISSION_ORDER": order or "fifo"}
        found[f"continuous, budget {budget or 0:g}, {order or 'fifo'}"] = {"LDM_BATCHING": "continuous", **policy}
    return found


@contextmanager
def stack(model: str, settings: dict[str, str], data: Path) -> Iterator[str]:
    """Redis + API + one worker with the batching `settings`; yields the API's base URL."""
    with EmbeddedRedis(Path(tempfile.mkdtemp(dir=data))) as redis:
        rest = free_port()
        env = {**os.environ, "LDM_REDIS_URL": redis.url, "LDM_REST_PORT": str(rest), "LDM_GRPC_PORT": "0",
               "LDM_DEFAULT_MODEL": model, "LDM_MAX_BATCH": str(MAX_BATCH), **settings,
               "LDM_WORKER_METRICS_PORT": str(free_port()), "LDM_QUEUE_MAX_DEPTH": "1000"}
        with api_and_worker(env, model, f"http://127.0.0.1:{rest}"):
            yield f"http://127.0.0.1:{rest}"


async def submit(http: httpx.AsyncClient, base: str, steps: int, seed: int) -> tuple[str, float]:
    """(job id, client time of submission)."""
    at = time.time()
    r = await http.post(f"{base}/v1/jobs", json={"prompt": f"a red circle {seed}", "seed": seed, "steps": steps})
    r.raise_for_status()
    return str(r.json()["id"]), at


async def outcome(http: httpx.AsyncClient, base: str, job_id: str, submitted: float) -> dict[str, Any]:
    """Follow the job's SSE events to its end: {ok, latency_s, first_step_s}."""
    first = end = None
    ok = False
    async with http.stream("GET", f"{base}/v1/jobs/{job_id}/events") as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("type") == "progress" and first is None:
                first = event["at"] - submitted
            if event.get("type") in ("succeeded", "failed", "cancelled"):
                ok, end = event["type"] == "succeeded", event["at"] - submitted
                break
    return {"ok": ok, "latency_s": end, "first_step_s": first}


async def one_job(http: httpx.AsyncClient, base: str, steps: int, seed: int, delay_s: float = 0.0) -> dict[str, Any]:
    await asyncio.sleep(delay_s)
    job_id, at = await submit(http, base, steps, seed)
    return {"steps": steps, "submitted": at, **await outcome(http, base, job_id, at)}


def schedule(rate: float, jobs: int, seed: int = 17) -> list[tuple[float, int]]:
    """(arrival offset s, steps) of each job: Poisson arrivals, steps uniform over STEP_CHOICES."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(jobs):
        t += rng.expovariate(rate)
        out.append((t, rng.choice(STEP_CHOICES)))
    return out


def _pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return round(values[0], 3) if values else float("nan")
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 3)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if r["ok"]]
    lat = [r["latency_s"] for r in done]
    first = [r["first_step_s"] for r in done if r["first_step_s"] is not None]
    span = max(r["submitted"] + r["latency_s"] for r in done) - min(r["submitted"] for r in rows) if done else 0.0
    by_steps = {str(s): round(statistics.median([r["latency_s"] for r in done if r["steps"] == s]), 3)
                for s in STEP_CHOICES if any(r["steps"] == s for r in done)}
    return {"jobs": len(rows), "ok": len(done), "throughput_jobs_s": round(len(done) / span, 3) if span else 0.0,
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "p99_s": _pct(lat, 99),
            "first_step_p50_s": _pct(first, 50), "first_step_p95_s": _pct(first, 95),
            "first_step_p99_s": _pct(first, 99), "median_latency_by_steps_s": by_steps}


async def short_behind_long(http: httpx.AsyncClient, base: str, long_steps: int) -> dict[str, Any]:
    """LONG_JOBS long jobs, then (once one has taken 3 steps) a 10-step job: its latency."""
    longs = [await submit(http, base, long_steps, 1000 + i) for i in range(LONG_JOBS)]
    while True:
        views = [(await http.get(f"{base}/v1/jobs/{j}")).json() for j, _ in longs]
        if any(v["step"] >= 3 for v in views):
            break
        await asyncio.sleep(0.05)
    short = await one_job(http, base, 10, 2000)
    rest = await asyncio.gather(*(outcome(http, base, j, at) for j, at in longs))
    return {"short_latency_s": round(short["latency_s"], 3), "short_first_step_s": round(short["first_step_s"], 3),
            "long_latency_max_s": round(max(r["latency_s"] for r in rest), 3)}


async def measure(base: str, rate: float, jobs: int, long_steps: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=900) as http:
        await one_job(http, base, 10, 0)  # warm-up
        solo = [(await one_job(http, base, 10, 1 + i))["latency_s"] for i in range(3)]
        plan = schedule(rate, jobs)
        rows = await asyncio.gather(*(one_job(http, base, steps, 100 + i, at) for i, (at, steps) in enumerate(plan)))
        behind = await short_behind_long(http, base, long_steps)
    solo_s = statistics.median(solo)
    behind["short_solo_s"] = round(solo_s, 3)
    behind["short_x_solo"] = round(behind["short_latency_s"] / solo_s, 2)
    return {"mixed": summary(list(rows)), "short_behind_long": behind}


def run(model: str, rate: float, jobs: int, long_steps: int, budget: float | None = None,
        order: str | None = None) -> dict[str, Any]:
    load = os.getloadavg()[0]
    results: dict[str, Any] = {}
    settings = modes(budget, order)
    with tempfile.TemporaryDirectory() as tmp:
        for mode, batching in settings.items():
            with stack(model, batching, Path(tmp)) as base:
                results[mode] = asyncio.run(measure(base, rate, jobs, long_steps))
    s = results["static"]["mixed"]
    ratios = {mode: {"p99_ratio": round(r["mixed"]["p99_s"] / s["p99_s"], 3),
                     "throughput_ratio": round(r["mixed"]["throughput_jobs_s"] / s["throughput_jobs_s"], 3)}
              for mode, r in results.items() if mode != "static"}
    return {"setup": {"model": model, "rate_jobs_s": rate, "jobs": jobs, "steps": list(STEP_CHOICES),
                      "max_batch": MAX_BATCH, "long_jobs": LONG_JOBS, "long_steps": long_steps,
                      "cpu_cores": os.cpu_count(), "load_average_at_start": round(load, 1),
                      "load_average_at_end": round(os.getloadavg()[0], 1),
                      "worker_torch_threads": os.environ.get("LDM_WORKER_TORCH_THREADS", "default"),
                      "modes": settings},
            "results": results,
            "continuous_vs_static": ratios["continuous"],
            "vs_static": ratios}


def report(data: dict[str, Any]) -> str:
    su = data["setup"]
    lines = [f"Mixed workload: {su['jobs']} jobs, Poisson arrivals at {su['rate_jobs_s']} jobs/s, steps from "
             f"{su['steps']}, max batch {su['max_batch']}, {su['model']}, {su['cpu_cores']} CPU cores.", "",
             "| batching | throughput (jobs/s) | p50 (s) | p95 (s) | p99 (s) | first step p50 (s) | first step p95 (s) "
             "| first step p99 (s) | 10-step job behind long batch (s) | x solo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in data["results"].items():
        m, b = r["mixed"], r["short_behind_long"]
        lines.append(f"| {mode} | {m['throughput_jobs_s']:.2f} | {m['p50_s']:.2f} | {m['p95_s']:.2f} | "
                     f"{m['p99_s']:.2f} | {m['first_step_p50_s']:.2f} | {m['first_step_p95_s']:.2f} | "
                     f"{m['first_step_p99_s']:.2f} | {b['short_latency_s']:.2f} | {b['short_x_solo']:.1f} |")
    lines.append("")
    for mode, v in data.get("vs_static", {"continuous": data["continuous_vs_static"]}).items():
        lines.append(f"{mode[0].upper()}{mode[1:]} vs static: p99 latency x{v['p99_ratio']:.2f}, "
                     f"throughput x{v['throughput_ratio']:.2f}.")
    solo = ", ".join(f"{r['short_behind_long']['short_solo_s']:.2f} s ({mode})" for mode, r in data["results"].items())
    lines.append(f"The long batch: {su['long_jobs']} jobs of {su['long_steps']} steps; solo 10-step job: {solo}.")
    lines += ["", "Median latency by step count (s):", "",
              "| batching | " + " | ".join(f"{s} steps" for s in su["steps"]) + " |",
              "|---|" + "---|" * len(su["steps"])]
    for mode, r in data["results"].items():
        by = r["mixed"]["median_latency_by_steps_s"]
        lines.append(f"| {mode} | " + " | ".join(f"{by.get(str(s), float('nan')):.1f}" for s in su["steps"]) + " |")
    return "\n".join(lines)
