"""Put a decoder-only fine-tune of a first stage into model files trained on that first stage.

A decoder fine-tuned with the encoder frozen (`train_encoder: false`, how SD's ft-MSE VAE was made) leaves the
latent space as it was, so every diffusion model trained on those latents stays valid and only decodes better.
`ldm train ldm` does this at export (`export_autoencoder_path`); this does it to finished files, such as the
shipped ones (models/zoo/*/model.safetensors all share tiny-shapes' first stage). Only the first stage's tensors
change: the UNet and conditioner tensors, their storage dtypes and the config metadata are written back as they
were. A file whose encoder is not bit-identical to the fine-tune's is refused: its latents would not be the ones
the decoder learned.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.autoencoder import Autoencoder
from models.ldm import PREFIXES
from models.train.autoencoder_trainer import load_first_stage

#: the autoencoder's tensors that map pixels to latents; the rest (decoder, post_quant_conv) may change
ENCODER_PARTS = ("encoder.", "quant_conv.")


def same_encoder(a: Autoencoder, b: Autoencoder) -> bool:
    """Whether two autoencoders have one config and bit-identical encoders (so one latent space)."""
    if a.config != b.config:
        return False
    ours, theirs = a.state_dict(), b.state_dict()
    return all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith(ENCODER_PARTS))


def swap_decoder(model_path: Path, tuned: Autoencoder) -> int:
    """Write `tuned`'s decoder into the model file at `model_path` (in place: a temporary file, then a rename).
    Returns the number of tensors that changed. Raises ValueError when the file's encoder differs."""
    prefix = PREFIXES["autoencoder"]
    with safe_open(str(model_path), "pt") as fh:
        metadata = fh.metadata() or {}
    tensors = load_file(str(model_path))
    stored = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    new = tuned.state_dict()
    if not same_encoder(load_first_stage(model_path), tuned):  # both on the CPU, in fp32
        raise ValueError(f"{model_path}: its encoder differs from the fine-tune's; only a decoder-only fine-tune "
                         "(train_encoder: false) of this file's own first stage can replace its decoder")
    changed = 0
    for key, value in new.items():
        if key.startswith(ENCODER_PARTS):
            continue
        replacement = value.detach().to(device="cpu", dtype=stored[key].dtype).contiguous()
        changed += not torch.equal(replacement, stored[key])
        tensors[prefix + key] = replacement
    scratch = model_path.with_name(model_path.name + ".tmp")
    save_file(tensors, str(scratch), metadata=metadata)
    os.replace(scratch, model_path)  # a process that has the old file open keeps reading the old one
    return changed
