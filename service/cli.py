"""The `ldm` command. Each subcommand builds its parser here and runs in its own function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent Diffusion Models: library, service and tools.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
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
