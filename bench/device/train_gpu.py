"""Continue tiny-shapes training on a lent GPU machine (stage 2b of the model card).

Usage (here, then on the device machine with `scratch/gpu` carried):
    python bench/device/make_contexts.py
    python3 bench/device/train_gpu.py --train-seconds 360

Runs on the device machine: no MiniLM weights there, so every caption's token states come precomputed
(contexts.safetensors, made here by make_contexts.py) and the conditioner is built without weights.
The pool of shapes images is rendered on the machine's CPU cores in parallel, encoded on the GPU.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: what make_contexts.py writes and `run` carries (git-ignored): contexts.safetensors and pkg/
WORK = REPO / "scratch" / "gpu"
sys.path[:0] = [str(WORK / "pkg"), str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import models.text.minilm  # noqa: E402


def _no_minilm_weights(model: torch.nn.Module, folder: Path) -> None:
    """Zeros instead of the MiniLM weights: every state the run needs comes from contexts.safetensors."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.zero_()


models.text.minilm.load_minilm_weights = _no_minilm_weights

from models.checkpoints import load_model  # noqa: E402
from models.config import to_dict  # noqa: E402
from models.text.base import EncodedPrompts  # noqa: E402
from models.train.common import load_train_config  # noqa: E402
from models.train.data_shapes import ShapesDataset  # noqa: E402
from models.train.ldm_trainer import LatentPool, LDMTrainConfig, LDMTrainer  # noqa: E402

ZOO = REPO / "models/zoo/tiny-shapes/model.safetensors"
CONFIG = REPO / "models/train/configs/tiny-shapes-ldm.yaml"


def render(args: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    torch.set_num_threads(1)
    first, count = args
    images, texts = ShapesDataset(seed=0).batch(first, count)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), texts


class Prerendered:
    def __init__(self, images: torch.Tensor, texts: list[str]) -> None:
        self.images, self.texts = images, texts

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, list[str]]:
        return self.images[first:first + count].float() / 127.5 - 1, self.texts[first:first + count]


class StrictContexts:
    """ContextCache's interface over the precomputed states; an unknown caption is an error, not noise."""

    def __init__(self, path: Path, device: torch.device) -> None:
        with safe_open(str(path), "pt") as fh:
            captions = json.loads(fh.metadata()["captions"])
            context = fh.get_tensor("context").float().to(device)
        self.index = {c: i for i, c in enumerate(captions)}
        self.context = context

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.context[torch.tensor([self.index[t] for t in texts], device=self.context.device)]


def make_trainer(config: LDMTrainConfig, run: Path, pool: LatentPool, contexts: StrictContexts) -> LDMTrainer:
    trainer = LDMTrainer(config, run)
    trainer._pool = lambda: pool  # type: ignore[method-assign]
    trainer.contexts = contexts  # type: ignore[assignment]
    return trainer


