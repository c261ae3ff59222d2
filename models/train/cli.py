"""`ldm train autoencoder`, `ldm train ldm` and `ldm train swap-decoder`: parsers and runners (registered by
service/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def add_train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train an autoencoder or a latent diffusion model",
                       description="Train the paper's two stages. Runs resume from RUN_DIR/checkpoints/last.pt "
                       "when it exists; every run writes its resolved config to RUN_DIR/config.yaml.")
    stages = p.add_subparsers(dest="stage", required=True, metavar="{autoencoder,ldm,swap-decoder}")

    ae = stages.add_parser("autoencoder", help="first stage: KL/VQ autoencoder (L1 + LPIPS + PatchGAN)",
                           description="Train the first-stage autoencoder; writes RUN_DIR/autoencoder.safetensors.")
    _common(ae)
    ae.add_argument("--vgg-weights", type=Path, help="local torchvision VGG16 state dict, for the LPIPS loss")
    ae.add_argument("--lpips-weights", type=Path, help="local LPIPS linear-head weights (lpips' vgg.pth)")
    ae.set_defaults(func=run_train_autoencoder)

    ldm = stages.add_parser("ldm", help="second stage: diffusion in the latent space of a trained autoencoder",
                            description="Train a latent diffusion model (Eq. 1) on the latents of a frozen "
                            "autoencoder; writes RUN_DIR/model.safetensors (loadable by `ldm generate --model`).")
    _common(ldm)
    ldm.add_argument("--autoencoder", type=Path, help="autoencoder.safetensors from `ldm train autoencoder` "
                     "(default: the config's `autoencoder_path`)")
    ldm.set_defaults(func=run_train_ldm)

    swap = stages.add_parser(
        "swap-decoder", help="put a decoder-only fine-tune of a first stage into finished model files",
        description="Replace the decoder of model files (the original single-file layout, such as the shipped "
        "models/zoo/*/model.safetensors) by a decoder-only fine-tune of their own first stage (`ldm train "
        "autoencoder` with train_encoder: false): their latent space is unchanged, so their diffusion models stay "
        "valid and decode better. Everything else in the files (UNet, conditioner, dtypes, config) is kept. A "
        "file whose encoder differs from the fine-tune's is refused.")
    swap.add_argument("--decoder", type=Path, required=True,
                      help="autoencoder.safetensors of the decoder-only fine-tune")
    swap.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="model .safetensors files, in place")
    swap.set_defaults(func=run_swap_decoder)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="training config YAML (see models/train/configs/); "
                   "flags below override it")
    p.add_argument("--out", type=Path, required=True, help="run folder (created; resumed if it has a checkpoint)")
    p.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="peak learning rate (after warm-up)")
    p.add_argument("--seed", type=int, help="seed of the weights' init and the data stream")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--data", type=Path, help="train on an image folder (images + metadata.jsonl) instead of "
                   "the procedural shapes")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                              "seed": args.seed, "device": args.device}
    return out


def _data_override(args: argparse.Namespace, config: T) -> T:
    from dataclasses import replace

    if args.data is None:
        return config
    data = replace(config.data, kind="folder", path=str(args.data))  # type: ignore[attr-defined]
    return replace(config, data=data)  # type: ignore[type-var]


def run_train_autoencoder(args: argparse.Namespace) -> int:
    from models.train.autoencoder_trainer import AutoencoderTrainConfig, AutoencoderTrainer
    from models.train.common import load_train_config

    overrides = _overrides(args)
    overrides.update(vgg_weights=str(args.vgg_weights) if args.vgg_weights else None,
                     lpips_weights=str(args.lpips_weights) if args.lpips_weights else None)
    config = _data_override(args, load_train_config(AutoencoderTrainConfig, args.config, overrides))
    result = AutoencoderTrainer(config, args.out).train()
    print(f"held-out reconstruction: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}")
    print(f"wrote {args.out / 'autoencoder.safetensors'}")
    return 0


def run_swap_decoder(args: argparse.Namespace) -> int:
    from models.train.autoencoder_trainer import load_trained_autoencoder
    from models.train.decoder_swap import swap_decoder

    tuned = load_trained_autoencoder(args.decoder)
    for path in args.models:
        changed = swap_decoder(path, tuned)
        print(f"{path}: {changed} decoder tensors replaced")
    return 0


def run_train_ldm(args: argparse.Namespace) -> int:
    from models.train.common import load_train_config
    from models.train.ldm_trainer import LDMTrainConfig, LDMTrainer

    overrides = _overrides(args)
    overrides["autoencoder_path"] = str(args.autoencoder) if args.autoencoder else None
    config = _data_override(args, load_train_config(LDMTrainConfig, args.config, overrides))
    result = LDMTrainer(config, args.out).train()
    print(f"final loss {result['loss']:.4f}; wrote {args.out / 'model.safetensors'}")
    return 0
