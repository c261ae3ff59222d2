"""`ldm eval --task class|unconditional|semantic|layout`: the paper's other conditionings scored on held-out
conditions of the shapes data, by the judge's image analysis (models/eval/judge.py) and a Fréchet distance.

Held-out conditions are the scenes of the diffusion models' held-out stream (data_shapes stream 1; its
single-object scenes for class and unconditional, as those models are trained on single objects): each
scene's class, layout or label map is the condition, and its render is the real image. Per task (issue 7's
targets in brackets):

- class: the image holds one object, of the asked colour and shape (right colour and shape >= 95 %); colour,
  shape (of the largest object of the asked colour, else of the largest) and count are reported apart.
- semantic: per asked object (its region of the label map), the generated object that overlaps the region
  most: the IoU of region and object mask (>= 0.8), and the object's colour (right >= 95 %).
- layout: per box, the generated object whose box overlaps it most: box IoU >= 0.7 with the right colour
  and shape (>= 85 %). An object's box is the judge's soft measurement (centre +- extent / 2).
- unconditional: FD to the real renders (within 2x of the class-conditional model's at the same N), and how
  many samples the judge reads as one well-formed object (a known shape) on a known background.

Every task reports the FD between its images and the real renders of its conditions, and the real-vs-real
floor at the same N (another held-out stream); for class and unconditional the real set is the same, so
their FDs compare directly. On the real renders themselves every criterion scores 100 % (`evaluate_task`
with `real_images`; tests/unit/test_shape_conditions.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.conditioning import label_map_image, layout_to_json
from models.eval.evaluate import HELDOUT_STREAM, REFERENCE_SEED, aligned
from models.eval.features import ShapeFeatureNet, extract_features, frechet_distance, load_feature_net
from models.eval.judge import BACKGROUND_TOLERANCE, DetectedObject, SceneAnalysis, analyse, as_array
from models.names import CONDITION_TASKS, DEFAULT_GUIDANCE, ConditionTask, SamplerName
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.train.data_shapes import (
    CLASS_NAMES,
    IMAGE_SIZE,
    LABEL_PALETTE,
    PAIR_PROBABILITY,
    Scene,
    class_id,
    label_map,
    render,
    scene_at,
    scene_class,
    scene_layout,
)

SEMANTIC_IOU = 0.8
LAYOUT_IOU = 0.7
#: (scenes, specs, settings) -> one image per scene: any generator can be evaluated, real renders included
TaskGenerateFn = Callable[[Sequence[Scene], Sequence[SampleSpec], RunSettings], Sequence[np.ndarray | Image.Image]]


@dataclass(frozen=True)
class ObjectScore:
    """One asked object (a class, a region of the map, a box) against the generated object matched to it."""

    label: str
    found: bool
    iou: float  # semantic: mask IoU; layout: box IoU; class: 1.0 when found
    colour: bool
    shape: bool
    correct: bool


@dataclass(frozen=True)
class ItemResult:
    index: int
    seed: int
    condition: str
    correct: bool  # every asked object correct (unconditional: one well-formed object)
    count: bool  # as many objects as asked, no extra ones
    objects: tuple[ObjectScore, ...]


@dataclass
class TaskReport:
    """Figures of one run; fractions in [0, 1]. `accuracy` is the issue's headline criterion: per image for
    class and unconditional, per object for semantic and layout (`image_accuracy`: all objects right)."""

    task: str
    sampler: str
    steps: int
    guidance: float
    n: int
    accuracy: float
    image_accuracy: float
    metrics: dict[str, float]
    fd: float | None
    fd_reference: float | None
    seconds: float
    results: list[ItemResult]
    images: list[np.ndarray] = field(repr=False, default_factory=list)


def pair_probability(task: ConditionTask) -> float:
    """Class and unconditional models train and are judged on single-object scenes."""
    return 0.0 if task in ("class", "unconditional") else PAIR_PROBABILITY


def heldout_scenes(task: ConditionTask, n: int, stream: int = HELDOUT_STREAM) -> list[Scene]:
    """The first `n` scenes of a held-out stream, as the task's models see data."""
    return [scene_at(stream, i, pair_probability=pair_probability(task)) for i in range(n)]


def pipeline_task_generator(pipeline: Pipeline, task: ConditionTask) -> TaskGenerateFn:
    """A TaskGenerateFn that conditions the pipeline on each scene's class, layout or label map."""

    def generate(scenes: Sequence[Scene], specs: Sequence[SampleSpec], settings: RunSettings) -> list[Image.Image]:
        if task == "class":
            labels: list[int | str] = [int(scene_class(s)) for s in scenes]  # type: ignore[arg-type]
            return pipeline.class2img(specs, settings, labels).images
        if task == "layout":
            return pipeline.layout2img(specs, settings, [scene_layout(s) for s in scenes]).images
        if task == "semantic":
            return pipeline.semantic2img(specs, settings, [label_map(s) for s in scenes]).images
        return pipeline.unconditional(specs, settings).images

    return generate


