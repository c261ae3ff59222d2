"""The paper's core claim at small scale: diffusion in pixel space (f=1) against LDMs with f = 2, 4, 8 on
the captioned-shapes data, each trained with the same compute (the same wall-clock budget on the same
core), then compared on training throughput (samples/s), sampling throughput (images/s) and quality
(Fréchet distance in our shape-feature space, prompt accuracy).

Every model uses the same UNet (the shipped tiny-shapes architecture, only its input/output channels follow
the latent). The f=2, 4, 8 autoencoders are trained here first with one recipe (their time is reported,
not charged to the diffusion budget, as in the paper, where first stages are trained once and reused).
Writes bench/results/latent_factor.json, a table on stdout, and bench/results/latent_factor.svg.

    python bench/latent_factor_bench.py --minutes 10 --prompts 100
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_io import publish  # noqa: E402
from models.autoencoder import AutoencoderConfig  # noqa: E402
from models.train.autoencoder_trainer import AutoencoderTrainConfig, AutoencoderTrainer  # noqa: E402
from models.train.common import load_train_config  # noqa: E402
from models.train.ldm_trainer import LDMTrainConfig, LDMTrainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: first stages: f -> autoencoder config (the shipped f=4 recipe; latent channels grow with f, as in the
#: paper's kl-f* models). All are trained here with the same short recipe, so no factor gets a better one.
FIRST_STAGES = {
    f: AutoencoderConfig(ch=32, ch_mult=mult, num_res_blocks=1, z_channels=c, embed_dim=c, resolution=64,
                         mid_attention=False, norm_groups=4)
    for f, mult, c in ((2, (1, 2), 3), (4, (1, 2, 2), 3), (8, (1, 2, 2, 4), 4))
}
LDM_CONFIG = Path(__file__).parents[1] / "models" / "train" / "configs" / "tiny-shapes-ldm.yaml"


def first_stage(f: int, args: argparse.Namespace, work: Path) -> tuple[str, dict[str, float]]:
    """(autoencoder_path for the LDM trainer, what training it cost and gave)."""
    if f == 1:
        return "pixel", {"psnr": float("inf"), "train_s": 0.0}
    run = work / f"ae-f{f}"
    config = AutoencoderTrainConfig(autoencoder=FIRST_STAGES[f], steps=args.ae_steps, batch_size=12,
                                    lr=5e-4, betas=(0.9, 0.999), disc_start=10**9, eval_every=args.ae_steps,
                                    checkpoint_every=100, sample_every=args.ae_steps, eval_images=64)
    done = run / "train.json"
    if done.is_file():  # trained by an earlier invocation
        return str(run / "autoencoder.safetensors"), json.loads(done.read_text())
    started = time.monotonic()
    metrics = AutoencoderTrainer(config, run).train() | {"train_s": time.monotonic() - started}
    done.write_text(json.dumps(metrics))
    return str(run / "autoencoder.safetensors"), metrics


def train_ldm(f: int, autoencoder: str, args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, float]]:
    base = load_train_config(LDMTrainConfig, LDM_CONFIG)
    channels = 3 if f in (1, 2, 4) else 4
    config = replace(
        base, name=f"bench-f{f}", autoencoder_path=autoencoder, export_autoencoder_path=None,
        unet=replace(base.unet, in_channels=channels, out_channels=channels),
        steps=10**9, time_budget_s=args.minutes * 60, batch_size=args.batch_size, latent_pool=args.pool,
        scale_images=512, checkpoint_every=100, sample_every=10**9, seed=0,
    )
    run = work / f"ldm-f{f}"
    done = run / "train.json"
    if done.is_file():  # trained by an earlier invocation: reuse it (training more would break equal compute)
        return run / "model.safetensors", json.loads(done.read_text())
    checkpoint = run / "checkpoints" / "last.pt"
    if checkpoint.is_file():  # cut after its budget, before export: export only, at its step
        step = int(torch.load(checkpoint, map_location="cpu", weights_only=False)["step"])
        LDMTrainer(replace(config, steps=step), run).train()
        result = {"step": float(step), "samples_per_s": step * config.batch_size / (args.minutes * 60)}
    else:
        result = LDMTrainer(config, run).train()
    done.write_text(json.dumps(result))
    return run / "model.safetensors", result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="diffusion training budget per model")
    parser.add_argument("--factors", default="1,2,4,8", help="downsampling factors to compare")
    parser.add_argument("--ae-steps", type=int, default=1000, help="training steps of each autoencoder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=8000, help="training images encoded once per model")
    parser.add_argument("--prompts", type=int, default=100, help="grammar prompts for accuracy and Fréchet distance")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (dpmpp_2m)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--work", type=Path, default=Path("runs/latent-factor-bench"),
                        help="scratch folder (git-ignored)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latent_factor.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows: list[dict[str, Any]] = []
    for f in (int(x) for x in args.factors.split(",")):
        autoencoder, ae_metrics = first_stage(f, args, args.work)
        model_path, train = train_ldm(f, autoencoder, args, args.work)
        quality = evaluate_model(model_path, args)
        rows.append({"f": f, "latent": latent_shape(f), "ae_psnr": ae_metrics.get("psnr"),
                     "ae_train_s": ae_metrics.get("train_s"), "train_steps": train["step"],
                     "train_samples_per_s": train["samples_per_s"], **quality})
        print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows, args)
    publish({"rows": rows, "minutes_per_model": args.minutes, "prompts": args.prompts,
             "threads": torch.get_num_threads()}, table, args.out)
    write_svg(rows, args.out.with_suffix(".svg"))
    return 0


def latent_shape(f: int) -> str:
    return f"{64 // f}x{64 // f}x{3 if f in (1, 2, 4) else 4}"


def evaluate_model(model_path: Path, args: argparse.Namespace) -> dict[str, float | None]:
    """Sampling throughput (a batch of 8, after a warm-up batch) and the `ldm eval` figures."""
    from models.checkpoints import load_model
    from models.eval.evaluate import evaluate
    from models.eval.prompts import random_prompts
    from models.pipeline import Pipeline, RunSettings, SampleSpec

    pipeline = Pipeline(load_model(model_path))
    prompts = random_prompts(args.prompts, seed=1)
    specs = [SampleSpec(p, "", i, args.guidance) for i, p in enumerate(prompts[:8])]
    settings = RunSettings(steps=args.steps)
    pipeline.txt2img(specs[:2], settings)
    started = time.perf_counter()
    pipeline.txt2img(specs, settings)
    images_per_s = len(specs) / (time.perf_counter() - started)
    report = evaluate(pipeline, prompts, steps=args.steps, guidance=args.guidance, recon_images=64)
    return {"sample_images_per_s": images_per_s, "fd": report.fd, "fd_reference": report.fd_reference,
            "acc_single": report.single_accuracy, "acc_pair": report.pair_accuracy, "recon_psnr": report.recon_psnr}


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ("| f | latent | training samples/s | steps in budget | sampling images/s | Fréchet distance | "
            "prompt accuracy (1 object) | prompt accuracy (2 objects) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['f']} | {r['latent']} | {r['train_samples_per_s']:.1f} | {int(r['train_steps'])} | "
                     f"{r['sample_images_per_s']:.2f} | {r['fd']:.1f} | {100 * r['acc_single']:.0f} % | "
                     f"{100 * r['acc_pair']:.0f} % |")
    return "\n".join(lines) + f"\n\n{args.minutes:g} min of diffusion training per model on one CPU thread."


def write_svg(rows: list[dict[str, Any]], path: Path) -> None:
    """Three small bar charts side by side (no plotting library needed): training throughput, sampling
    throughput, Fréchet distance, one bar per f."""
    panels = [("training samples/s", "train_samples_per_s"), ("sampling images/s", "sample_images_per_s"),
              ("Fréchet distance (lower is better)", "fd"), ("prompt accuracy, 1 object", "acc_single")]
    width, height, pad = 220, 180, 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height + 40}" '
             'font-family="sans-serif" font-size="11">']
    for p, (title, key) in enumerate(panels):
        x0 = p * width
        values = [float(r[key]) for r in rows]
        top = max(values) or 1.0
        parts.append(f'<text x="{x0 + width / 2}" y="14" text-anchor="middle">{title}</text>')
        bar_w = (width - 2 * pad) / max(len(rows), 1)
        for i, (r, v) in enumerate(zip(rows, values, strict=True)):
            h = (height - 40) * v / top
            x = x0 + pad + i * bar_w
            parts.append(f'<rect x="{x + 4:.1f}" y="{height - h:.1f}" width="{bar_w - 8:.1f}" height="{h:.1f}" '
                         f'fill="#4a7fb5"/>')
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - h - 3:.1f}" text-anchor="middle">'
                         f'{v:.3g}</text>')
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height + 14}" text-anchor="middle">f={r["f"]}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
