"""A discrete-event model of one worker under the mixed workload: what an admission policy can do for the tail.

The real benchmark (bench/mixed_workload.py) runs on a shared machine whose load moves under it; this model runs the
same Poisson schedule (`schedule`, many seeds) through the two schedulers with a step cost of a + b k seconds for k
samples and nothing else (no Redis, no decode, no overheads), so that policies can be compared without noise:

- static: claim up to `max_batch` of the jobs that have arrived, group them by step count in order of arrival,
  run each group to its end (service/worker/process.py);
- continuous: at each step, waiting jobs join in the admission order (fifo, or shortest work first) while the step
  carries fewer than `cap` samples, then one step of every running sample (service/worker/continuous.py; a step
  cost budget is a cap: service/worker/admission.py).

    python bench/mixed_model.py [--rate 0.3 0.4] [--jobs 40] [--seeds 30] [--a 0.09 --b 0.063]

Prints mean p50 and p99 latency and throughput over the seeds, and p99 against static's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mixed_workload import MAX_BATCH, schedule  # noqa: E402

Cost = Callable[[int], float]


def static(jobs: Sequence[tuple[float, int]], cost: Cost, max_batch: int = MAX_BATCH) -> list[float]:
    """Latency of each job (arrival s, steps) under static batching."""
    t, arrived, queue, done = 0.0, 0, [], [0.0] * len(jobs)
    while arrived < len(jobs) or queue:
        while arrived < len(jobs) and jobs[arrived][0] <= t:
            queue.append(arrived)
            arrived += 1
        if not queue:
            t = jobs[arrived][0]
            continue
        claimed, queue = queue[:max_batch], queue[max_batch:]
        groups: dict[int, list[int]] = {}
        for j in claimed:
            groups.setdefault(jobs[j][1], []).append(j)
        for steps, group in groups.items():
            t += steps * cost(len(group))
            for j in group:
                done[j] = t
    return [done[j] - jobs[j][0] for j in range(len(jobs))]


def continuous(jobs: Sequence[tuple[float, int]], cost: Cost, cap: int = MAX_BATCH,
               order: str = "fifo") -> list[float]:
    """Latency of each job under continuous batching with at most `cap` samples a step, admitted in `order`."""
    t, arrived, waiting, left, done = 0.0, 0, [], {}, [0.0] * len(jobs)
    while arrived < len(jobs) or waiting or left:
        while arrived < len(jobs) and jobs[arrived][0] <= t:
            waiting.append(arrived)
            arrived += 1
        if not waiting and not left:
            t = jobs[arrived][0]
            continue
        if order == "shortest":
            waiting.sort(key=lambda j: jobs[j][1])
        while waiting and len(left) < cap:
            j = waiting.pop(0)
            left[j] = jobs[j][1]
        t += cost(len(left))
        for j in list(left):
            left[j] -= 1
            if not left[j]:
                del left[j]
                done[j] = t
    return [done[j] - jobs[j][0] for j in range(len(jobs))]


def _pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def compare(rate: float, n_jobs: int, seeds: int, cost: Cost) -> list[tuple[str, float, float, float]]:
    """(policy, mean p50 s, mean p99 s, mean throughput jobs/s) over `seeds` schedules."""
    policies: dict[str, Callable[[Sequence[tuple[float, int]]], list[float]]] = {"static": lambda j: static(j, cost)}
    for cap in (MAX_BATCH, 6, 5, 4, 2):
        for order in ("fifo", "shortest"):
            policies[f"continuous cap {cap} {order}"] = lambda j, c=cap, o=order: continuous(j, cost, c, o)
    rows = []
    for name, policy in policies.items():
        p50, p99, throughput = [], [], []
        for seed in range(1, seeds + 1):
            jobs = schedule(rate, n_jobs, seed)
            latency = policy(jobs)
            p50.append(_pct(latency, 50))
            p99.append(_pct(latency, 99))
            throughput.append(n_jobs / (max(a + lat for (a, _), lat in zip(jobs, latency, strict=True)) - jobs[0][0]))
        rows.append((name, statistics.mean(p50), statistics.mean(p99), statistics.mean(throughput)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, nargs="+", default=[0.3, 0.4], help="offered loads, jobs/s")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--a", type=float, default=0.09, help="fixed cost of a step, s (tiny-shapes, 1 thread)")
    parser.add_argument("--b", type=float, default=0.063, help="cost of a step per sample, s")
    args = parser.parse_args()
    for rate in args.rate:
        rows = compare(rate, args.jobs, args.seeds, lambda k: args.a + args.b * k)
        base = rows[0][2]
        print(f"\n{args.jobs} jobs at {rate} jobs/s, step cost {args.a} + {args.b} k s, {args.seeds} seeds\n")
        print("| policy | p50 (s) | p99 (s) | p99 vs static | throughput (jobs/s) |\n|---|---|---|---|---|")
        for name, p50, p99, throughput in rows:
            print(f"| {name} | {p50:.1f} | {p99:.1f} | {p99 / base:.2f} | {throughput:.3f} |")


if __name__ == "__main__":
    main()
