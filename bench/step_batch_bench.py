"""A short job submitted while long ones run: its latency with static batching and with step-level batching.

Model-level only (no queue, no worker): `--long` jobs of `--long-steps` steps start together; after their first step
a job of `--short-steps` steps arrives. Static batching (today's worker) runs the long batch to its end, then the
short job alone; continuous batching (`models.step_batch.StepBatch`) admits it at the next step boundary. Prints the
short job's latency both ways, its solo latency, and the long jobs' completion time both ways (what the long jobs
pay for the newcomer). The issue's worker-level target: the short job within 6x its solo latency. Not a test.

    python bench/step_batch_bench.py [--model tiny-shapes] [--long 3] [--long-steps 50] [--short-steps 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import publish  # noqa: E402
from models.pipeline import Pipeline, RunSettings, SampleSpec  # noqa: E402
from models.resolve import resolve_model  # noqa: E402
from models.step_batch import StepBatch, StepSample  # noqa: E402


def samples(pipe: Pipeline, name: str, n: int, steps: int, seed: int) -> list[StepSample]:
    specs = [SampleSpec(f"a red circle {i}", seed=seed + i) for i in range(n)]
    started = pipe.start_txt2img(specs, RunSettings(sampler="dpmpp_2m", steps=steps))
    return [StepSample((name, s.key), s.state, s.cond, s.uncond, s.guidance_scale) for s in started.samples]


def run(pipe: Pipeline, args: argparse.Namespace, continuous: bool) -> dict[str, float]:
    """Seconds from the short job's arrival to its end, and from the start to the long jobs' end."""
    batch = StepBatch(pipe.denoiser, max_items=args.long + 1)
    for s in samples(pipe, "long", args.long, args.long_steps, 0):
        batch.admit(s)
    start = time.perf_counter()
    batch.step()
    arrived = time.perf_counter()
    short = samples(pipe, "short", 1, args.short_steps, 100)
    if continuous:
        batch.admit(short[0])
    ends: dict[str, float] = {}
    while len(batch):
        for s in batch.step():
            if s.state.done:
                ends[str(s.key[0])] = time.perf_counter()  # type: ignore[index]
        if not len(batch) and not continuous and "short" not in ends:
            batch.admit(short[0])
    return {"short_latency_s": ends["short"] - arrived, "long_done_s": ends["long"] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--long-steps", type=int, default=50)
    parser.add_argument("--short-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_batch_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline(resolve_model(args.model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32))
    solo = StepBatch(pipe.denoiser, max_items=1)
    solo.admit(samples(pipe, "short", 1, args.short_steps, 100)[0])
    began = time.perf_counter()
    while len(solo):
        solo.step()
    solo_s = time.perf_counter() - began
    static, continuous = run(pipe, args, continuous=False), run(pipe, args, continuous=True)
    data = {"model": args.model, "threads": args.threads, "long_jobs": args.long, "long_steps": args.long_steps,
            "short_steps": args.short_steps, "short_solo_s": solo_s, "static": static, "continuous": continuous}
    table = "\n".join([
        "| batching | short job latency (s) | x solo | long jobs done (s) |",
        "|---|---|---|---|",
        *(f"| {name} | {r['short_latency_s']:.2f} | {r['short_latency_s'] / solo_s:.1f} | {r['long_done_s']:.2f} |"
          for name, r in (("static", static), ("continuous", continuous))),
        f"| (short job alone) | {solo_s:.2f} | 1.0 | |",
    ])
    publish(data, table, args.out)


if __name__ == "__main__":
    main()
