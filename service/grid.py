"""`ldm grid`: one small PNG of what a model makes, a fixed set of conditions by fixed seeds, for the README and the
model cards (docs/grid-<model>.png, models/zoo/<model>/MODEL_CARD.md).

The conditions depend on the model's kind: text models get `PROMPTS` (the shapes grammar), class models
`CLASSES`, layout and semantic models the first scenes of the held-out stream (models/eval/conditions.py; their
boxes or label maps are drawn in a row above the images), unconditional models one column per seed. Each column is
captioned; each further row is one seed. Seeds, steps and sampler are fixed, so the same command gives the same
file (on the CPU, where an image is bit-identical alone or in a batch).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from PIL import Image, ImageDraw, ImageFont

from models.checkpoints import ZOO_DIR
from models.conditioning import Box, label_map_image
from models.eval.conditions import describe, heldout_scenes
from models.ldm import LatentDiffusion
from models.names import ModelKind, SamplerName, Task, default_sampler, model_kind
from models.pipeline import GenerationResult, LabelMap, Pipeline, RunSettings, SampleSpec
from models.resolve import pick_device, resolve_model
from models.train.data_shapes import LABEL_PALETTE, label_map, scene_layout

PROMPTS = ("a red circle on a black background", "a large blue square", "a small yellow triangle on the left",
           "a green circle on the right on a gray background", "a purple square and an orange triangle",
           "a blue circle and a red square")
CLASSES = ("red circle", "green square", "blue triangle", "yellow circle", "purple square", "orange triangle")
COLUMNS = 6
CAPTION_CHARS = 18  # per line, at PIL's default bitmap font (6 px a character) under a 128-pixel cell
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
FRAME = (170, 170, 170)  # around each cell: white backgrounds stay visible on the white page


@dataclass(frozen=True)
class GridOptions:
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 20
    #: None: the model's default (its config's `default_sampler`, else DPM-Solver++(2M))
    sampler: SamplerName | None = None
    #: None: the model's default for its task (`models.names.default_guidance`)
    guidance: float | None = None
    #: each image is enlarged this many times (nearest neighbour: the pixels stay visible)
    scale: int = 2
    device: str | None = "cpu"
    prompts: tuple[str, ...] = PROMPTS


@dataclass(frozen=True)
class Column:
    """One condition: its caption, what the pipeline takes for it, and a picture of it (layouts, maps)."""

    caption: str
    condition: object = None
    picture: Image.Image | None = None


def _layout_picture(boxes: Sequence[Box], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for box in boxes:
        draw.rectangle([box.x0 * size, box.y0 * size, box.x1 * size - 1, box.y1 * size - 1],
                       outline=LABEL_PALETTE[box.label + 1], width=2)
    return image


def columns(kind: ModelKind, prompts: Sequence[str] = PROMPTS, seeds: Sequence[int] = (0, 1)) -> list[Column]:
    """The grid's conditions for a model of this kind."""
    if kind == "text":
        return [Column(p, p) for p in prompts]
    if kind == "class":
        return [Column(c, c) for c in CLASSES]
    if kind in ("layout", "semantic"):
        scenes = heldout_scenes(kind, COLUMNS)
        if kind == "layout":
            return [Column(describe("semantic", s), scene_layout(s), _layout_picture(scene_layout(s), 64))
                    for s in scenes]
        return [Column(describe("semantic", s), label_map(s), label_map_image(label_map(s), LABEL_PALETTE))
                for s in scenes]
    if kind == "none":  # column c of the row of seed s: seed s * COLUMNS + c
        return [Column("seeds " + ", ".join(str(s * COLUMNS + c) for s in seeds), c) for c in range(COLUMNS)]
    raise ValueError(f"ldm grid draws text, class, layout, semantic and unconditional models, not a {kind} model")


TASK_OF_KIND: dict[ModelKind, Task] = {"text": "txt2img", "class": "class", "layout": "layout",
                                       "semantic": "semantic", "none": "unconditional"}


