"""What unmerged per-sample LoRA costs on the CPU: one UNet evaluation of a batch without adapters, with
one adapter for every sample, and with a different adapter per sample (one group each).

Random rank-R kohya LoRAs on every UNet layer (attention, feed-forward, projections, LoCon convs) of an
SD v1-structured model with random weights; median of --runs UNet calls after a warm-up. Not a test.

    python bench/lora_bench.py [--model-channels 64] [--batch 4] [--size 64] [--rank 8] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.autoencoder import AutoencoderConfig  # noqa: E402
from models.conditioners import ConditionerConfig  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.cpu_inference import optimize_for_cpu_inference  # noqa: E402
from models.ldm import LatentDiffusion  # noqa: E402
from models.lora import AdapterSet, adapters_applied, load_lora, target_names  # noqa: E402
from models.text.clip import CLIPTextConfig  # noqa: E402
from models.unet import UNetConfig  # noqa: E402


def random_lora(model: LatentDiffusion, path: Path, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, ours in target_names(model).items():
        if not name.startswith(("lora_unet_down_blocks", "lora_unet_mid_block_", "lora_unet_up_blocks")):
            continue
        weight = model.get_submodule(ours).weight
        kernel = tuple(weight.shape[2:])
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], *kernel, generator=g) * 0.01
        sd[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *((1, 1) if kernel else ()), generator=g)
    save_file(sd, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="pixels (latent = size / 8)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    clip = CLIPTextConfig(hidden_size=768, num_layers=1)
    config = ModelConfig(name="bench", family="sd_v1", unet=UNetConfig(model_channels=args.model_channels),
                         autoencoder=AutoencoderConfig(ch=32), conditioner=ConditionerConfig(kind="clip", clip=clip))
    model = optimize_for_cpu_inference(LatentDiffusion(config).eval().requires_grad_(False))
    assert isinstance(model, LatentDiffusion)
    with tempfile.TemporaryDirectory() as tmp:
        loras = [load_lora(random_lora(model, Path(tmp) / f"{i}.safetensors", args.rank, i), model)
                 for i in range(args.batch)]
    n, latent = args.batch, args.size // 8
    x = torch.randn(n, 4, latent, latent).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.full((n,), 500.0), torch.randn(n, 77, 768)
    cases: dict[str, list[AdapterSet]] = {
        "no adapters": [() for _ in range(n)],
        "one adapter, every sample": [((loras[0], 1.0),) for _ in range(n)],
        f"{n} adapters, one per sample": [((lora, 1.0),) for lora in loras],
    }
    for label, per_sample in cases.items():
        times = []
        with torch.inference_mode():
            for run in range(args.runs + 1):
                start = time.perf_counter()
                with adapters_applied(model, per_sample):
                    model.unet(x, t, ctx)
                if run:
                    times.append(time.perf_counter() - start)
        print(f"{label:32s} {statistics.median(times) * 1000:8.1f} ms per UNet call (batch {n}, "
              f"{latent}x{latent} latent, rank {args.rank}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