def real_images(scenes: Sequence[Scene], specs: Sequence[SampleSpec], settings: RunSettings) -> list[np.ndarray]:
    """The TaskGenerateFn of a perfect model: each scene's own render (what the criteria are validated on)."""
    return [render(s) for s in scenes]


# ------------------------------------------------------------------------------------------- scoring


def score(task: ConditionTask, analysis: SceneAnalysis, scene: Scene) -> tuple[bool, bool, tuple[ObjectScore, ...]]:
    """(correct, count right, per-object scores) of one image analysis against the scene it was asked for."""
    if task == "unconditional":
        objects = analysis.objects
        good = (len(objects) == 1 and objects[0].shape is not None
                and analysis.background_distance <= BACKGROUND_TOLERANCE)
        return good, len(objects) == 1, ()
    if analysis.size != IMAGE_SIZE:
        raise ValueError(f"the held-out conditions are {IMAGE_SIZE}x{IMAGE_SIZE}, got a {analysis.size}-px image")
    if task == "class":
        scores: tuple[ObjectScore, ...] = (_class_score(analysis, scene),)
    elif task == "semantic":
        labels = label_map(scene)
        regions = [labels == class_id(o.colour, o.shape) + 1 for o in scene.objects]
        scores = _matched(analysis, scene, lambda k, obj: mask_iou(regions[k], obj.mask), SEMANTIC_IOU, False)
    else:
        boxes = scene_layout(scene)
        scores = _matched(analysis, scene, lambda k, obj: box_iou(boxes[k].coords, measured_box(obj, IMAGE_SIZE)),
                          LAYOUT_IOU, True)
    count = len(analysis.objects) == len(scene.objects)
    return all(s.correct for s in scores) and (count or task != "class"), count, scores


def _class_score(analysis: SceneAnalysis, scene: Scene) -> ObjectScore:
    """The largest object of the asked colour (else the largest object) judged on colour and shape."""
    asked = scene.objects[0]
    name = CLASS_NAMES[class_id(asked.colour, asked.shape)]
    if not analysis.objects:
        return ObjectScore(name, False, 0.0, False, False, False)
    same = [o for o in analysis.objects if o.colour == asked.colour]
    found = (same or list(analysis.objects))[0]
    colour, shape = bool(same), found.shape == asked.shape
    return ObjectScore(name, True, 1.0, colour, shape, colour and shape)


def _matched(analysis: SceneAnalysis, scene: Scene, iou: Callable[[int, DetectedObject], float], threshold: float,
             need_shape: bool) -> tuple[ObjectScore, ...]:
    """Each asked object (in scene order) against the unused generated object of highest IoU with it."""
    used: set[int] = set()
    out = []
    for k, asked in enumerate(scene.objects):
        name = CLASS_NAMES[class_id(asked.colour, asked.shape)]
        best, pick = max(((iou(k, o), i) for i, o in enumerate(analysis.objects) if i not in used), default=(0.0, -1))
        if pick < 0 or best <= 0.0:
            out.append(ObjectScore(name, False, 0.0, False, False, False))
            continue
        used.add(pick)
        found = analysis.objects[pick]
        colour, shape = found.colour == asked.colour, found.shape == asked.shape
        correct = best >= threshold and colour and (shape or not need_shape)
        out.append(ObjectScore(name, True, round(best, 4), colour, shape, correct))
    return tuple(out)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def measured_box(obj: DetectedObject, size: int) -> tuple[float, float, float, float]:
    """A detected object's box in [0, 1] coordinates from its soft measurement (centre +- extent / 2)."""
    (cx, cy), (w, h) = obj.centre, obj.extent
    return ((cx - w / 2) / size, (cy - h / 2) / size, (cx + w / 2) / size, (cy + h / 2) / size)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def describe(task: ConditionTask, scene: Scene) -> str:
    """The condition in words, for reports: a class name, boxes, or the map's objects."""
    if task == "unconditional":
        return ""
    names = [CLASS_NAMES[class_id(o.colour, o.shape)] for o in scene.objects]
    if task == "layout":
        return "; ".join(f"{n} {[round(v, 3) for v in b.coords]}" for n, b in zip(names, scene_layout(scene),
                                                                                  strict=True))
    return " + ".join(names)


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_task(target: Pipeline | TaskGenerateFn, task: ConditionTask, n: int, *, sampler: SamplerName = "dpmpp_2m",
                  steps: int = 20, guidance: float | None = None, seed: int = 0, batch_size: int = 16,
                  feature_net: ShapeFeatureNet | None = None, progress: bool = True) -> TaskReport:
    """Generate one image for each of the first `n` held-out conditions (item i with seed `seed + i`), score
    them, and measure FD against the real renders of the same scenes (with the real-vs-real floor)."""
    if task not in CONDITION_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(CONDITION_TASKS)}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got {n} and {batch_size}")
    guidance = DEFAULT_GUIDANCE[task] if guidance is None else guidance
    net = feature_net if feature_net is not None else load_feature_net()
    start = time.perf_counter()
    scenes = heldout_scenes(task, n)
    generate = pipeline_task_generator(target, task) if isinstance(target, Pipeline) else target
    settings = RunSettings(sampler=sampler, steps=steps)
    images: list[np.ndarray] = []
    for first in tqdm(range(0, n, batch_size), desc=f"{task} ({sampler}, {steps} steps)", unit="batch",
                      disable=not progress):
        chunk = scenes[first : first + batch_size]
        specs = [SampleSpec("", "", seed + first + k, guidance) for k in range(len(chunk))]
        out = list(generate(chunk, specs, settings))
        if len(out) != len(chunk):
            raise ValueError(f"the generator returned {len(out)} images for {len(chunk)} conditions")
        images += [as_array(image) for image in out]
    results = []
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        correct, count, objects = score(task, analyse(image), scene)
        results.append(ItemResult(i, seed + i, describe(task, scene), correct, count, objects))
    fd = fd_ref = None
    if n >= 2:
        real = extract_features(net, np.stack([render(s) for s in scenes]))
        fd = frechet_distance(extract_features(net, np.stack(images)), real)
        others = heldout_scenes(task, n, stream=REFERENCE_SEED)
        fd_ref = frechet_distance(extract_features(net, np.stack([render(s) for s in others])), real)
    return _report(task, sampler, steps, guidance, results, images, fd, fd_ref, time.perf_counter() - start)


