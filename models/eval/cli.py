"""`ldm eval`: score a model on random captioned-shapes prompts (judge accuracy, FD, autoencoder PSNR), or,
with `--task`, a class-conditional, unconditional, semantic-map or layout model on held-out conditions
(models/eval/conditions.py).

Only argparse and the torch-free models.names are imported at module level: `ldm --help` must stay fast, so the
work is imported in `run_eval`, as service/cli.py does for every subcommand.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, cast

from models.names import CONDITION_TASKS, SAMPLERS, SamplerName, default_sampler

if TYPE_CHECKING:
    from models.eval.features import ShapeFeatureNet
    from models.pipeline import Pipeline

#: the tasks an evaluation scores: random grammar prompts, or held-out shapes conditions
TASKS = ("txt2img", *CONDITION_TASKS)


def add_eval_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `eval` subcommand on the `ldm` parser's subparsers."""
    p = sub.add_parser(
        "eval",
        help="score a model on captioned-shapes prompts",
        description="Generate one image per random captioned-shapes prompt (seed SEED + i for prompt i), judge "
        "each against its prompt (colour, shape, size, position, background, object count), and report prompt "
        "accuracy for one- and two-object prompts, per-attribute accuracy, the Fréchet distance to real renders "
        "of the same prompts in ShapeFeatureNet space (with the real-vs-real floor), and the autoencoder's "
        "reconstruction PSNR. Several samplers (comma-separated) are compared at equal steps on the same "
        "prompts and seeds. With --task class|unconditional|semantic|layout, the model is conditioned on held-out "
        "shapes scenes' class labels, label maps or layouts instead (nothing for unconditional) and scored by the "
        "task's criterion: right colour and shape (class), per-object mask IoU and colour (semantic), per-box IoU, "
        "colour and shape (layout), well-formed samples (unconditional); all with the FD to the scenes' renders.",
    )
    p.add_argument("--task", choices=TASKS, default="txt2img",
                   help="what the model is conditioned on (default: %(default)s, random grammar prompts)")
    p.add_argument("--model", default="tiny-shapes",
                   help="a shipped model name, a checkpoint file, a diffusers folder, or random:<config> "
                   "(default: %(default)s)")
    p.add_argument("--n", type=int, default=200, help="number of prompts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the first image (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps, 1..1000 (default: %(default)s)")
    p.add_argument("--sampler", default=None,
                   help=f"sampler, or a comma-separated list to compare at equal steps; of {', '.join(SAMPLERS)} "
                   "(default: the model's own default_sampler where its config has one, else dpmpp_2m)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own for each sampler, sampler_guidance "
                   "or default_guidance where its config "
                   "has one, else 7.5 for txt2img, 5 for class, 3 for layout, 2 for semantic; unconditional: none)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated at once (default: %(default)s)")
    p.add_argument("--recon", type=int, default=64,
                   help="held-out renders for the autoencoder PSNR, 0 to skip; txt2img only (default: %(default)s)")
    p.add_argument("--features", type=Path, default=None,
                   help="ShapeFeatureNet weights (default: models/eval/weights/shape_features.safetensors)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder: report.json and grid.png (grid-<sampler>.png per sampler when "
                   "comparing); default: print the table only")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    first = p.add_argument_group(
        "first stage", "with --images, score an autoencoder by reconstruction instead (the paper's Table 8): --model "
        "is a CompVis zoo first stage (DIR/model.ckpt with its config.yaml) or a zoo LDM, whose first stage is used")
    first.add_argument("--images", type=Path, default=None,
                       help="folder of PNG/JPEG images (sides multiples of the model's factor, at least 11 px): "
                       "report PSNR and SSIM per image and their means, and LPIPS with the two weight files")
    first.add_argument("--config", type=Path, default=None, help="its config.yaml (default: the one beside --model)")
    first.add_argument("--vgg-weights", type=Path, default=None,
                       help="local torchvision VGG16 state dict, for LPIPS (never downloaded)")
    first.add_argument("--lpips-weights", type=Path, default=None,
                       help="local LPIPS linear-head weights (the lpips package's vgg.pth), for LPIPS")
    p.set_defaults(func=run_eval)


