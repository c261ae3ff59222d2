"""SD-1.5 txt2img on a GPU against diffusers with the same weights: images/s, GPU memory, GPU-seconds per 1,000 images.

Both pipelines hold one set of random weights of SD-1.5's shapes (normal, std 0.02; diffusers' through its own
single-file converters), run fp16 at 512 px, DPM-Solver++ 20 steps, guidance 7.5, one prompt per image, PIL images
out, at batch 1, 8 and 32. Ours in each GPU mode (models/gpu_inference.py): `eager` (the modules as they are,
NCHW), `eager_cl` (channels_last), `graphs` (channels_last + one CUDA graph per bucket, the default) and `compile`
(channels_last + torch.compile). Each (mode, batch) gets a warm-up run (graph captures and compiles happen there)
and `--runs` timed runs, median reported; at batch 8 each mode's images are compared with eager's (max and mean
|difference| in /255) and `graphs` with `eager_cl`'s, which it must equal.

Runs on the device machine with diffusers carried as a wheel (bench/device/README.md says how):
`python3 bench/device/gpu_bench.py --out $OUT/gpu_bench.json`; a time budget skips what
would not fit and every finished row is written at once. `--tiny` runs the same code on a toy model (a CPU check).
Results of the run on an NVIDIA H200: bench/results/gpu_bench_h200.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.model_bench import build_diffusers, build_ours  # noqa: E402
from models.config import ModelConfig, builtin_config  # noqa: E402
from models.gpu_inference import graphs_of, optimize_for_gpu_inference  # noqa: E402
from models.ldm import LatentDiffusion  # noqa: E402
from models.pipeline import Pipeline, RunSettings, SampleSpec  # noqa: E402
from tests.helpers import toy_sd_config, write_clip_tokenizer  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse on the moon", "a red circle on a black background",
           "an oil painting of a lighthouse in a storm", "a bowl of fruit on a wooden table"]
#: the compiled variants: activation layout and torch.compile mode (reduce-overhead adds Inductor's CUDA graphs)
COMPILED = {"compile": (torch.channels_last, "default"), "compile_nchw": (torch.contiguous_format, "default"),
            "compile_graphs": (torch.contiguous_format, "reduce-overhead")}
MODES = ("eager", "eager_cl", "graphs", *COMPILED)


def build(config: ModelConfig, tok: Path, device: str, dtype: torch.dtype) -> tuple[LatentDiffusion, Any]:
    """Ours (on the CPU: it moves to the GPU once diffusers is done, so that neither's memory counts the other's
    weights) and diffusers' StableDiffusionPipeline (on `device` in `dtype`) with the same random weights."""
    ours = build_ours(tok, config)
    return ours, build_diffusers(ours, tok).to(device, dtype)  # copies: the two stop sharing storage


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")).astype(np.int16) for im in images])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.start = time.perf_counter()
        self.data: dict[str, Any] = {"rows": [], "parity": {}, "skipped": []}
        self.images: dict[str, np.ndarray] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.data, indent=1) + "\n")

    def measure(self, impl: str, batch: int, generate: Callable[[int], list[Any]], need_s: float) -> None:
        if self.left() < need_s:
            self.data["skipped"].append(f"{impl} batch {batch}: {self.left():.0f} s of budget left")
            self.save()
            return
        device = self.args.device
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        first = generate(batch)
        sync(device)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(self.args.runs):
            t0 = time.perf_counter()
            generate(batch)
            sync(device)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        row = {"impl": impl, "batch": batch, "first_run_s": round(warm, 3), "runs_s": [round(t, 4) for t in times],
               "median_s": round(median, 4), "images_per_s": round(batch / median, 3),
               "gpu_s_per_1000_images": round(1000 * median / batch, 1)}
        if device.startswith("cuda"):
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.data["rows"].append(row)
        if batch == self.args.parity_batch:
            self.images[impl] = pixels(first)
            self.parity()
        print(json.dumps(row), flush=True)
        self.save()

    def parity(self) -> None:
        """Each implementation's images at the parity batch against ours eager (graphs against eager_cl too)."""
        pairs = [(impl, "eager") for impl in self.images if impl != "eager"] + [("graphs", "eager_cl")]
        for a, b in pairs:
            if a in self.images and b in self.images:
                d = np.abs(self.images[a] - self.images[b])
                self.data["parity"][f"{a} vs {b}"] = {"max_abs_0_255": int(d.max()),
                                                      "mean_abs_0_255": round(float(d.mean()), 4)}


