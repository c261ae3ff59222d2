"""Plots of the service and load benchmarks, drawn from their committed JSON (bench/results/) with PIL alone
(matplotlib is not a dependency), placed beside their tables in docs/:

    python bench/plots.py            # docs/service_bench.png, docs/service_bench_tiny-sd.png, docs/load_bench.png

`service_bench.py --plot` and `load_bench.py --plot` draw their own after a run. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
PANEL_W, PANEL_H = 360, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 56, 14, 30, 44
INK, GRID, WHITE = (30, 30, 30), (225, 225, 225), (255, 255, 255)
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[float]
    colour: tuple[int, int, int]
    dashed: bool = False


def _nice_top(value: float) -> float:
    """A round axis maximum at or above `value`."""
    if value <= 0:
        return 1.0
    step = 10 ** int(f"{value:e}".split("e")[1])
    for mult in (1, 2, 2.5, 5, 10):
        if value <= mult * step:
            return mult * step
    return 10 * step


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1000 else f"{value:,.0f}"


class Panel:
    """One chart in a figure: title, a y axis from 0 (or given bounds), categories along x."""

    def __init__(self, image: Image.Image, origin: tuple[int, int], title: str, ylabel: str,
                 categories: Sequence[str], xlabel: str, top: float, bottom: float = 0.0) -> None:
        self.draw, self.font = ImageDraw.Draw(image), ImageFont.load_default()
        x, y = origin
        self.left, self.right = x + MARGIN_L, x + PANEL_W - MARGIN_R
        self.top_px, self.bottom_px = y + MARGIN_T, y + PANEL_H - MARGIN_B
        self.categories, self.low, self.high = list(categories), bottom, _nice_top(top)
        self.draw.text((x + MARGIN_L, y + 8), f"{title} ({ylabel})" if ylabel else title, fill=INK, font=self.font)
        for k in range(5):
            value = self.low + (self.high - self.low) * k / 4
            py = self.y(value)
            self.draw.line([(self.left, py), (self.right, py)], fill=GRID)
            self.draw.text((x + 6, py - 6), _label(round(value, 6)), fill=INK, font=self.font)
        self.draw.line([(self.left, self.top_px), (self.left, self.bottom_px), (self.right, self.bottom_px)], fill=INK)
        for i, name in enumerate(self.categories):
            width = self.draw.textlength(name, font=self.font)
            self.draw.text((self.x(i) - width / 2, self.bottom_px + 6), name, fill=INK, font=self.font)
        width = self.draw.textlength(xlabel, font=self.font)
        self.draw.text(((self.left + self.right - width) / 2, self.bottom_px + 24), xlabel, fill=INK, font=self.font)

    def x(self, i: float) -> float:
        n = max(1, len(self.categories))
        return self.left + (self.right - self.left) * (i + 0.5) / n

    def y(self, value: float) -> float:
        frac = (value - self.low) / (self.high - self.low)
        return self.bottom_px - (self.bottom_px - self.top_px) * min(max(frac, 0.0), 1.0)

    def lines(self, series: Sequence[Series]) -> None:
        for s in series:
            points = [(self.x(i), self.y(v)) for i, v in enumerate(s.values)]
            if s.dashed:
                for a, b in zip(points, points[1:], strict=False):
                    for t in range(0, 10, 2):
                        p0 = (a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10)
                        p1 = (a[0] + (b[0] - a[0]) * (t + 1) / 10, a[1] + (b[1] - a[1]) * (t + 1) / 10)
                        self.draw.line([p0, p1], fill=s.colour, width=2)
            else:
                self.draw.line(points, fill=s.colour, width=2)
            for px, py in points:
                self.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=s.colour)
        self.legend(series)

    def bars(self, series: Sequence[Series]) -> None:
        slot = (self.right - self.left) / max(1, len(self.categories))
        width = slot * 0.7 / len(series)
        for j, s in enumerate(series):
            for i, v in enumerate(s.values):
                x0 = self.x(i) - slot * 0.35 + j * width
                self.draw.rectangle([x0, self.y(v), x0 + width - 2, self.bottom_px], fill=s.colour)
                text = _label(round(v, 3))
                tw = self.draw.textlength(text, font=self.font)
                self.draw.text((x0 + (width - 2 - tw) / 2, self.y(v) - 12), text, fill=INK, font=self.font)
        if len(series) > 1:
            self.legend(series, left=True)

    def legend(self, series: Sequence[Series], *, left: bool = False) -> None:
        y = self.top_px + 4
        for s in series:
            width = self.draw.textlength(s.label, font=self.font)
            x = self.left + 6 if left else self.right - width - 22
            self.draw.rectangle([x - 2, y - 1, x + width + 20, y + 11], fill=WHITE)
            self.draw.line([(x, y + 5), (x + 14, y + 5)], fill=s.colour, width=1 if s.dashed else 3)
            self.draw.text((x + 18, y), s.label, fill=INK, font=self.font)
            y += 14


def _figure(panels: int, title: str) -> tuple[Image.Image, list[tuple[int, int]]]:
    image = Image.new("RGB", (PANEL_W * panels, PANEL_H + 22), WHITE)
    ImageDraw.Draw(image).text((8, 6), title, fill=INK, font=ImageFont.load_default())
    return image, [(PANEL_W * k, 22) for k in range(panels)]


def service_figure(data: dict[str, Any]) -> Image.Image:
    """Throughput and latency against concurrency, batching on and off (`service_bench.py`'s JSON)."""
    results = data["results"]
    levels = sorted(results["batching"], key=int)
    modes = (("batching", "batching on", COLOURS[0]), ("no_batching", "batching off", COLOURS[1]))
    setup = data["setup"]
    image, origins = _figure(2, f"Service benchmark: {setup['model']}, {setup['steps']} steps, "
                                f"{setup['requests_per_level']} requests per level, {setup['cpu_cores']} CPU cores")
    cats = [str(c) for c in levels]
    rate = max(results[m][c]["throughput_rps"] for m, _, _ in modes for c in levels)
    Panel(image, origins[0], "throughput", "img/s", cats, "concurrent clients", rate).lines(
        [Series(label, [results[m][c]["throughput_rps"] for c in levels], colour) for m, label, colour in modes])
    slowest = max(results[m][c]["p99_s"] for m, _, _ in modes for c in levels)
    Panel(image, origins[1], "latency (solid p50, dashed p99)", "seconds", cats, "concurrent clients",
          slowest).lines(
        [s for m, label, colour in modes for s in (
            Series(f"{label} p50", [results[m][c]["p50_s"] for c in levels], colour),
            Series(f"{label} p99", [results[m][c]["p99_s"] for c in levels], colour, dashed=True))])
    return image


def load_figure(data: dict[str, Any]) -> Image.Image:
    """Rates, answers' latency, and both processes' memory over the jobs (`load_bench.py`'s JSON)."""
    capacity, overload, memory, setup = data["capacity"], data["overload"], data["memory"], data["setup"]
    image, origins = _figure(3, f"Load benchmark: {setup['model']} {setup['size']}x{setup['size']}, "
                                f"{setup['steps']} steps, queue depth {setup['queue_depth']}, offered "
                                f"{setup['factor']:g}x capacity for {setup['duration_s']:g} s")
    rates = [capacity["images_per_s"], overload["offered_per_s"], overload["accepted_per_s"]]
    Panel(image, origins[0], "rates", "per second", ["capacity", "offered", "accepted"], "", max(rates)).bars(
        [Series("", rates, COLOURS[0])])
    waits = [overload["accepted_p50_s"], overload["accepted_p99_s"], overload["accepted_max_s"]]
    shed = [0.0, overload["shed_p99_s"], overload["shed_max_s"]]
    Panel(image, origins[1], f"latency ({overload['answers'].get('200', 0)} x 200, "
          f"{overload['answers'].get('429', 0)} x 429)", "seconds", ["p50", "p99", "max"], "",
          max(waits + [overload["queue_wait_bound_s"]])).bars(
        [Series("200 (image)", waits, COLOURS[0]), Series("429 (shed)", shed, COLOURS[1])])
    samples = [s for s in memory["samples_s_jobs_api_mb_worker_mb"] if s[1] >= memory["from_job"]]
    picks = [samples[round(i * (len(samples) - 1) / 6)] for i in range(7)]
    api0, worker0 = memory["api"]["rss_mb_after_warmup"], memory["worker"]["rss_mb_after_warmup"]
    growth = [[100 * (p[2] / api0 - 1) for p in picks], [100 * (p[3] / worker0 - 1) for p in picks]]
    Panel(image, origins[2], f"RSS after warm-up: API {api0:g} MB, worker {worker0:g} MB", "% growth",
          [str(p[1]) for p in picks], "jobs run", max(max(g) for g in growth)).lines(
        [Series("API", growth[0], COLOURS[0]), Series("worker", growth[1], COLOURS[2])])
    return image


def write(figure: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, optimize=True)
    return path


def plot_service(json_path: Path, out: Path | None = None) -> Path:
    suffix = json_path.stem.removeprefix("service_bench")
    return write(service_figure(json.loads(json_path.read_text())), out or DOCS / f"service_bench{suffix}.png")


def plot_load(json_path: Path, out: Path | None = None) -> Path:
    return write(load_figure(json.loads(json_path.read_text())), out or DOCS / "load_bench.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmarks' JSON")
    args = parser.parse_args(argv)
    for path in sorted(args.results.glob("service_bench*.json")):
        print(plot_service(path))
    print(plot_load(args.results / "load_bench.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
