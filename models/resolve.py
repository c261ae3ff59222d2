"""Model resolution: which model a spec names, on which device, in which dtype.

A model spec is a shipped name (models/zoo/<name>/), a checkpoint file, a diffusers folder (all three
`models.checkpoints.load_model`), or `random:<config>`: untrained weights for a config of models/configs/, which
serve tests and benchmarks (the images are noise, and a warning says so). The worker's runner, `ldm generate`,
`ldm eval` and the trainers all pick their device here, so an explicit choice is checked the same way everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.checkpoints import load_model
from models.config import builtin_config
from models.cpu_inference import cpu_dtype_warning
from models.diffusion import PredictionType
from models.ldm import LatentDiffusion
from models.names import DTypeName

log = logging.getLogger(__name__)
RANDOM_PREFIX = "random:"
_TORCH_DTYPES: dict[DTypeName, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...) checked, or cuda when present, else cpu."""
    device = torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def pick_dtype(device: torch.device, name: DTypeName | None) -> torch.dtype:
    """`name` (fp32, fp16, bf16), or fp16 on cuda and fp32 elsewhere."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[name]


def resolve_model(spec: str, *, tokenizer: Path | None = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, use_ema: bool = False,
                  config: Path | None = None, prediction_type: PredictionType | None = None,
                  tokenizer_2: Path | None = None) -> LatentDiffusion:
    """The model of `spec` in eval mode without gradients, on `device` (default `pick_device(None)`) in `dtype`
    (default `pick_dtype(device, None)`). `config`: a CompVis `config.yaml` for a `.ckpt`; `prediction_type`: for
    files that do not say (SD 2); `tokenizer_2`: SDXL's second tokenizer folder; `random:<config>` builds
    untrained weights (clearly not a real model)."""
    device = device if device is not None else pick_device(None)
    dtype = dtype if dtype is not None else pick_dtype(device, None)
    if (warning := cpu_dtype_warning(device, dtype)) is not None:
        log.warning(warning)
    if spec.startswith(RANDOM_PREFIX):
        log.warning("model %s has RANDOM, untrained weights: images will be noise", spec)
        torch.manual_seed(0)
        model = LatentDiffusion(builtin_config(spec[len(RANDOM_PREFIX):]), tokenizer_dir=tokenizer)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return load_model(spec, tokenizer_dir=tokenizer, use_ema=use_ema, device=device, dtype=dtype, config=config,
                      prediction_type=prediction_type, tokenizer_2_dir=tokenizer_2)
