"""What batching buys per image on the CPU, with our batch-invariant linear layers and with plain folded ones.

Times `Pipeline.txt2img` for batch 1 and batch N (median of --runs after a warm-up) and prints the per-image
gain N * t(1) / t(N) twice: with `models.layers.batch_invariant_linear` (one GEMM per item: an image is
bit-identical alone or in any batch) and with it swapped for plain `F.linear` in this process only (faster
for small models, but rounds differently as the batch changes). Not a test.

    python bench/batch_bench.py [--model random:tiny-sd] [--batch 8] [--steps 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models.attention  # noqa: E402
import models.layers  # noqa: E402
from models.pipeline import Pipeline, RunSettings, SampleSpec  # noqa: E402
from models.resolve import resolve_model  # noqa: E402


def seconds(pipe: Pipeline, n: int, steps: int, runs: int) -> float:
    specs = [SampleSpec(f"a red circle {i}", seed=i) for i in range(n)]
    settings = RunSettings(steps=steps)
    pipe.txt2img(specs, settings)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pipe.txt2img(specs, settings)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny-sd")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = resolve_model(args.model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32)
    pipe = Pipeline(model)
    print(f"| linear layers | batch 1 (s) | batch {args.batch} (s) | per-image gain |")
    print("|---|---|---|---|")
    for label in ("one GEMM per item (batch-invariant)", "folded F.linear"):
        if label.startswith("folded"):
            def folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
                return F.linear(x, weight, bias)

            models.layers.batch_invariant_linear = folded
            models.attention.batch_invariant_linear = folded
        one, many = seconds(pipe, 1, args.steps, args.runs), seconds(pipe, args.batch, args.steps, args.runs)
        print(f"| {label} | {one:.2f} | {many:.2f} | {args.batch * one / many:.2f}x |")


if __name__ == "__main__":
    main()