def probe(config: LDMTrainConfig, run: Path, pool: LatentPool, contexts: StrictContexts, batch: int,
          steps: int) -> float:
    import dataclasses
    trainer = make_trainer(dataclasses.replace(config, batch_size=batch), run, pool, contexts)
    trainer.pool = pool
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize() if trainer.device.type == "cuda" else None
            t0 = time.perf_counter()
        latents, texts = trainer._batch(i * batch, batch)
        trainer.train_step(latents, texts)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    del trainer
    return dt


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_inference_check(model_path: Path, contexts: StrictContexts, device: str = "cuda",
                        batches: tuple[int, ...] = (1, 16), reps: int = 3,
                        dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")) -> dict[str, object]:
    """fp32 / fp16 / bf16 inference of the trained model on the GPU: agreement and images/s."""
    from models.pipeline import Pipeline, RunSettings, SampleSpec
    prompts = ["a red circle on a black background", "a large blue square", "a small yellow triangle on the left",
               "a green circle and a purple triangle", "an orange square in the center on a gray background",
               "a purple triangle on the top", "a blue circle and a red square on a black background",
               "a large green triangle"]
    report: dict[str, object] = {}
    reference = None
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name in dtypes:
        dtype = named[name]
        model = load_model(model_path, device=device, dtype=dtype)
        assert model.conditioner is not None
        model.conditioner.encode = lambda p, d=dtype: EncodedPrompts(contexts(list(p)).to(d), [])  # type: ignore
        pipe = Pipeline(model)
        specs = [SampleSpec(prompt=p, seed=i, guidance_scale=5.0) for i, p in enumerate(prompts)]
        result = pipe.txt2img(specs, RunSettings(steps=20))
        pixels = torch.stack([torch.from_numpy(np.asarray(im)).float() for im in result.images])
        if reference is None:
            reference = pixels
        entry: dict[str, object] = {"max_abs_diff_vs_fp32_0_255": float((pixels - reference).abs().max()),
                                    "mean_abs_diff_vs_fp32_0_255": float((pixels - reference).abs().mean())}
        for batch in batches:
            batch_specs = [SampleSpec(prompt=prompts[i % 8], seed=i) for i in range(batch)]
            pipe.txt2img(batch_specs, RunSettings(steps=20))
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                pipe.txt2img(batch_specs, RunSettings(steps=20))
            _sync(device)
            entry[f"images_per_s_batch{batch}_20_steps"] = reps * batch / (time.perf_counter() - t0)
        report[name] = entry
        del model, pipe
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    ap.add_argument("--run", type=Path, default=Path("/tmp/tiny-shapes-gpu"))
    ap.add_argument("--train-seconds", type=float, default=330)
    ap.add_argument("--pool", type=int, default=96000)
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", type=Path, help="only the inference check of this model file (here: on cpu)")
    args = ap.parse_args()
    if args.check_only:
        contexts = StrictContexts(WORK / "contexts.safetensors", torch.device(args.device))
        print(json.dumps(gpu_inference_check(args.check_only, contexts, args.device, (2,), 1, ("fp32", "bf16")),
                         indent=2))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.run, ignore_errors=True)
    args.run.mkdir(parents=True)
    summary: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    t_start = time.perf_counter()

    # 1. the pool's images, rendered on all CPU cores before CUDA is touched (fork)
    chunk = 500
    jobs = [(f, min(chunk, args.pool - f)) for f in range(0, args.pool, chunk)]
    with mp.get_context("fork").Pool(args.procs) as workers:
        parts = workers.map(render, jobs)
    images = torch.cat([p[0] for p in parts])
    texts = [t for p in parts for t in p[1]]
    summary["render_s"] = time.perf_counter() - t_start
    print(f"rendered {len(texts)} images in {summary['render_s']:.1f} s", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    zoo = load_model(ZOO)
    ae_path = args.run / "autoencoder.safetensors"
    save_file({k: v.contiguous() for k, v in zoo.autoencoder.state_dict().items()}, str(ae_path),
              metadata={"autoencoder_config": json.dumps(to_dict(zoo.config.autoencoder))})
    scale = zoo.config.scale_factor
    contexts = StrictContexts(WORK / "contexts.safetensors", device)
    missing = sorted(set(texts) - set(contexts.index))
    assert not missing, f"captions without precomputed states: {missing[:5]}"

    base = load_train_config(LDMTrainConfig, CONFIG, {
        "autoencoder_path": str(ae_path), "export_autoencoder_path": str(ae_path), "init_from": str(ZOO),
        "scale_factor": scale, "latent_pool": args.pool, "device": args.device, "mixed_precision": "bf16",
        "sample_every": 10**9, "checkpoint_every": 2000, "log_every": 50, "warmup_steps": 100,
        "ema_decay": 0.9995, "lr": args.lr, "steps": 10**6})
    encoder_model = LDMTrainer(base, args.run / "encode").model
    pool = LatentPool.encode(encoder_model, Prerendered(images, texts), args.pool, base.seed, batch=2000)
    pool.mean, pool.std = pool.mean.to(device), pool.std.to(device)
    del encoder_model
    summary["pool_ready_s"] = time.perf_counter() - t_start
    print(f"pool encoded at {summary['pool_ready_s']:.1f} s", flush=True)

    # 2. the batch size: the larger one when it costs less than 1.4x per step (the model is launch-bound)
    timings = {}
    for b in (int(x) for x in args.batches.split(",")):
        timings[b] = probe(base, args.run / f"probe-{b}", pool, contexts, b, args.probe_steps)
        print(f"batch {b}: {timings[b] * 1000:.1f} ms/step", flush=True)
    sizes = sorted(timings)
    batch = sizes[0]
    for b in sizes[1:]:
        if timings[b] < 1.4 * timings[batch]:
            batch = b
    steps = max(10, int(args.train_seconds / timings[batch]))
    summary.update({"probe_ms_per_step": {b: t * 1000 for b, t in timings.items()}, "batch": batch,
                    "steps": steps})
    print(f"training {steps} steps of batch {batch}", flush=True)

    import dataclasses
    config = dataclasses.replace(base, batch_size=batch, steps=steps, lr_decay_start=steps // 2,
                                 time_budget_s=args.train_seconds * 1.1)
    run = args.run / "run"
    trainer = make_trainer(config, run, pool, contexts)
    t0 = time.perf_counter()
    result = trainer.train()
    summary["train_s"] = time.perf_counter() - t0
    summary["result"] = result
    summary["total_s"] = time.perf_counter() - t_start
    summary["device_name"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    model_file = run / "model.safetensors"
    data = model_file.read_bytes()
    piece = 15 * 2**20
    for i in range(0, len(data), piece):
        (args.out / f"model.part{i // piece}").write_bytes(data[i:i + piece])
    for name in ("log.csv", "config.yaml"):
        shutil.copy(run / name, args.out / name)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str), flush=True)

    if not args.skip_check and device.type == "cuda":
        try:
            summary["inference"] = gpu_inference_check(model_file, contexts)
        except Exception:  # the trained model is already out: a failed check must not lose it
            summary["inference_error"] = traceback.format_exc()
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(summary.get("inference", summary.get("inference_error")), indent=2), flush=True)


if __name__ == "__main__":
    main()