def _report(task: ConditionTask, sampler: str, steps: int, guidance: float, results: list[ItemResult],
            images: list[np.ndarray], fd: float | None, fd_ref: float | None, seconds: float) -> TaskReport:
    objects = [o for r in results for o in r.objects]
    image_accuracy = _mean([r.correct for r in results])
    metrics = {"count": _mean([r.count for r in results])}
    if objects:
        metrics.update(colour=_mean([o.colour for o in objects]), shape=_mean([o.shape for o in objects]),
                       object_correct=_mean([o.correct for o in objects]))
    if task in ("semantic", "layout"):
        threshold = SEMANTIC_IOU if task == "semantic" else LAYOUT_IOU
        metrics.update(mean_iou=float(np.mean([o.iou for o in objects])),
                       iou_ok=_mean([o.iou >= threshold for o in objects]))
    accuracy = metrics["object_correct"] if task in ("semantic", "layout") else image_accuracy
    return TaskReport(task, sampler, steps, guidance, len(results), accuracy, image_accuracy, metrics, fd, fd_ref,
                      round(seconds, 2), results, images)


def _mean(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def format_task_table(reports: Sequence[TaskReport]) -> str:
    """One row per report: the headline accuracy, the task's metrics in %, FD and its floor."""
    keys = sorted({k for r in reports for k in r.metrics}, key=_METRIC_ORDER.index)
    head = ["task", "sampler", "steps", "guid", "acc", "images", *keys, "FD", "FD ref", "sec"]
    rows = [head]
    for r in reports:
        metrics = [f"{r.metrics[k]:.3f}" if k == "mean_iou" else _pct(r.metrics.get(k)) for k in keys]
        rows.append([r.task, r.sampler, str(r.steps), f"{r.guidance:g}", _pct(r.accuracy), _pct(r.image_accuracy),
                     *metrics, _num(r.fd), _num(r.fd_reference), f"{r.seconds:.1f}"])
    return aligned(rows)


_METRIC_ORDER = ["object_correct", "mean_iou", "iou_ok", "colour", "shape", "count"]


def _pct(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.2f}"


def write_conditions(out_dir: Path, n: int, stream: int = HELDOUT_STREAM) -> list[Path]:
    """Example inputs for `ldm generate` and the service, from held-out scenes: map-NNN.png (a mode-P label
    map), layout-NNN.json (boxes by class name) and real-NNN.png (the scene itself)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, scene in enumerate(heldout_scenes("layout", n, stream)):
        paths = (out_dir / f"map-{i:03d}.png", out_dir / f"layout-{i:03d}.json", out_dir / f"real-{i:03d}.png")
        label_map_image(label_map(scene), LABEL_PALETTE).save(paths[0])
        paths[1].write_text(json.dumps(layout_to_json(scene_layout(scene), CLASS_NAMES), indent=1) + "\n")
        Image.fromarray(render(scene)).save(paths[2])
        written += paths
    return written



def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.eval.conditions --out DIR [--n N]`: write example label maps and layouts."""
    import argparse

    parser = argparse.ArgumentParser(description="Write held-out example conditions for `ldm generate --task "
                                     "semantic|layout`: map-NNN.png, layout-NNN.json and the real scene real-NNN.png.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--n", type=int, default=4, help="how many scenes (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in write_conditions(args.out, args.n):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