def run_modes(bench: Bench, ours: LatentDiffusion, pipe: Any, modes: list[str]) -> None:
    """Diffusers first, then ours in each mode, every mode at every batch (the compiled ones at theirs)."""
    args = bench.args
    batches = [int(b) for b in args.batches.split(",")]
    settings = RunSettings("dpmpp_2m", args.steps, args.size, args.size)

    def theirs(batch: int) -> list[Any]:
        prompts = [PROMPTS[k % len(PROMPTS)] for k in range(batch)]
        gens = [torch.Generator(args.device).manual_seed(k) for k in range(batch)]
        with torch.inference_mode():
            out = pipe(prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                       guidance_scale=7.5, generator=gens)
        return list(out.images)

    def ours_now(batch: int) -> list[Any]:
        specs = [SampleSpec(PROMPTS[k % len(PROMPTS)], seed=k) for k in range(batch)]
        return Pipeline(ours, optimize=False).txt2img(specs, settings).images

    for batch in batches:
        bench.measure("diffusers", batch, theirs, need_s=10)
    pipe.to("cpu")  # its GPU memory back before ours comes
    ours.to(device=args.device, dtype=bench.dtype)
    for batch in batches if "eager" in modes else ():
        bench.measure("eager", batch, ours_now, need_s=10)
    ours.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for batch in batches if "eager_cl" in modes else ():
        bench.measure("eager_cl", batch, ours_now, need_s=10)
    if "graphs" in modes and args.device.startswith("cuda"):
        optimize_for_gpu_inference(ours, "graphs")
        for batch in batches:
            bench.measure("graphs", batch, ours_now, need_s=15)
        graphs = graphs_of(ours.unet)
        assert graphs is not None
        bench.data["graph_counts"] = {"captures": graphs.captures, "replays": graphs.replays,
                                      "failed_buckets": len(graphs.failed)}
        del ours.unet.forward  # back to the class's forward
    for mode in (m for m in modes if m in COMPILED):
        layout, how = COMPILED[mode]
        torch._dynamo.reset()
        ours.to(memory_format=layout)  # type: ignore[call-overload]
        ours.unet.compile(mode=how)
        for batch in [int(b) for b in args.compile_batches.split(",")]:
            bench.measure(mode, batch, ours_now, need_s=100)


def measure(args: argparse.Namespace) -> None:
    bench = Bench(args)
    import diffusers

    bench.data["machine"] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda}
    bench.data["setup"] = {"size_px": args.size, "steps": args.steps, "sampler": "DPM-Solver++ (2M)",
                           "guidance": 7.5, "dtype": args.dtype, "runs": args.runs,
                           "weights": "random, toy shapes" if args.tiny else "random, SD-1.5 shapes"}
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "tokenizer")
        t0 = time.perf_counter()
        vocab = len(json.loads((tok / "vocab.json").read_text()))
        config = toy_sd_config(vocab) if args.tiny else builtin_config("sd-v1")
        ours, pipe = build(config, tok, args.device, bench.dtype)
        bench.data["setup"]["build_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(bench.data["machine"]), flush=True)
        run_modes(bench, ours, pipe, args.modes.split(","))
    bench.data["elapsed_s"] = round(time.perf_counter() - bench.start, 1)
    bench.save()
    print(json.dumps({"parity": bench.data["parity"], "skipped": bench.data["skipped"]}), flush=True)


def report(runs: list[Path], out: Path) -> str:
    """One table of the runs' rows: each against diffusers at its batch in the same run (the only fair ratio). GPU
    memory is each implementation's own: a run whose setup names `diffusers_rows_include_gib` (the first runs held
    our weights on the GPU while diffusers ran) has that taken off diffusers' peaks."""
    loaded = [json.loads(path.read_text()) for path in runs]
    lines = ["| run | implementation | batch | images/s | vs diffusers (same run) | GPU-s per 1,000 images "
             "| GPU memory (GiB) | first run (s) |", "|---|---|---|---|---|---|---|---|"]
    for k, data in enumerate(loaded, 1):
        theirs = {r["batch"]: r["images_per_s"] for r in data["rows"] if r["impl"] == "diffusers"}
        extra = data["setup"].get("diffusers_rows_include_gib", 0.0)
        for r in data["rows"]:
            ratio = f"{r['images_per_s'] / theirs[r['batch']]:.2f}x" if r["batch"] in theirs else ""
            memory = r.get("peak_memory_gib")
            own = "" if memory is None else f"{memory - (extra if r['impl'] == 'diffusers' else 0):.2f}"
            lines.append(f"| {k} | {r['impl']} | {r['batch']} | {r['images_per_s']:.2f} | {ratio} | "
                         f"{r['gpu_s_per_1000_images']:.0f} | {own} | {r['first_run_s']:.1f} |")
    table = "\n".join(lines)
    machine = loaded[0]["machine"]
    out.write_text(json.dumps({"machine": machine, "setup": loaded[0]["setup"], "runs": loaded,
                               "table_markdown": table}, indent=1) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--compile-batches", default="8,32", help="compile is slow to warm: only these batches")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--parity-batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=450, help="skip what would start after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--tiny", action="store_true", help="a toy model (checks the script on a CPU)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RUN_JSON",
                        help="instead of measuring: one table of these runs' JSON files, written to --out")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_bench.json"))
    args = parser.parse_args()
    if args.report:
        print(report(args.report, args.out))
    else:
        measure(args)


if __name__ == "__main__":
    main()
