"""Winograd's F(2x2, 3x3) against oneDNN's direct kernel, one 3x3 convolution at a time, at SD-1.5's shapes.

Where does Winograd pay on this CPU? The policy in models/cpu_inference.py (`balanced`: the UNet's 256 to 640
channels and the autoencoder's of at least 256; `all`: every UNet 3x3 convolution of at least 256 too) rests on these
figures. For each SD-1.5 UNet convolution shape (channels and the map side at 256 and 512 px, batch 2 as with
classifier-free guidance), a few small ones, and the VAE decoder's (one image, its filters transformed on each call,
as the autoencoder's are): the direct convolution prepacked (models/cpu_inference.PackedConv2d) and WinogradConv2d,
timed interleaved (bench/model_bench.py's method: medians over runs not disturbed by other processes), the time ratio,
the extra filter memory and the largest difference from a float64 reference, relative to its largest value.

`--images` adds what each policy does to whole generations: the SD-1.5-size model (random weights, as in
bench/model_bench.py; the parity models of the tests are narrower than Winograd's 256-channel floor, so they never
take it) generates the same prompts (DPM-Solver++ 20 steps, CFG 7.5, 256 px) under each policy, and the images are
compared with those of `off` (no Winograd) pixel by pixel, mean and max |difference| in /255.

A table goes to stdout; the figures to bench/results/winograd_bench.json. Not a test: nothing fails.
    python bench/winograd_bench.py [--runs 15] [--images] [--out bench/results/winograd_bench.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu_modes import QUALITY_PROMPTS  # noqa: E402
from bench.model_bench import build_ours, cpu_model, interleaved  # noqa: E402
from bench.results_io import publish  # noqa: E402
from models.cpu_inference import PackedConv2d  # noqa: E402
from models.names import WINOGRAD_POLICIES  # noqa: E402
from models.pipeline import Pipeline, RunSettings, SampleSpec  # noqa: E402
from models.winograd import BAND_BYTES, WinogradConv2d  # noqa: E402
from tests.helpers import write_clip_tokenizer  # noqa: E402

#: (input channels, output channels, map side): SD-1.5's 3x3 stride-1 UNet convolutions at 256 px (latent 32: levels
#: at 32, 16, 8, 4) and at 512 px (latent 64), the widest input of each kind (the up path's concatenations), small ones
SHAPES = [(320, 320, 32), (640, 640, 16), (1280, 1280, 8), (1280, 1280, 4), (960, 640, 16), (2560, 1280, 8),
          (320, 320, 64), (640, 640, 32), (1280, 1280, 16), (64, 64, 32), (128, 128, 32)]
#: the SD VAE decoder's at 256 px (512 channels from the latent's 32x32 to 128x128, 256 channels at 128x128 and
#: 256x256) and its largest at 512 px: one image, filters transformed on each call
AUTOENCODER_SHAPES = [(512, 512, 32), (512, 512, 64), (512, 512, 128), (256, 256, 128), (256, 256, 256),
                      (512, 512, 256)]


def measure(c_in: int, c_out: int, side: int, runs: int, *, batch: int = 2, per_call: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1).eval().requires_grad_(False)
    x = torch.randn(batch, c_in, side, side).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        direct, winograd = PackedConv2d(conv), WinogradConv2d(conv, per_call=per_call)
        error = float((winograd(x).double() - reference).abs().max() / reference.abs().max())
        del reference
        times = interleaved({"direct": lambda: direct(x), "winograd": lambda: winograd(x)}, runs)
    return {"in": c_in, "out": c_out, "side": side, "batch": batch, "per_call": per_call, "times": times,
            "max_rel_error": error, "ratio": times["winograd"]["median_s"] / times["direct"]["median_s"],
            "extra_filter_mb": 0.0 if per_call else round(c_in * c_out * 7 * 4 / 2**20, 1)}


def image_differences(size: int = 256) -> dict[str, dict[str, float]]:
    """{policy: mean and max |difference| in /255 from `off`'s images} over whole SD-1.5-size generations."""
    with tempfile.TemporaryDirectory() as tmp:
        eager = build_ours(write_clip_tokenizer(Path(tmp) / "tokenizer"))
    specs = [SampleSpec(p, seed=i, guidance_scale=7.5) for i, p in enumerate(QUALITY_PROMPTS)]
    images = {}
    for policy in ("off", *(p for p in WINOGRAD_POLICIES if p != "off")):
        pipeline = Pipeline(copy.deepcopy(eager), winograd=policy)
        with torch.inference_mode():
            out = pipeline.txt2img(specs, RunSettings("dpmpp_2m", 20, size, size)).images
        images[policy] = np.stack([np.asarray(im).astype(np.int16) for im in out])
        del pipeline
    return {policy: {"mean_abs_255": round(float(np.abs(im - images["off"]).mean()), 4),
                     "max_abs_255": int(np.abs(im - images["off"]).max())}
            for policy, im in images.items() if policy != "off"}


def report(data: dict[str, Any]) -> str:
    lines = ["| channels in -> out | map, batch | filters | direct (ms) | Winograd (ms) | Winograd / direct | "
             "extra filter memory (MB) | max relative error |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        t = r["times"]
        lines.append(f"| {r['in']} -> {r['out']} | {r['side']}x{r['side']}, {r['batch']} | "
                     f"{'per call' if r['per_call'] else 'kept'} | {1e3 * t['direct']['median_s']:.2f} | "
                     f"{1e3 * t['winograd']['median_s']:.2f} | **{r['ratio']:.2f}** | {r['extra_filter_mb']} | "
                     f"{r['max_rel_error']:.1e} |")
    if "image_differences" in data:
        lines += ["", "| policy | mean difference from `off` (/255) | max difference (/255) |", "|---|---|---|"]
        lines += [f"| {policy} | {d['mean_abs_255']} | {d['max_abs_255']} |"
                  for policy, d in data["image_differences"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per case after the warm-up (default 15)")
    parser.add_argument("--images", action="store_true",
                        help="also each policy's whole-generation images against `off`'s (SD-1.5 size, 256 px)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "winograd_bench.json")
    args = parser.parse_args()
    rows = [measure(c_in, c_out, side, args.runs) for c_in, c_out, side in SHAPES]
    rows += [measure(c_in, c_out, side, args.runs, batch=1, per_call=True) for c_in, c_out, side in AUTOENCODER_SHAPES]
    data: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "setup": {"runs": args.runs, "dtype": "fp32", "band_bytes": BAND_BYTES}, "rows": rows}
    if args.images:
        data["image_differences"] = image_differences()
        data["setup"]["images"] = (f"SD-1.5 size, random weights, {len(QUALITY_PROMPTS)} prompts, seeds 0-"
                                   f"{len(QUALITY_PROMPTS) - 1}, DPM-Solver++ 20 steps, CFG 7.5, 256 px")
    publish(data, report(data), args.out)


if __name__ == "__main__":
    main()
