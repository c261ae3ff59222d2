"""PNG encoding of a batch of 512x512 images: one by one against the worker's PNG threads (service/worker/runner.py
`Runner.submit_png`).

A worker encodes every image it makes (PIL's level 6, with the generation parameters as text chunks). At 512 px that
is ~0.1 s of one core per image, so a batch of 32 one by one takes about as long as its whole generation on an H200
(docs/benchmarks.md, GPU): the service would lose half the GPU's throughput to it. zlib releases the GIL, so the
runner encodes a batch on min(8, cores) threads. This measures both ways on this machine, medians of `--runs`, with
images like generations (smooth colour fields with edges and some noise, not flat colour nor white noise).

    python bench/png_bench.py [--images 32] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_io import publish  # noqa: E402
from models.images import encode_png  # noqa: E402
from service.worker.runner import png_threads  # noqa: E402

PARAMETERS = {"task": "txt2img", "model": "sd-v1", "prompt": "a photograph of an astronaut riding a horse",
              "seed": 0, "steps": 20, "sampler": "dpmpp_2m", "guidance_scale": 7.5, "width": 512, "height": 512}


def images(n: int, size: int = 512) -> list[Image.Image]:
    """Generation-like test images: blurred random colour fields, a few shapes, mild noise."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[:size, :size]
        for _ in range(3):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(30, 120)]
            field[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        field += rng.normal(0, 3, field.shape)
        out.append(Image.fromarray(field.clip(0, 255).astype(np.uint8)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "png_bench.json")
    args = parser.parse_args()
    batch = images(args.images)
    threads = png_threads()
    pool = ThreadPoolExecutor(threads)
    ways = {"one by one": lambda: [encode_png(im, PARAMETERS) for im in batch],
            f"PNG threads ({threads})": lambda: list(pool.map(lambda im: encode_png(im, PARAMETERS), batch))}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.runs):  # interleaved
        for name, encode in ways.items():
            began = time.perf_counter()
            pngs = encode()
            times[name].append(time.perf_counter() - began)
    assert pngs == ways["one by one"](), "the threads' PNGs differ from the one-by-one PNGs"
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["one by one"]
    rows = [f"| {name} | {m:.3f} | {1000 * m / args.images:.1f} | {base / m:.2f}x |" for name, m in medians.items()]
    table = "\n".join([f"| {args.images} images of 512x512, PIL level 6 | batch (s) | per image (ms) | speed-up |",
                       "|---|---|---|---|", *rows]) + (
        f"\n\n{os.cpu_count()} cores; mean PNG {np.mean([len(p) for p in pngs]) / 1024:.0f} KiB; "
        f"median of {args.runs} interleaved runs.")
    publish({"cores": os.cpu_count(), "threads": threads, "images": args.images, "runs_s": times,
             "median_s": medians, "mean_png_bytes": float(np.mean([len(p) for p in pngs]))}, table, args.out)


if __name__ == "__main__":
    main()
