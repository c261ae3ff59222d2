"""Finishing jobs while the next batch runs (LDM_WORKER_FINISH_OVERLAP) against finishing them in between.

A static worker runs in this process on an embedded Redis (the real queue) with `--threads` torch threads; the same
`--jobs` jobs of `--n` images each are queued at once, and the worker runs them to the end, once with the finisher
overlapping (its thread waits for the PNGs and stores each job while the next batch samples) and once without
(each job stored before the next batch starts), alternating for `--runs` rounds. Reported per mode: images/s
(median), and the seconds the worker's loop waited for finishing (`ldm_finish_blocked_seconds_total`): the part of
PNG encoding and Redis writes that sat between two batches. Figures to bench/results/finish_bench.json.

The gain is what the finishing costs against a batch: on a CPU the batch dwarfs it (the mechanism shows in the
loop's waiting time); on a GPU it is a tenth of a batch (docs/benchmarks.md), which bench/device/service_gpu.py
measures through the whole service.

    python bench/finish_bench.py [--model random:tiny-sd] [--size 256] [--steps 4] [--jobs 4] [--n 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_io import publish  # noqa: E402
from service.config import Settings  # noqa: E402
from service.embedded import EmbeddedRedis  # noqa: E402
from service.metrics import WorkerMetrics  # noqa: E402
from service.queue import SyncJobQueue  # noqa: E402
from service.schemas import GenerationRequest  # noqa: E402
from service.worker.process import Worker  # noqa: E402
from service.worker.runner import Runner  # noqa: E402


def one_run(runner: Runner, redis_url: str, overlap: bool, args: argparse.Namespace, round_: int) -> dict[str, float]:
    """Queue the jobs, run the worker until they have all ended; images/s and the loop's wait for finishing."""
    config = Settings(redis_url=redis_url, key_prefix=f"finish-{round_}-{int(overlap)}", max_batch=args.n,
                      worker_finish_overlap=overlap)
    with SyncJobQueue(config) as queue:
        metrics = WorkerMetrics()
        worker = Worker(config, queue, runner, metrics, "bench")
        jobs = [queue.submit(GenerationRequest(model=runner.name, prompt=f"a red circle {i}", width=args.size,
                                               height=args.size, steps=args.steps, sampler="ddim", n=args.n,
                                               seed=100 + i)) for i in range(args.jobs)]
        began = time.perf_counter()
        while worker.in_hand() or any(not (r := queue.get(j.id)) or not r.status.terminal for j in jobs):
            worker.step()
        seconds = time.perf_counter() - began
        worker.finisher.close()
        records = [queue.get(j.id) for j in jobs]
        assert all(r is not None and r.status == "succeeded" for r in records), records
    labels = {"model": runner.name}
    blocked = metrics.registry.get_sample_value("ldm_finish_blocked_seconds_total", labels) or 0.0
    finish_sum = metrics.registry.get_sample_value("ldm_finish_seconds_sum", labels) or 0.0
    return {"seconds": seconds, "images_per_s": args.jobs * args.n / seconds, "loop_waited_s": blocked,
            "finishing_s": finish_sum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny-sd")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per job (default 4)")
    parser.add_argument("--jobs", type=int, default=4, help="jobs per run, one batch each (default 4)")
    parser.add_argument("--n", type=int, default=8, help="images per job = LDM_MAX_BATCH (default 8)")
    parser.add_argument("--runs", type=int, default=3, help="rounds, each mode once per round (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a core left for the "
                        "PNG threads, as a GPU worker leaves its CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finish_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = Runner.load(args.model, device="cpu")
    runs: dict[str, list[dict[str, float]]] = {"overlap": [], "in_between": []}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp)) as redis:
        one_run(runner, redis.url, True, argparse.Namespace(**{**vars(args), "jobs": 1}), -1)  # warm-up
        for round_ in range(args.runs):
            for overlap in (round_ % 2 == 0, round_ % 2 == 1):
                runs["overlap" if overlap else "in_between"].append(one_run(runner, redis.url, overlap, args, round_))
    summary: dict[str, Any] = {name: {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]}
                               for name, rs in runs.items()}
    ratio = summary["overlap"]["images_per_s"] / summary["in_between"]["images_per_s"]
    rows = [f"| {name} | {s['images_per_s']:.3f} | {s['seconds']:.2f} | {s['loop_waited_s']:.3f} | "
            f"{s['finishing_s']:.3f} |" for name, s in summary.items()]
    table = "\n".join([
        f"{args.jobs} jobs x {args.n} images, {args.model} at {args.size} px, {args.steps} DDIM steps, "
        f"{args.threads} torch thread(s), medians of {args.runs}",
        "", "| finishing | images/s | seconds | loop waited for finishing (s) | finishing, summed over jobs (s) |",
        "|---|---|---|---|---|", *rows, "", f"overlap / in between: {ratio:.3f}x images/s"])
    publish({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary,
             "overlap_speedup": round(ratio, 4)}, table, args.out)


if __name__ == "__main__":
    main()