def parse_samplers(text: str) -> list[SamplerName]:
    """'a,b' -> ['a', 'b'], each checked, no duplicates."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SAMPLERS]
    if not names or unknown:
        raise ValueError(f"--sampler: unknown sampler(s) {unknown or [text]}; choose from {', '.join(SAMPLERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--sampler: {text!r} names a sampler twice")
    return cast("list[SamplerName]", names)


def run_eval(args: argparse.Namespace) -> int:
    if args.images is not None:
        return _run_first_stage_eval(args)
    given = [flag for flag, value in (("--config", args.config), ("--vgg-weights", args.vgg_weights),
                                      ("--lpips-weights", args.lpips_weights)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --images (scoring a first stage by reconstruction)")
    samplers = parse_samplers(args.sampler) if args.sampler is not None else None  # None: the model's, once loaded
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")

    from models.eval.evaluate import compare_samplers, format_table, write_report
    from models.eval.features import DEFAULT_WEIGHTS, load_feature_net
    from models.eval.prompts import random_prompts
    from models.pipeline import Pipeline
    from models.resolve import pick_device, pick_dtype, resolve_model

    net = load_feature_net(args.features or DEFAULT_WEIGHTS)  # before the model: fail fast on a missing file
    device = pick_device(args.device)
    model = resolve_model(args.model, device=device, dtype=pick_dtype(device, None))
    if samplers is None:
        samplers = [default_sampler(model.config.default_sampler)]
    # each sampler at the model's default for it (a sampler may have its own: sampler_guidance), or --guidance
    guidance = {name: model.config.guidance_for(args.task, name) if args.guidance is None else args.guidance
                for name in samplers}
    if args.task != "txt2img":
        return _run_task_eval(args, Pipeline(model), samplers, guidance, net)
    prompts = random_prompts(args.n, args.seed)
    reports = []
    for scale in dict.fromkeys(guidance.values()):  # one comparison per scale, samplers in the order given
        reports += compare_samplers(Pipeline(model), prompts, [s for s in samplers if guidance[s] == scale],
                                    steps=args.steps, feature_net=net, recon_images=args.recon, guidance=scale,
                                    seed=args.seed, batch_size=args.batch_size)
    order: list[str] = list(samplers)
    reports.sort(key=lambda r: order.index(r.sampler))
    print(f"model {args.model}: {args.n} prompts, {args.steps} steps, guidance {_scales(guidance)}; accuracies in %")
    print(format_table(reports))
    if args.out is not None:
        for path in write_report(reports if len(reports) > 1 else reports[0], args.out):
            print(path)
    return 0


def _scales(guidance: dict[SamplerName, float]) -> str:
    """'2.5', or 'plms 2, euler_a 5' where the samplers' scales differ."""
    if len(set(guidance.values())) == 1:
        return f"{next(iter(guidance.values())):g}"
    return ", ".join(f"{name} {scale:g}" for name, scale in guidance.items())


def _run_task_eval(args: argparse.Namespace, pipeline: Pipeline, samplers: list[SamplerName],
                   guidance: dict[SamplerName, float], net: ShapeFeatureNet) -> int:
    from models.eval.conditions import evaluate_task, format_task_table
    from models.eval.evaluate import write_report

    reports = [evaluate_task(pipeline, args.task, args.n, sampler=name, steps=args.steps, guidance=guidance[name],
                             seed=args.seed, batch_size=args.batch_size, feature_net=net)
               for name in samplers]
    print(f"model {args.model}, task {args.task}: {args.n} held-out conditions, {args.steps} steps, guidance "
          f"{_scales(guidance)}; accuracies in %")
    print(format_task_table(reports))
    if args.out is not None:
        for path in write_report(reports if len(reports) > 1 else reports[0], args.out):
            print(path)
    return 0


def _run_first_stage_eval(args: argparse.Namespace) -> int:
    """`--images DIR`: a first stage's reconstruction scores (models/eval/reconstruction.py)."""
    if args.task != "txt2img":
        raise ValueError(f"--images scores a first stage by reconstruction; it takes no --task ({args.task})")
    from models.compvis.first_stage import load_first_stage
    from models.compvis.load import CONFIG_NAME
    from models.eval.reconstruction import (
        evaluate_reconstruction,
        format_reconstruction,
        image_files,
        load_lpips,
        write_reconstruction_report,
    )
    from models.resolve import pick_device

    model = Path(args.model)
    config = args.config or model.parent / CONFIG_NAME
    if not model.is_file() or not config.is_file():
        raise ValueError(f"--images needs --model DIR/model.ckpt with its config.yaml beside it (or --config): "
                         f"{model if not model.is_file() else config} does not exist")
    files = image_files(args.images)
    lpips = load_lpips(args.vgg_weights, args.lpips_weights)  # before the model: fail fast on a missing file
    device = pick_device(args.device)
    autoencoder = load_first_stage(model, config, device=device)
    if lpips is not None:
        lpips = lpips.to(device)
    report = evaluate_reconstruction(autoencoder, files, str(model), lpips)
    print(f"model {model}: reconstruction of {len(files)} images from {args.images}")
    print(format_reconstruction(report))
    if args.out is not None:
        print(write_reconstruction_report(report, args.out))
    return 0
