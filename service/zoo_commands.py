"""`ldm reconstruct` and `ldm convert`: the CompVis zoo's first stages alone, and any loadable model written in our
single-file format (models/compvis/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def add_zoo_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rec = sub.add_parser(
        "reconstruct", help="encode and decode an image with a first stage (autoencoder); prints PSNR",
        description="Encode and decode one image with a CompVis zoo first stage (models/first_stage_models/*/"
        "model.ckpt with its config.yaml beside it, or --config), or the first stage of a zoo LDM. KL first stages "
        "decode the posterior mean, VQ ones the quantised code. Prints the PSNR (dB) of the reconstruction; with a "
        "folder of images, of each and their mean (the paper's Table 8 measure), the reconstructions written to -o.",
    )
    rec.add_argument("--model", type=Path, required=True, help="first-stage (or zoo LDM) checkpoint")
    rec.add_argument("--config", type=Path, help="its config.yaml (default: the one beside --model)")
    rec.add_argument("--image", type=Path, required=True, help="RGB image, sides multiples of the model's factor, "
                     "or a folder of them (PNG/JPEG)")
    rec.add_argument("-o", "--out", type=Path, default=None,
                     help="output PNG, or folder for a folder of images (default: reconstruction.png, "
                     "reconstructions/)")
    rec.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    rec.set_defaults(func=run_reconstruct)

    conv = sub.add_parser(
        "convert", help="write a model (e.g. a CompVis zoo checkpoint) as our .safetensors with its config",
        description="Load any model `ldm generate --model` takes (a zoo DIR/model.ckpt reads its config.yaml) and "
        "write it as one .safetensors file in the original key layout with our config in its metadata; it then "
        "loads without the YAML (a text model still needs --tokenizer when used).",
    )
    conv.add_argument("--model", required=True, help="what to convert")
    conv.add_argument("--config", type=Path, help="a zoo config.yaml when it is not beside --model")
    conv.add_argument("--tokenizer", type=Path, help="tokenizer folder, where the model needs one to load")
    conv.add_argument("--ema", action="store_true", help="write the EMA weights (model_ema.*) as the UNet's")
    conv.add_argument("-o", "--out", type=Path, required=True, help="output .safetensors file")
    conv.set_defaults(func=run_convert)


def _config(model: Path, config: Path | None) -> Path:
    from models.compvis.load import CONFIG_NAME

    path = config or model.parent / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a zoo checkpoint comes with its config.yaml; pass --config FILE)")
    return path


def _read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path}: not a readable image ({err})") from None


def run_reconstruct(args: argparse.Namespace) -> int:
    from models.compvis.first_stage import load_first_stage, psnr, reconstruct

    folder = args.image.is_dir()
    inputs = sorted(p for p in args.image.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder \
        else [args.image]
    if not inputs:
        raise ValueError(f"--image {args.image}: no PNG or JPEG files in the folder")
    out_dir = args.out or Path("reconstructions")
    if folder:
        out_dir.mkdir(parents=True, exist_ok=True)
    autoencoder = load_first_stage(args.model, _config(args.model, args.config), device=args.device)
    scores = []
    for path in inputs:
        image = _read_rgb(path)
        out = reconstruct(autoencoder, image)
        target = out_dir / f"{path.stem}.png" if folder else args.out or Path("reconstruction.png")
        out.save(target)
        scores.append(psnr(image, out))
        print(f"{target}\tPSNR {scores[-1]:.2f} dB")
    if folder:
        print(f"mean PSNR {sum(scores) / len(scores):.2f} dB over {len(scores)} images")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from models.checkpoints import load_model, save_model

    if args.out.suffix != ".safetensors":
        raise ValueError(f"-o {args.out}: the output is a .safetensors file")
    model = load_model(args.model, tokenizer_dir=args.tokenizer, use_ema=args.ema, config=args.config)
    print(save_model(model, args.out))
    return 0
