"""What live previews cost against the steps they interrupt, on the CPU.

Runs one guided txt2img sample step by step in a `StepBatch` (the worker's continuous-batching loop) and, beside
it, times `preview_png` of the sample's x0 estimate (the fitted latent -> RGB map, a bilinear resize to at most
256 px, a PNG); prints the median step time, the median preview time and the overhead of one preview every
`--every` steps (preview / (every * step)). Also times the one-off fit of the map (`fit_latent_rgb`). The issue's
target: at most 5 % on tiny-shapes with a preview every 5 steps. Not a test.

    python bench/preview_bench.py [--model tiny-shapes] [--steps 50] [--every 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import publish  # noqa: E402
from models.pipeline import Pipeline, RunSettings, SampleSpec  # noqa: E402
from models.preview import fit_latent_rgb, preview_png, preview_size  # noqa: E402
from models.resolve import resolve_model  # noqa: E402
from models.step_batch import StepBatch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "preview_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model(args.model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32)
    pipe = Pipeline(model)
    start = time.perf_counter()
    rgb = fit_latent_rgb(model)
    fit_s = time.perf_counter() - start
    settings = RunSettings(sampler="dpmpp_2m", steps=args.steps)
    height, width = pipe.size(settings)
    size = preview_size(height, width)
    step_s, preview_s = [], []
    for run in range(2):  # the first run warms up
        batch = StepBatch(pipe.denoiser, max_items=1)
        batch.admit(pipe.start_txt2img([SampleSpec("a red circle on the left", seed=run)], settings).samples[0])
        while len(batch):
            start = time.perf_counter()
            advanced = batch.step()
            step_s.append(time.perf_counter() - start)
            denoised = advanced[0].state.denoised
            assert denoised is not None
            start = time.perf_counter()
            preview_png(denoised, rgb, size)
            preview_s.append(time.perf_counter() - start)
    step_s, preview_s = step_s[args.steps:], preview_s[args.steps:]
    step, preview = statistics.median(step_s), statistics.median(preview_s)
    overhead = preview / (args.every * step)
    data = {"model": args.model, "threads": args.threads, "steps": args.steps, "every": args.every,
            "size": [height, width], "preview_size": list(size), "step_ms": step * 1e3, "preview_ms": preview * 1e3,
            "overhead": overhead, "fit_s": fit_s, "fit_r2": rgb.r2}
    table = "\n".join([
        "| model | image | preview | step (ms) | preview (ms) | overhead at every " f"{args.every} | map fit (s) |",
        "|---|---|---|---|---|---|---|",
        f"| {args.model} | {width}x{height} | {size[1]}x{size[0]} | {step * 1e3:.1f} | {preview * 1e3:.2f} "
        f"| {overhead:.1%} | {fit_s:.2f} |",
    ])
    publish(data, table, args.out)


if __name__ == "__main__":
    main()
