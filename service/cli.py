"""The `ldm` command. Each subcommand builds its parser here and runs in its own function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from models.eval.cli import add_eval_parser
from models.train.cli import add_train_parser

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SAMPLERS = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler_a")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="text-to-image offline, no server",
        description="Generate images from prompts with a shipped model, a checkpoint file or a diffusers "
        "folder, offline. Progress goes to stderr; PNG text chunks carry the parameters.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --from-file)")
    p.add_argument("--from-file", type=Path, help="one prompt a line; OUT is then a folder of NNN.png, "
                   "line i generated with seed SEED + i (with --n N: NNN-k.png, seed SEED + i*N + k)")
    p.add_argument("--model", default="tiny-shapes",
                   help="a shipped model name, a .safetensors/.ckpt file, a diffusers folder, or "
                   "random:<config> for untrained random weights from models/configs/ (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps, 1..1000 (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m", help="(default: %(default)s)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (dpmpp_2m)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 = off")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    p.add_argument("--width", type=int, help="pixels, a multiple of the model's factor (default: the model's)")
    p.add_argument("--height", type=int, help="pixels (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="images per prompt, seeds SEED..SEED+n-1 (default: 1)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (vocab.json + merges.txt) for a single "
                   "SD checkpoint file, which carries none")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (model_ema.*)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="output PNG (default out.png), or folder with --from-file (default: out/)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from service.generate import GenerateOptions, generate

    if (args.prompt is None) == (args.from_file is None):
        raise SystemExit("ldm generate: give either a PROMPT or --from-file FILE")
    options = GenerateOptions(
        model=args.model, seed=args.seed, steps=args.steps, sampler=args.sampler, karras=args.karras,
        eta=args.eta, guidance=args.guidance, negative_prompt=args.negative_prompt, width=args.width,
        height=args.height, n=args.n, tokenizer=args.tokenizer, device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None, use_ema=args.ema,
    )
    if args.from_file is not None:
        prompts = [line.strip() for line in args.from_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.from_file} holds no prompts (one a line)")
        written = generate(prompts, options, out_dir=args.out or Path("out"))
    else:
        written = generate([args.prompt], options, out_file=args.out or Path("out.png"))
    for path in written:
        print(path)
    return 0


def _service_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="one box: embedded Redis, REST + gRPC, one supervised worker",
        description="Start everything on this machine: an embedded Redis (unless LDM_REDIS_URL is set; data under "
        "LDM_DATA_DIR), the REST API (LDM_REST_HOST:LDM_REST_PORT, default 127.0.0.1:8000), the gRPC server "
        "(default 127.0.0.1:50051) and worker processes, restarted if they die. Settings: LDM_* variables or a "
        "YAML file named by LDM_CONFIG_FILE (see the README).")
    serve.add_argument("--model", default=None, help="model spec the workers load: a shipped name, a checkpoint "
                       "file, a diffusers folder or random:<config> (default: LDM_DEFAULT_MODEL if it is shipped, "
                       "else random:tiny-sd)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1; one per GPU)")
    serve.set_defaults(func=run_serve)
    api = sub.add_parser("api", help="REST + gRPC front ends only (needs LDM_REDIS_URL)",
                         description="Run the REST API and the gRPC server against the Redis at LDM_REDIS_URL. "
                         "Stateless: run as many replicas as you like.")
    api.set_defaults(func=run_api)
    worker = sub.add_parser("worker", help="one worker process for one model (needs LDM_REDIS_URL)",
                            description="Load one model and serve its queue: claim, batch, generate, store PNGs. "
                            "One per GPU. SIGTERM finishes the batch in hand, then exits.")
    worker.add_argument("--model", required=True, help="model spec: a shipped name, a checkpoint file, a "
                        "diffusers folder, or random:<config>")
    worker.add_argument("--model-name", default=None, help="the name clients use (default: derived from --model)")
    worker.add_argument("--worker-id", default=None, help="unique id (default: host-pid)")
    worker.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: LDM_WORKER_DEVICE or auto)")
    worker.set_defaults(func=run_worker)


def run_serve(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.serve import run_serve as serve

    settings = load_settings()
    return serve(settings, args.model or settings.default_model, workers=args.workers)


def run_api(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.serve import run_api as api

    return api(load_settings())


def run_worker(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.worker.process import run_worker as worker

    settings = load_settings()
    if settings.redis_url is None:
        raise ValueError("ldm worker needs a Redis: set LDM_REDIS_URL (or run `ldm serve`, which starts one)")
    return worker(settings, args.model, worker_id=args.worker_id, device=args.device, model_name=args.model_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent Diffusion Models: library, service and tools.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _service_parsers(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, OSError) as err:  # usage and file errors (a missing file, an -o that is a folder)
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
