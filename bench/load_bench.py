"""Load benchmark: the service's capacity at saturation, then twice that offered for a minute, on loopback.

It starts the real stack on free loopback ports: the embedded Redis (`appendfsync always`), `ldm api` (REST + gRPC)
and one `ldm worker`, with the queue depth bounded (`--queue-depth`, LDM_QUEUE_MAX_DEPTH) so that a job the API
accepts starts well inside the client's deadline. Then:

1. capacity: `--concurrency` closed-loop clients keep `POST /v1/txt2img` busy for `--capacity-s` seconds (after a
   warm-up); capacity = images answered per second (each request is one image);
2. overload: requests arrive open-loop (evenly spaced, whatever the answers) at `--factor` x capacity for
   `--duration-s` seconds, each `POST /v1/txt2img?timeout=<deadline>` with the client waiting at most the deadline
   plus 2 s. Every answer is counted by status (200 image, 429 shed with Retry-After, anything else), with its
   latency; a request with no answer within its deadline counts as `no_answer`;
3. memory: the resident set size (psutil) of the API and the worker process every half second, against the jobs
   done; growth is measured from the first sample after 200 jobs (warm-up) to the end, over at least 1,000 jobs:
   when the two phases above made fewer, closed-loop clients top the count up afterwards.

The queue bound makes the promise checkable: the longest a job can wait is about depth / capacity, which must stay
below the deadline (reported as `queue_wait_bound_s`). A table goes to stdout, figures to bench/results/. Not a
test: tests/reliability/test_load.py runs it (short in `make test`, the full minute in `make test-slow`) and holds
it to the promises.

    python bench/load_bench.py [--model random:tiny-sd] [--size 32] [--steps 2] [--duration-s 60] [--factor 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.plots import plot_load  # noqa: E402
from bench.results_io import publish  # noqa: E402
from bench.service_stack import api_and_worker  # noqa: E402
from service.embedded import EmbeddedRedis, free_port  # noqa: E402


@dataclass(frozen=True)
class LoadConfig:
    model: str = "random:tiny-sd"
    size: int = 32
    steps: int = 2
    max_batch: int = 8
    worker_threads: int = 1
    queue_depth: int = 64
    deadline_s: float = 20.0
    concurrency: int = 16
    warmup_s: float = 5.0
    capacity_s: float = 15.0
    factor: float = 2.0
    duration_s: float = 60.0
    warmup_jobs: int = 200
    memory_jobs: int = 1000  # jobs the memory is followed over after the warm-up (closed loop after the overload
    #                          if the capacity and overload phases did not make that many; 0: no such top-up)


@dataclass
class Stack:
    base: str
    api_pid: int
    worker_pid: int


@contextmanager
def stack(cfg: LoadConfig, data: Path) -> Iterator[Stack]:
    """Redis + `ldm api` + one `ldm worker`, ready (the worker registered)."""
    with EmbeddedRedis(data / "redis") as redis:
        rest = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env.update({"LDM_REDIS_URL": redis.url, "LDM_REST_PORT": str(rest), "LDM_GRPC_PORT": str(free_port()),
                    "LDM_DEFAULT_MODEL": cfg.model, "LDM_MAX_BATCH": str(cfg.max_batch),
                    "LDM_QUEUE_MAX_DEPTH": str(cfg.queue_depth), "LDM_MIN_WIDTH": "32", "LDM_MIN_HEIGHT": "32",
                    "LDM_WORKER_TORCH_THREADS": str(cfg.worker_threads), "OMP_NUM_THREADS": str(cfg.worker_threads),
                    "LDM_QUEUE_RETRY_AFTER_S": "1"})
        with api_and_worker(env, cfg.model, f"http://127.0.0.1:{rest}") as (api, worker):
            yield Stack(f"http://127.0.0.1:{rest}", api.pid, worker.pid)


@dataclass
class Answer:
    status: int | str  # an HTTP status, or "no_answer" (no answer within the deadline) / "error" (transport)
    seconds: float


@dataclass
class Memory:
    """RSS samples (bytes) of the API and the worker against the jobs answered so far."""

    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, jobs, api, worker)

    def take(self, jobs: int, stack: Stack) -> None:
        self.samples.append((time.monotonic(), jobs, psutil.Process(stack.api_pid).memory_info().rss,
                             psutil.Process(stack.worker_pid).memory_info().rss))

    def growth(self, warmup_jobs: int) -> dict[str, Any]:
        after = [s for s in self.samples if s[1] >= warmup_jobs]
        if len(after) < 2:
            return {"jobs_measured": 0}
        first, last = after[0], after[-1]
        t0, every = self.samples[0][0], max(1, len(self.samples) // 40)
        out: dict[str, Any] = {"jobs_measured": last[1] - first[1], "from_job": first[1], "to_job": last[1],
                               "samples_s_jobs_api_mb_worker_mb": [
                                   [round(t - t0, 1), jobs, round(api / 2**20, 1), round(worker / 2**20, 1)]
                                   for t, jobs, api, worker in self.samples[::every]]}
        for i, name in ((2, "api"), (3, "worker")):
            peak = max(s[i] for s in after)
            out[name] = {"rss_mb_after_warmup": round(first[i] / 2**20, 1), "rss_mb_end": round(last[i] / 2**20, 1),
                         "rss_mb_peak": round(peak / 2**20, 1),
                         "growth_pct": round(100 * (last[i] - first[i]) / first[i], 2),
                         "peak_growth_pct": round(100 * (peak - first[i]) / first[i], 2)}
        return out


def body(cfg: LoadConfig, i: int) -> dict[str, Any]:
    return {"prompt": f"a red circle on the left {i}", "seed": i, "steps": cfg.steps, "width": cfg.size,
            "height": cfg.size}


async def _post(http: httpx.AsyncClient, cfg: LoadConfig, i: int) -> Answer:
    began = time.perf_counter()
    try:
        r = await http.post("/v1/txt2img", params={"timeout": cfg.deadline_s}, json=body(cfg, i),
                            timeout=cfg.deadline_s + 2.0)
        if r.status_code == 429:
            assert r.headers.get("retry-after"), "429 without Retry-After"
        return Answer(r.status_code, time.perf_counter() - began)
    except httpx.TimeoutException:
        return Answer("no_answer", time.perf_counter() - began)
    except httpx.TransportError:
        return Answer("error", time.perf_counter() - began)


async def _sample(memory: Memory, stack: Stack, jobs: Callable[[], int]) -> None:
    while True:
        memory.take(jobs(), stack)
        await asyncio.sleep(0.5)


async def closed_loop(stack: Stack, cfg: LoadConfig, memory: Memory, seconds: float, *, jobs_before: int = 0,
                      until_jobs: int | None = None) -> list[tuple[float, Answer]]:
    """`concurrency` clients, each sending its next request when the last is answered, for `seconds` (or until
    `until_jobs` images in all, counting `jobs_before`); (time answered, answer) of each request."""
    done: list[tuple[float, Answer]] = []
    stop_at, counter = time.monotonic() + seconds, iter(range(jobs_before, 10**9))

    def jobs() -> int:
        return jobs_before + sum(1 for _, a in done if a.status == 200)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at and (until_jobs is None or jobs() < until_jobs):
            answer = await _post(http, cfg, next(counter))
            done.append((time.monotonic(), answer))

    sampler = asyncio.create_task(_sample(memory, stack, jobs))
    async with httpx.AsyncClient(base_url=stack.base, limits=httpx.Limits(max_connections=cfg.concurrency * 2)) as h:
        await asyncio.gather(*(client(h) for _ in range(cfg.concurrency)))
    sampler.cancel()
    memory.take(jobs(), stack)
    return done


async def capacity(stack: Stack, cfg: LoadConfig, memory: Memory) -> dict[str, Any]:
    """Images per second with `concurrency` clients always waiting (closed loop), after a warm-up."""
    measure_from = time.monotonic() + cfg.warmup_s
    done = await closed_loop(stack, cfg, memory, cfg.warmup_s + cfg.capacity_s)
    counted = [a for t, a in done if t >= measure_from]
    ok = sum(1 for a in counted if a.status == 200)
    return {"clients": cfg.concurrency, "seconds": cfg.capacity_s, "images": ok,
            "images_per_s": round(ok / cfg.capacity_s, 2), "answers": dict(Counter(str(a.status) for a in counted)),
            "jobs_total": sum(1 for _, a in done if a.status == 200)}


async def overload(stack: Stack, cfg: LoadConfig, rate: float, memory: Memory, jobs_before: int,
                   ) -> list[Answer]:
    """Requests at `rate` per second for `duration_s` (open loop), and memory samples meanwhile."""
    answers: list[Answer] = []
    n = int(rate * cfg.duration_s)
    limits = httpx.Limits(max_connections=max(100, int(rate * (cfg.deadline_s + 3))))
    async with httpx.AsyncClient(base_url=stack.base, limits=limits) as http:

        async def one(i: int) -> None:
            answers.append(await _post(http, cfg, 10**6 + i))

        sampler = asyncio.create_task(_sample(memory, stack,
                                              lambda: jobs_before + sum(1 for a in answers if a.status == 200)))
        tasks, start = [], time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        sampler.cancel()
        memory.take(jobs_before + sum(1 for a in answers if a.status == 200), stack)
    return answers


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 3)


def summarize(cfg: LoadConfig, cap: dict[str, Any], rate: float, answers: list[Answer],
              memory: Memory) -> dict[str, Any]:
    by_status = Counter(str(a.status) for a in answers)
    ok = [a.seconds for a in answers if a.status == 200]
    shed = [a.seconds for a in answers if a.status == 429]
    late = sum(1 for a in answers if a.seconds > cfg.deadline_s)
    return {
        "setup": {**asdict(cfg), "cpu_cores": os.cpu_count(), "redis_appendfsync": "always"},
        "capacity": cap,
        "overload": {
            "offered_per_s": round(rate, 2), "requests": len(answers), "answers": dict(by_status),
            "accepted_per_s": round(len(ok) / cfg.duration_s, 2),
            "accepted_fraction": round(len(ok) / len(answers), 3) if answers else 0.0,
            "server_errors": sum(1 for a in answers if isinstance(a.status, int) and a.status >= 500),
            "unanswered": by_status.get("no_answer", 0) + by_status.get("error", 0),
            "answered_after_deadline": late,
            "accepted_p50_s": _quantile(ok, 0.50), "accepted_p99_s": _quantile(ok, 0.99),
            "accepted_max_s": round(max(ok), 3) if ok else None,
            "shed_p99_s": _quantile(shed, 0.99), "shed_max_s": round(max(shed), 3) if shed else None,
            "queue_wait_bound_s": round(cfg.queue_depth / cap["images_per_s"], 2) if cap["images_per_s"] else None,
        },
        "memory": memory.growth(cfg.warmup_jobs),
    }


def run(cfg: LoadConfig) -> dict[str, Any]:
    memory = Memory()
    with tempfile.TemporaryDirectory() as tmp, stack(cfg, Path(tmp)) as s:
        cap = asyncio.run(capacity(s, cfg, memory))
        rate = cfg.factor * cap["images_per_s"]
        if rate <= 0:
            raise RuntimeError(f"no capacity measured: {cap}")
        answers = asyncio.run(overload(s, cfg, rate, memory, cap["jobs_total"]))
        jobs = cap["jobs_total"] + sum(1 for a in answers if a.status == 200)
        if cfg.memory_jobs and jobs < cfg.warmup_jobs + cfg.memory_jobs:  # memory is measured over memory_jobs jobs
            topped = asyncio.run(closed_loop(s, cfg, memory, 120.0, jobs_before=jobs,
                                             until_jobs=cfg.warmup_jobs + cfg.memory_jobs))
            cap["memory_top_up_jobs"] = sum(1 for _, a in topped if a.status == 200)
    return summarize(cfg, cap, rate, answers, memory)


def report(data: dict[str, Any]) -> str:
    cfg, cap, o, mem = data["setup"], data["capacity"], data["overload"], data["memory"]
    lines = [
        f"Model {cfg['model']}, {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, one worker (batch <= "
        f"{cfg['max_batch']}, {cfg['worker_threads']} thread), queue depth <= {cfg['queue_depth']}, client deadline "
        f"{cfg['deadline_s']:g} s, {cfg['cpu_cores']} cores shared with the clients.",
        "",
        "| measure | value |", "|---|---|",
        f"| capacity (closed loop, {cap['clients']} clients, {cap['seconds']:g} s) | {cap['images_per_s']:.2f} img/s |",
        f"| offered ({cfg['factor']:g}x capacity, open loop, {cfg['duration_s']:g} s) | {o['offered_per_s']:.2f} req/s "
        f"({o['requests']} requests) |",
        f"| answers | {', '.join(f'{k}: {v}' for k, v in sorted(o['answers'].items()))} |",
        f"| accepted throughput | {o['accepted_per_s']:.2f} img/s ({100 * o['accepted_fraction']:.1f} % of requests) |",
        f"| accepted latency p50 / p99 / max | {o['accepted_p50_s']} / {o['accepted_p99_s']} / "
        f"{o['accepted_max_s']} s |",
        f"| shed (429) latency p99 / max | {o['shed_p99_s']} / {o['shed_max_s']} s |",
        f"| 5xx / unanswered / answered after the deadline | {o['server_errors']} / {o['unanswered']} / "
        f"{o['answered_after_deadline']} |",
        f"| longest possible queue wait (depth / capacity) | {o['queue_wait_bound_s']} s |",
    ]
    if mem.get("jobs_measured"):
        if cap.get("memory_top_up_jobs"):
            lines.append(f"| jobs added after the overload, for the memory figure (closed loop) | "
                         f"{cap['memory_top_up_jobs']} |")
        for name in ("api", "worker"):
            m = mem[name]
            lines.append(f"| {name} RSS over {mem['jobs_measured']} jobs after {mem['from_job']} | "
                         f"{m['rss_mb_after_warmup']} -> {m['rss_mb_end']} MB ({m['growth_pct']:+.2f} %, peak "
                         f"{m['peak_growth_pct']:+.2f} %) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LoadConfig()
    parser.add_argument("--model", default=d.model, help="model spec the worker loads (default %(default)s)")
    parser.add_argument("--size", type=int, default=d.size, help="image width and height (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="sampler steps (default %(default)s)")
    parser.add_argument("--queue-depth", type=int, default=d.queue_depth, help="LDM_QUEUE_MAX_DEPTH")
    parser.add_argument("--deadline-s", type=float, default=d.deadline_s, help="each request's deadline")
    parser.add_argument("--capacity-s", type=float, default=d.capacity_s, help="capacity measurement window")
    parser.add_argument("--factor", type=float, default=d.factor, help="offered load / capacity (default 2)")
    parser.add_argument("--duration-s", type=float, default=d.duration_s, help="overload duration (default 60)")
    parser.add_argument("--worker-threads", type=int, default=d.worker_threads, help="torch threads of the worker")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_bench.json")
    parser.add_argument("--plot", action="store_true",
                        help="only draw the plot (docs/load_bench.png, bench/plots.py) from --out; no run")
    args = parser.parse_args()
    if args.plot:
        print(plot_load(args.out))
        return
    cfg = LoadConfig(model=args.model, size=args.size, steps=args.steps, queue_depth=args.queue_depth,
                     deadline_s=args.deadline_s, capacity_s=args.capacity_s, factor=args.factor,
                     duration_s=args.duration_s, worker_threads=args.worker_threads)
    data = run(cfg)
    publish(data, report(data), args.out)
    print(plot_load(args.out))


if __name__ == "__main__":
    main()
