"""Evaluate a text-to-image model on the shapes grammar: prompt accuracy (by the judge), Fréchet
distance in ShapeFeatureNet space, and the autoencoder's reconstruction PSNR.

The Fréchet reference is real renders *of the same prompts* (`scene_for_prompt`), so a perfect model
scores like a second real set; `fd_reference` is exactly that (real vs real at the same N), the floor
an FD figure should be read against, since FD at a few hundred samples is biased upwards.
Samplers are compared at equal steps on the same prompts and seeds (`compare_samplers`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.eval.features import ShapeFeatureNet, extract_features, frechet_distance, load_feature_net
from models.eval.judge import as_array, judge
from models.eval.prompts import parse_prompt, scene_for_prompt
from models.ldm import LatentDiffusion
from models.names import SamplerName
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.train.data_shapes import render, scene_at, to_model_tensor

#: the diffusion model's held-out stream (models/train/data.py: shapes seed 0 trains, seed + 1 is held out)
HELDOUT_STREAM = 1
#: where the real Fréchet reference scenes are drawn (per prompt i: rng [REFERENCE_SEED, i])
REFERENCE_SEED = 7
#: the same signature as `Pipeline.txt2img(specs, settings)`, images out: any generator can be evaluated
GenerateFn = Callable[[Sequence[SampleSpec], RunSettings], Sequence[np.ndarray | Image.Image]]
ATTRIBUTES = ("colour", "shape", "size", "position", "background", "count")


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    seed: int
    pair: bool
    correct: bool
    attributes: dict[str, bool]


@dataclass
class EvalReport:
    """All figures of one evaluation run; accuracies are fractions in [0, 1], None where nothing counted."""

    sampler: str
    steps: int
    guidance: float
    n: int
    accuracy: float
    single_accuracy: float | None
    pair_accuracy: float | None
    #: attribute -> accuracy over the prompts that ask for it, all / single-object / two-object prompts
    attribute_accuracy: dict[str, float]
    single_attribute_accuracy: dict[str, float]
    pair_attribute_accuracy: dict[str, float]
    fd: float | None  # generated vs real renders of the same prompts
    fd_reference: float | None  # real vs real, same prompts and N: FD's floor at this N
    recon_psnr: float | None  # dB, autoencoder round trip of held-out renders, [0, 1] scale
    seconds: float
    results: list[PromptResult]
    images: list[np.ndarray] = field(repr=False, default_factory=list)


def pipeline_generator(pipeline: Pipeline) -> GenerateFn:
    """A GenerateFn that runs the pipeline's txt2img."""

    def generate(specs: Sequence[SampleSpec], settings: RunSettings) -> list[Image.Image]:
        return pipeline.txt2img(specs, settings).images

    return generate


