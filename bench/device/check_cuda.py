"""The worker's Runner on a real GPU: fp32/fp16/bf16 agreement, batch invariance, throughput, inpaint, OOM split.

Runs on the device machine (no MiniLM weights there: token states come from contexts.safetensors), with
pydantic and pydantic-settings carried as wheels: `python3 bench/device/check_cuda.py`. Results of the run on
an NVIDIA H200: bench/results/cuda_check_h200.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from train_gpu import WORK, StrictContexts  # noqa: E402  (also replaces the MiniLM weights by zeros)

from models.text.base import EncodedPrompts  # noqa: E402
from service.schemas import GenerationRequest, Task  # noqa: E402
from service.worker.runner import JobFailure, Runner, SampleInput  # noqa: E402

PROMPTS = ["a red circle on a black background", "a large blue square", "a small yellow triangle on the left",
           "a green circle and a purple triangle", "an orange square in the center on a gray background",
           "a purple triangle on the top", "a blue circle and a red square on a black background",
           "a large green triangle"]


def load(device: str, dtype: str, contexts: StrictContexts) -> Runner:
    runner = Runner.load("tiny-shapes", device=device, dtype=dtype)  # type: ignore[arg-type]
    cond = runner.model.conditioner
    assert cond is not None
    cond.encode = lambda p: EncodedPrompts(contexts(list(p)).to(runner.dtype), [])  # type: ignore[method-assign]
    return runner


def pixels(png: bytes | None) -> np.ndarray:
    assert png is not None
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def run(runner: Runner, n: int, steps: int = 20, size: int = 64, task: Task = Task.txt2img,
        first_seed: int = 0) -> list[bytes | None]:
    samples = []
    for i in range(n):
        kw: dict[str, object] = {}
        image = mask = None
        if task == Task.inpaint:
            image = Image.new("RGB", (size, size), (255, 255, 255))
            mask = Image.new("L", (size, size), 0)
            mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        request = GenerationRequest(prompt=PROMPTS[(first_seed + i) % 8], seed=first_seed + i, steps=steps,
                                    width=size, height=size, guidance_scale=5.0, task=task, model="tiny-shapes", **kw)
        samples.append(SampleInput(request, first_seed + i, image, mask))
    key = runner.batch_key(samples[0].request, samples[0].image)
    return runner.run(key, samples)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--oom-batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    contexts = StrictContexts(WORK / "contexts.safetensors", torch.device(args.device))
    report: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                 "torch": torch.__version__}
    reference = None
    for dtype in args.dtypes.split(","):
        entry: dict[str, object] = {}
        try:
            runner = load(args.device, dtype, contexts)
            batch8 = [pixels(p) for p in run(runner, 8)]
            alone = [pixels(p) for p in (run(runner, 1, first_seed=i)[0] for i in range(3))]
            entry["batch_invariance_max_abs_diff_0_255"] = int(max(np.abs(a - b).max()
                                                                   for a, b in zip(alone, batch8[:3], strict=True)))
            if reference is None:
                reference = batch8
            diffs = [np.abs(a - b) for a, b in zip(batch8, reference, strict=True)]
            entry["vs_fp32_max_abs_diff_0_255"] = int(max(d.max() for d in diffs))
            entry["vs_fp32_mean_abs_diff_0_255"] = float(np.mean([d.mean() for d in diffs]))
            for b in (int(x) for x in args.batches.split(",")):
                run(runner, b)
                sync(args.device)
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    run(runner, b)
                sync(args.device)
                entry[f"images_per_s_batch{b}"] = round(args.reps * b / (time.perf_counter() - t0), 1)
            inpainted = run(runner, 2, task=Task.inpaint)
            entry["inpaint_ok"] = all(pixels(p).shape == (64, 64, 3) for p in inpainted)
            if args.device == "cuda":
                entry["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            Image.fromarray(np.concatenate(batch8, axis=1).astype(np.uint8)).save(args.out / f"batch8-{dtype}.png")
            del runner
            torch.cuda.empty_cache() if args.device == "cuda" else None
        except Exception:
            entry["error"] = traceback.format_exc()
        report[dtype] = entry
        print(dtype, json.dumps(entry, indent=1), flush=True)

    if args.device == "cuda":  # a real CUDA out-of-memory: the batch is split in halves and still completes
        oom: dict[str, object] = {}
        try:
            runner = load(args.device, "fp16", contexts)
            splits = []
            runner.on_oom = lambda: splits.append(1)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(3 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
            t0 = time.perf_counter()
            pngs = run(runner, args.oom_batch, steps=2, size=512)
            oom.update(images=len([p for p in pngs if p is not None]), splits=len(splits),
                       seconds=round(time.perf_counter() - t0, 1))
            try:
                run(runner, 1, steps=2, size=2048)
                oom["single_too_big"] = "no failure"
            except JobFailure as exc:
                oom["single_too_big"] = str(exc)
        except Exception:
            oom["error"] = traceback.format_exc()
        report["oom_split"] = oom
        print("oom", json.dumps(oom, indent=1), flush=True)
    (args.out / "cuda-check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
