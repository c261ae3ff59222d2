"""The service on a GPU against its own raw pipeline: images/s through REST at concurrency 1, 16 and 64.

First the raw rate, in this process: the worker's Runner for the model (`random:sd-v1` by default: SD-1.5's
shapes, untrained weights, fp16) makes batches of `--max-batch` images by its pipeline alone (`pipeline`) and with
its PNGs (`runner`, what a worker does per batch). Then the real stack (embedded Redis, `ldm api`, one `ldm worker`
with LDM_MAX_BATCH = `--max-batch`, as bench/service_bench.py starts it) takes `POST /v1/txt2img` from that many
concurrent clients; the table gives each level's images/s against the raw pipeline's (the issue's target: within
10 % at concurrency 64), and p50 latency. The levels of `--in-between` (default: the highest) run again on a worker
with LDM_WORKER_FINISH_OVERLAP=false (each job's PNGs and Redis write between two batches, not beside the next).

On the device machine, with the service's packages carried as wheels (bench/device/README.md):

    python3 bench/device/service_gpu.py --out $OUT/service_gpu.json

`--device cpu --model random:tiny-sd --size 64 --max-batch 4 --concurrency 1 4` checks the script on a CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.results_io import publish  # noqa: E402
from bench.service_bench import load, stack  # noqa: E402
from models.config import builtin_config  # noqa: E402
from models.pipeline import RunSettings, SampleSpec  # noqa: E402
from service.schemas import GenerationRequest  # noqa: E402
from service.worker.runner import Runner, SampleInput  # noqa: E402
from tests.helpers import write_clip_tokenizer  # noqa: E402


def timed(fn: Any, runs: int, device: str) -> list[float]:
    """fn() once to warm up (graph captures), then `runs` timed calls."""
    fn()
    times = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times


def raw_rates(args: argparse.Namespace, tokenizer: Path | None) -> dict[str, Any]:
    """Images/s of the worker's pipeline alone and of its Runner (with PNGs) at a full batch."""
    out = measure_runner(Runner.load(args.model, device=args.device, gpu=args.gpu_mode, tokenizer_dir=tokenizer),
                         args)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def measure_runner(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    n = args.max_batch
    settings = RunSettings("dpmpp_2m", args.steps, args.size, args.size)
    specs = [SampleSpec(f"a red circle {i}", seed=i) for i in range(n)]
    request = GenerationRequest(model=runner.name, prompt="a red circle", seed=0, steps=args.steps, width=args.size,
                                height=args.size)
    key = runner.batch_key(request, None)
    samples = [SampleInput(request, i) for i in range(n)]
    out: dict[str, Any] = {}
    for name, fn in (("pipeline", lambda: runner.pipeline.txt2img(specs, settings)),
                     ("runner", lambda: runner.run(key, samples))):
        times = timed(fn, args.runs, args.device)
        out[name] = {"runs_s": [round(t, 3) for t in times], "images_per_s": round(n / statistics.median(times), 3)}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def clip_tokenizer(model: str, folder: Path) -> Path | None:
    """A CLIP tokenizer folder for a `random:` model with a CLIP text encoder (none ships with random weights)."""
    name = model.removeprefix("random:")
    conditioner = builtin_config(name).conditioner if model.startswith("random:") else None
    return write_clip_tokenizer(folder) if conditioner is not None and conditioner.kind == "clip" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:sd-v1")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu-mode", default="graphs", choices=("graphs", "compile", "eager"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--in-between", type=int, nargs="*", default=None,
                        help="concurrency levels to run again with LDM_WORKER_FINISH_OVERLAP=false (default: the "
                        "highest of --concurrency; none: no flag values)")
    parser.add_argument("--runs", type=int, default=2, help="timed raw batches")
    parser.add_argument("--out", type=Path, default=Path("bench/results/service_gpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(args.model, Path(tmp) / "tokenizer")
        raw = raw_rates(args, tokenizer)
        os.environ |= {"LDM_WORKER_DEVICE": args.device, "LDM_WORKER_GPU_MODE": args.gpu_mode,
                       "LDM_JOB_DEADLINE_S": "3600"} | ({} if tokenizer is None else
                                                        {"LDM_WORKER_TOKENIZER_DIR": str(tokenizer)})
        in_between = [max(args.concurrency)] if args.in_between is None else args.in_between
        levels = service_levels(args, args.concurrency, Path(tmp) / "overlap", overlap=True)
        serial = service_levels(args, in_between, Path(tmp) / "in-between", overlap=False) if in_between else {}
    pipeline = raw["pipeline"]["images_per_s"]
    lines = [f"| path | images/s | vs the raw pipeline at batch {args.max_batch} | p50 (s) | errors |",
             "|---|---|---|---|---|",
             f"| pipeline alone, batch {args.max_batch} | {pipeline:.2f} | 1.00x | | |",
             f"| Runner (pipeline + PNGs), batch {args.max_batch} | {raw['runner']['images_per_s']:.2f} | "
             f"{raw['runner']['images_per_s'] / pipeline:.2f}x | | |"]
    lines += [f"| service, concurrency {c}{how} | {r['throughput_rps']:.2f} | {r['throughput_rps'] / pipeline:.2f}x | "
              f"{r['p50_s']:.2f} | {r['errors']} |"
              for how, rows in (("", levels), (", finishing in between", serial)) for c, r in rows.items()]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    publish({"device": device, "torch": torch.__version__, "setup": vars(args) | {"out": str(args.out)},
             "raw": raw, "service": levels, "service_finishing_in_between": serial}, "\n".join(lines), args.out)


def service_levels(args: argparse.Namespace, concurrency: list[int], folder: Path, *, overlap: bool,
                   ) -> dict[str, Any]:
    """The real stack with LDM_WORKER_FINISH_OVERLAP=`overlap`: one row per concurrency level."""
    os.environ["LDM_WORKER_FINISH_OVERLAP"] = str(overlap).lower()
    levels: dict[str, Any] = {}
    folder.mkdir(parents=True)
    with stack(args.model, args.max_batch, folder) as (base, _metrics):
        asyncio.run(load(base, 1, 2, args.steps))  # warm-up: the batch-1 graph
        for c in concurrency:
            levels[str(c)] = row = asyncio.run(load(base, c, max(4, 2 * c), args.steps))
            print(json.dumps({str(c): row, "overlap": overlap}), flush=True)
    return levels


if __name__ == "__main__":
    main()