def _sample(pipeline: Pipeline, kind: ModelKind, cols: Sequence[Column], options: GridOptions,
            ) -> list[Image.Image]:
    """One image per (seed, column), row by row, in one batch. An unconditional column's condition is its index:
    its image in the row of seed s has seed s * COLUMNS + c."""
    task = TASK_OF_KIND[kind]
    if task == "unconditional" and options.guidance not in (None, 1.0):
        raise ValueError(f"an unconditional model is sampled unguided: leave --guidance out, not {options.guidance:g}")
    sampler = options.sampler or default_sampler(pipeline.model.config.default_sampler)
    guidance = pipeline.model.config.guidance_for(task, sampler) if options.guidance is None else options.guidance
    settings = RunSettings(sampler=sampler, steps=options.steps)
    prompted = kind == "text"
    specs = [SampleSpec(prompt=c.caption if prompted else "", guidance_scale=guidance,
                        seed=seed * COLUMNS + cast(int, c.condition) if kind == "none" else seed)
             for seed in options.seeds for c in cols]
    conditions = [c.condition for _ in options.seeds for c in cols]
    result: GenerationResult
    if kind == "text":
        result = pipeline.txt2img(specs, settings)
    elif kind == "class":
        result = pipeline.class2img(specs, settings, [str(c) for c in conditions])
    elif kind == "layout":
        result = pipeline.layout2img(specs, settings, cast(list[Sequence[Box]], conditions))
    elif kind == "semantic":
        result = pipeline.semantic2img(specs, settings, cast(list[LabelMap], conditions))
    else:
        result = pipeline.unconditional(specs, settings)
    return list(result.images)


def compose(cols: Sequence[Column], images: Sequence[Image.Image], rows: int, scale: int) -> Image.Image:
    """Captions on top, then the conditions' pictures (when there are), then `rows` rows of images."""
    font = ImageFont.load_default()
    cell = images[0].width * scale
    gap = 4
    lines = [textwrap.wrap(c.caption, CAPTION_CHARS) or [""] for c in cols]
    caption_h = 11 * max(len(ln) for ln in lines) + gap
    pictures = [c.picture for c in cols if c.picture is not None]
    image_rows = rows + (1 if pictures else 0)
    width = len(cols) * (cell + gap) + gap
    height = caption_h + image_rows * (cell + gap) + gap
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for k, col_lines in enumerate(lines):
        x = gap + k * (cell + gap)
        for j, text in enumerate(col_lines):
            draw.text((x, gap + 11 * j), text, fill=INK, font=font)
    top = caption_h + gap
    def paste(image: Image.Image, x: int, y: int) -> None:
        grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=FRAME)

    if pictures:
        for k, c in enumerate(cols):
            assert c.picture is not None
            paste(c.picture, gap + k * (cell + gap), top)
        top += cell + gap
    for i, image in enumerate(images):
        r, k = divmod(i, len(cols))
        paste(image, gap + k * (cell + gap), top + r * (cell + gap))
    return grid


def make_grid(spec: str, options: GridOptions = GridOptions()) -> Image.Image:
    """The grid of model `spec` (a shipped name, a file or a folder, as `ldm generate --model`)."""
    model: LatentDiffusion = resolve_model(spec, device=pick_device(options.device))
    kind = model_kind(model.config)
    cols = columns(kind, options.prompts, options.seeds)
    images = _sample(Pipeline(model), kind, cols, options)
    return compose(cols, images, len(options.seeds), options.scale)


def shipped_models() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "model.safetensors").is_file())


def run_grid(args: argparse.Namespace) -> int:
    """`ldm grid` (its parser is in service/cli.py, which must not import torch)."""
    if args.steps < 1 or args.scale < 1:
        raise ValueError("--steps and --scale must be at least 1")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be at least 0, got {args.guidance}")
    options = GridOptions(seeds=tuple(args.seeds), steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                          scale=args.scale, device=args.device, prompts=tuple(args.prompt) if args.prompt else PROMPTS)
    if args.all is not None:
        args.all.mkdir(parents=True, exist_ok=True)
        targets = [(name, args.all / f"grid-{name}.png") for name in shipped_models()]
    else:
        targets = [(args.model, args.out or Path(f"grid-{Path(args.model).stem}.png"))]
    for spec, path in targets:
        make_grid(spec, options).save(path, optimize=True)
        print(path)
    return 0
