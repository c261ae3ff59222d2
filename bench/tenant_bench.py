"""Tenant benchmark: one API key floods the service with large requests (8 images of 1024x1024) while a second key
makes small synchronous ones; how many of the flood get in, and what the second key's latency becomes, with the
per-key work budget off and on.

For each mode it starts the real stack (embedded Redis, `ldm api` with two keys, one `ldm worker`) on free loopback
ports. Phase 1: the second key alone sends `--small` sequential `POST /v1/txt2img` (its baseline latency). Phase 2:
the first key submits a large job (`POST /v1/jobs`) every `--interval` seconds, `--flood` of them, while the second key
sends its `--small` requests again. Counts of the flood's accepted and refused (429) submissions, the second key's
latencies (median, worst) and refusals go to a table on stdout and to bench/results/tenant_bench.json. The budget
(`--work-per-s`, `--work-burst`) is in work units (images x width x height x steps / 1024²). Not a test: nothing
fails.

    python bench/tenant_bench.py [--large-steps 2] [--flood 24] [--small 8]
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

from bench.results_io import publish  # noqa: E402
from bench.service_stack import api_and_worker  # noqa: E402
from service.auth import hash_key, new_key  # noqa: E402
from service.embedded import EmbeddedRedis, free_port  # noqa: E402

MODEL = "tiny-shapes"


@contextmanager
def stack(data: Path, keys: list[str], work_per_s: float, work_burst: float) -> Iterator[str]:
    """Redis + API (with `keys`, the budget, no other per-key limit in the way) + one worker; yields the API's URL."""
    with EmbeddedRedis(data) as redis:
        rest = free_port()
        env = {**os.environ, "LDM_REDIS_URL": redis.url, "LDM_REST_PORT": str(rest), "LDM_GRPC_PORT": "0",
               "LDM_DEFAULT_MODEL": MODEL, "LDM_API_KEY_HASHES": ",".join(hash_key(k) for k in keys),
               "LDM_KEY_WORK_PER_S": str(work_per_s), "LDM_KEY_WORK_BURST": str(work_burst),
               "LDM_KEY_RATE_LIMIT_PER_S": "0", "LDM_KEY_MAX_JOBS_IN_FLIGHT": "0", "LDM_QUEUE_MAX_DEPTH": "1000",
               "LDM_JOB_DEADLINE_S": "3600"}
        with api_and_worker(env, MODEL, f"http://127.0.0.1:{rest}"):
            yield f"http://127.0.0.1:{rest}"


async def small_calls(client: httpx.AsyncClient, key: str, count: int, body: dict[str, Any]) -> dict[str, Any]:
    """`count` sequential synchronous calls; their latencies (s) and how many were refused."""
    latencies, refused = [], 0
    for _ in range(count):
        start = time.perf_counter()
        resp = await client.post("/v1/txt2img", json=body, headers={"Authorization": f"Bearer {key}"})
        if resp.status_code == 429:
            refused += 1
            continue
        resp.raise_for_status()
        latencies.append(time.perf_counter() - start)
    return {"latencies_s": latencies, "refused": refused}


async def flood(client: httpx.AsyncClient, key: str, count: int, interval_s: float,
                body: dict[str, Any]) -> dict[str, int]:
    """`count` large submissions, one every `interval_s`; accepted and refused counts."""
    accepted = refused = 0
    for _ in range(count):
        resp = await client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
        if resp.status_code == 202:
            accepted += 1
        elif resp.status_code == 429:
            refused += 1
        else:
            resp.raise_for_status()
        await asyncio.sleep(interval_s)
    return {"accepted": accepted, "refused": refused}


def summary(latencies: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(latencies), "max_s": max(latencies)} if latencies else {}


async def run_mode(base: str, flooder: str, other: str, args: argparse.Namespace) -> dict[str, Any]:
    large = {"prompt": "a red circle", "n": 8, "width": args.large_size, "height": args.large_size,
             "steps": args.large_steps, "seed": 1}
    small = {"prompt": "a blue square", "width": 64, "height": 64, "steps": args.small_steps, "seed": 2}
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        await small_calls(client, other, 1, small)  # warm-up (first batch of a size)
        alone = await small_calls(client, other, args.small, small)
        flooding = asyncio.create_task(flood(client, flooder, args.flood, args.interval, large))
        during = await small_calls(client, other, args.small, small)
        flooded = await flooding
    return {"flood": flooded, "other_alone": summary(alone["latencies_s"]),
            "other_during_flood": {**summary(during["latencies_s"]), "refused": during["refused"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-size", type=int, default=1024)
    parser.add_argument("--large-steps", type=int, default=2)
    parser.add_argument("--small-steps", type=int, default=4)
    parser.add_argument("--flood", type=int, default=24, help="large submissions of the first key")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two of them")
    parser.add_argument("--small", type=int, default=8, help="small calls of the second key, per phase")
    parser.add_argument("--work-per-s", type=float, default=1.0, help="budget: work units per second, per key")
    parser.add_argument("--work-burst", type=float, default=32.0, help="budget: work units at once, per key")
    args = parser.parse_args()
    flooder, other = new_key(), new_key()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, per_s in (("budget off", 0.0), ("budget on", args.work_per_s)):
            with stack(Path(tmp) / mode.replace(" ", "-"), [flooder, other], per_s, args.work_burst) as base:
                results[mode] = asyncio.run(run_mode(base, flooder, other, args))
    cost = 8 * args.large_size**2 * args.large_steps / 2**20
    lines = [f"large request: 8 x {args.large_size}² x {args.large_steps} steps = {cost:g} work units; budget "
             f"{args.work_per_s:g}/s, burst {args.work_burst:g}; {args.flood} large submissions, one every "
             f"{args.interval:g} s; {args.small} small calls (64², {args.small_steps} steps) per phase", "",
             "| mode | flood accepted | flood refused (429) | 2nd key alone: median / max | 2nd key during flood: "
             "median / max | 2nd key refused |", "|---|---|---|---|---|---|"]
    for mode in ("budget off", "budget on"):
        r = results[mode]
        alone, during = r["other_alone"], r["other_during_flood"]
        lines.append(f"| {mode} | {r['flood']['accepted']} | {r['flood']['refused']} | {alone['median_s']:.2f} s / "
                     f"{alone['max_s']:.2f} s | {during['median_s']:.2f} s / {during['max_s']:.2f} s | "
                     f"{during['refused']} |")
    publish(results, "\n".join(lines), ROOT / "bench" / "results" / "tenant_bench.json")


if __name__ == "__main__":
    main()
