"""Train the shapes-{class,uncond,semantic,layout} models side by side on one lent GPU (issue 7).

Each config runs in its own process (a small model leaves the GPU mostly idle between kernel launches, so
several share it well) for a fixed time, at a large batch; each exports its EMA model, and the non-first-stage
tensors come back in fp16 (the lent machine returns at most 64 MiB; the first stage is the shipped
tiny-shapes one, put back by `assemble`). Needs `scratch/gpu/pkg` (bench/device/make_contexts.py) carried:
the configs read their first stage from the tiny-shapes file, whose MiniLM conditioner has no weights there.

    python3 bench/device/train_conditions.py --seconds 130                  # on the device machine
    python bench/device/train_conditions.py --assemble DIR --into runs/     # here, on what came back
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from train_gpu import REPO  # noqa: E402  (also replaces the MiniLM weights by zeros)

FIRST_STAGE = "first_stage_model."
CONFIGS = REPO / "models" / "train" / "configs"


def train_one(name: str, out: Path, seconds: float, batch: int, pool: int, device: str) -> None:
    import train_gpu  # noqa: F401  (the MiniLM patch, in this spawned process too)

    from models.train.common import load_train_config
    from models.train.ldm_trainer import LDMTrainConfig, LDMTrainer

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log = out / f"{name}.log"
    try:
        config = load_train_config(LDMTrainConfig, CONFIGS / f"{name}.yaml", {
            "device": device, "batch_size": batch, "steps": 10**6, "time_budget_s": seconds, "latent_pool": pool,
            "ema_decay": 0.999, "warmup_steps": 100, "checkpoint_every": 10**9, "sample_every": 10**9,
            "log_every": 50, "mixed_precision": "bf16"})
        run = Path("/tmp/conditions") / name
        started = time.perf_counter()
        trainer = LDMTrainer(config, run)
        result = trainer.train()
        path = run / "model.safetensors"
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(FIRST_STAGE)}  # noqa: SIM118
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
                  str(out / f"{name}.safetensors"), metadata=metadata)
        summary = {"result": result, "seconds": time.perf_counter() - started, "batch": batch, "pool": pool}
        log.write_text(json.dumps(summary, default=str))
    except Exception:
        log.write_text(traceback.format_exc())


def assemble(folder: Path, into: Path) -> None:
    """fp16 parts that came back + the tiny-shapes first stage -> runs/<name>/model.safetensors (fp32)."""
    from models.checkpoints import read_state_dict

    first_stage = {k: v for k, v in read_state_dict(REPO / "models/zoo/tiny-shapes/model.safetensors")[0].items()
                   if k.startswith(FIRST_STAGE)}
    for part in sorted(folder.glob("shapes-*.safetensors")):
        with safe_open(str(part), "pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()} | first_stage
        target = into / part.stem / "model.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=metadata)
        print(f"wrote {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default="shapes-class,shapes-uncond,shapes-semantic,shapes-layout")
    ap.add_argument("--seconds", type=float, default=130, help="training time of each model")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--pool", type=int, default=16000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    ap.add_argument("--assemble", type=Path, help="here: assemble the files that came back in this folder")
    ap.add_argument("--into", type=Path, default=REPO / "runs")
    args = ap.parse_args()
    if args.assemble:
        assemble(args.assemble, args.into)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=train_one, args=(n, args.out, args.seconds, args.batch, args.pool, args.device))
             for n in args.names.split(",")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    for n in args.names.split(","):
        log = args.out / f"{n}.log"
        print(n, log.read_text()[-2000:] if log.is_file() else "no log", flush=True)


if __name__ == "__main__":
    main()