def evaluate(target: Pipeline | GenerateFn, prompts: Sequence[str], *, sampler: SamplerName = "dpmpp_2m",
             steps: int = 20, guidance: float = 7.5, seed: int = 0, batch_size: int = 16,
             feature_net: ShapeFeatureNet | None = None, recon_images: int = 64,
             reference: np.ndarray | None = None, progress: bool = True) -> EvalReport:
    """Generate one image per prompt (prompt i with seed `seed + i`, in batches), judge each, and
    measure FD and (for a Pipeline, `recon_images` > 0) the autoencoder's PSNR.

    `reference`: features of real renders of the prompts from an earlier call (`reference_features`),
    to share them between runs on the same prompts.
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    specs = [parse_prompt(p) for p in prompts]  # every prompt must be in the grammar, before any work
    net = feature_net if feature_net is not None else load_feature_net()
    start = time.perf_counter()
    generate = pipeline_generator(target) if isinstance(target, Pipeline) else target
    settings = RunSettings(sampler=sampler, steps=steps)
    images: list[np.ndarray] = []
    for first in tqdm(range(0, len(prompts), batch_size), desc=f"generate ({sampler}, {steps} steps)",
                      unit="batch", disable=not progress):
        chunk = prompts[first : first + batch_size]
        batch = [SampleSpec(p, "", seed + first + k, guidance) for k, p in enumerate(chunk)]
        out = list(generate(batch, settings))
        if len(out) != len(batch):
            raise ValueError(f"the generator returned {len(out)} images for {len(batch)} prompts")
        images += [as_array(im) for im in out]
    results = []
    for i, (prompt, spec, image) in enumerate(zip(prompts, specs, images, strict=True)):
        verdict = judge(image, spec)
        results.append(PromptResult(prompt, seed + i, spec.is_pair, verdict.correct, verdict.attributes()))
    fd = fd_ref = None
    if len(prompts) >= 2:
        real = reference_features(prompts, net) if reference is None else reference
        fd = frechet_distance(extract_features(net, np.stack(images)), real)
        fd_ref = frechet_distance(reference_features(prompts, net, REFERENCE_SEED + 1), real)
    model = target.model if isinstance(target, Pipeline) else None
    psnr = reconstruction_psnr(model, recon_images, batch_size) if model is not None and recon_images > 0 else None
    return _report(sampler, steps, guidance, results, images, fd, fd_ref, psnr, time.perf_counter() - start)


def _report(sampler: str, steps: int, guidance: float, results: list[PromptResult], images: list[np.ndarray],
            fd: float | None, fd_ref: float | None, psnr: float | None, seconds: float) -> EvalReport:
    single = [r for r in results if not r.pair]
    pair = [r for r in results if r.pair]
    return EvalReport(
        sampler, steps, guidance, len(results), _mean([r.correct for r in results]) or 0.0,
        _mean([r.correct for r in single]), _mean([r.correct for r in pair]),
        _attribute_means(results), _attribute_means(single), _attribute_means(pair),
        fd, fd_ref, psnr, round(seconds, 2), results, images)


def _mean(values: Sequence[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def _attribute_means(results: Sequence[PromptResult]) -> dict[str, float]:
    out = {}
    for name in ATTRIBUTES:
        asked = [r.attributes[name] for r in results if name in r.attributes]
        if asked:
            out[name] = float(np.mean(asked))
    return out


def reference_images(prompts: Sequence[str], seed: int = REFERENCE_SEED) -> np.ndarray:
    """A real render of each prompt, uint8 [N, 64, 64, 3]: prompt i drawn with rng [seed, i]."""
    return np.stack([render(scene_for_prompt(parse_prompt(p), np.random.default_rng([seed, i])))
                     for i, p in enumerate(prompts)])


def reference_features(prompts: Sequence[str], net: ShapeFeatureNet, seed: int = REFERENCE_SEED) -> np.ndarray:
    """Features of `reference_images(prompts, seed)`."""
    return extract_features(net, reference_images(prompts, seed))


@torch.inference_mode()
def reconstruction_psnr(model: LatentDiffusion, n: int = 64, batch_size: int = 16,
                        stream: int = HELDOUT_STREAM) -> float:
    """Mean PSNR (dB, images on [0, 1]) of encode -> decode (posterior mode) over `n` held-out renders."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    values: list[float] = []
    for first in range(0, n, batch_size):
        indices = range(first, min(n, first + batch_size))
        real = torch.stack([to_model_tensor(render(scene_at(stream, i))) for i in indices])
        latents = model.encode_images(real.to(model.device, model.dtype))
        recon = model.decode_latents(latents).float().cpu().clamp(-1, 1)
        mse = ((recon - real) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values += (10 * torch.log10(1 / mse)).tolist()
    return float(np.mean(values))


def compare_samplers(target: Pipeline | GenerateFn, prompts: Sequence[str], samplers: Sequence[SamplerName], *,
                     steps: int = 20, feature_net: ShapeFeatureNet | None = None, recon_images: int = 64,
                     **kwargs: object) -> list[EvalReport]:
    """`evaluate` once per sampler at the same steps, prompts and seeds; the real reference features and
    the autoencoder PSNR (sampler-independent) are computed once. kwargs go to `evaluate`."""
    if not samplers:
        raise ValueError("compare_samplers needs at least one sampler")
    net = feature_net if feature_net is not None else load_feature_net()
    reference = reference_features(prompts, net) if len(prompts) >= 2 else None
    reports: list[EvalReport] = []
    for i, name in enumerate(samplers):
        report = evaluate(target, prompts, sampler=name, steps=steps, feature_net=net, reference=reference,
                          recon_images=recon_images if i == 0 else 0, **kwargs)  # type: ignore[arg-type]
        reports.append(replace(report, recon_psnr=reports[0].recon_psnr) if reports else report)
    return reports


def format_table(reports: Sequence[EvalReport]) -> str:
    """One row per report: accuracies in %, FD (and its real-vs-real floor), PSNR."""
    head = ["sampler", "steps", "acc", "single", "pair", *ATTRIBUTES, "FD", "FD ref", "PSNR", "sec"]
    rows = [head]
    for r in reports:
        attrs = [_pct(r.attribute_accuracy.get(a)) for a in ATTRIBUTES]
        rows.append([r.sampler, str(r.steps), _pct(r.accuracy), _pct(r.single_accuracy), _pct(r.pair_accuracy),
                     *attrs, _num(r.fd), _num(r.fd_reference), _num(r.recon_psnr), f"{r.seconds:.1f}"])
    return aligned(rows)


def aligned(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: cells right-aligned to their column's widest, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


class Report(Protocol):
    """What `write_report` needs of a report (EvalReport here, TaskReport in models/eval/conditions.py)."""

    sampler: str
    images: list[np.ndarray]

    @property
    def results(self) -> Sequence[Any]: ...


def report_json(report: Report) -> dict[str, object]:
    """Every figure and per-item verdict of a report (a dataclass); not the images (they go to the grid)."""
    return {f.name: [asdict(r) for r in report.results] if f.name == "results" else getattr(report, f.name)
            for f in fields(report) if f.name != "images"}  # type: ignore[arg-type]


def write_report(reports: Report | Sequence[Report], out_dir: Path) -> list[Path]:
    """report.json (one report, or {"reports": [...]} for several) and a grid per report: grid.png, or
    grid-<sampler>.png for several. Tiles are framed green (judged correct) or red."""
    many = isinstance(reports, Sequence)
    items: list[Report] = list(reports) if isinstance(reports, Sequence) else [reports]
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"reports": [report_json(r) for r in items]} if many else report_json(items[0])
    written = [out_dir / "report.json"]
    written[0].write_text(json.dumps(payload, indent=2) + "\n")
    for r in items:
        if r.images:
            path = out_dir / (f"grid-{r.sampler}.png" if many else "grid.png")
            grid(r.images, [res.correct for res in r.results]).save(path)
            written.append(path)
    return written


def grid(images: Sequence[np.ndarray], correct: Sequence[bool] | None = None, columns: int = 16,
         frame: int = 2) -> Image.Image:
    """Images [S, S, 3] tiled row by row, each framed green (correct) or red (wrong), gray if unknown."""
    if not images:
        raise ValueError("no images to tile")
    size = images[0].shape[0]
    tile = size + 2 * frame
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    canvas = np.full((rows * tile, columns * tile, 3), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = (i // columns) * tile, (i % columns) * tile
        colour = (128, 128, 128) if correct is None else (40, 170, 60) if correct[i] else (220, 40, 40)
        canvas[y : y + tile, x : x + tile] = colour
        canvas[y + frame : y + frame + size, x + frame : x + frame + size] = image
    return Image.fromarray(canvas)
