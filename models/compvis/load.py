"""A zoo checkpoint (`model.ckpt` + `config.yaml`) into a `LatentDiffusion`.

The original loads with `load_state_dict(strict=False)`, so its files carry what its model never reads; we are
lenient exactly there and strict everywhere else (errors name the keys):
- the schedule buffers DDPM registers (`betas`, `alphas_cumprod`, ...), `logvar`, the sampler's `ddim_*`
  buffers (inpainting_big's last.ckpt), and `scale_factor` (read first: `scale_by_std` models need it);
- `model_ema.*`, the LitEma copy of the UNet: used instead of the UNet's weights with `use_ema`, else dropped;
- a duplicated first stage: models with `cond_stage_config: __is_first_stage__` (inpainting_big) store the
  autoencoder again under `cond_stage_model.*`; it must equal `first_stage_model.*` (the original encodes the
  masked image with the copy, so a different copy would be a different model) and is then dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.checkpoints import (
    _build,
    _finish,
    _shown,
    ema_unet_keys,
    in_memory_sources,
    load_parts_strict,
    read_state_dict,
    split_parts,
)
from models.compvis.config_yaml import CompVisConfigError, load_config
from models.config import ModelConfig
from models.ldm import LatentDiffusion
from models.tensor_files import CheckpointError, StateDict

log = logging.getLogger(__name__)
CONFIG_NAME = "config.yaml"


def config_beside(path: Path) -> Path | None:
    """The zoo's layout: `DIR/model.ckpt` (or last.ckpt) with `DIR/config.yaml`."""
    candidate = path.parent / CONFIG_NAME
    return candidate if path.suffix.lower() == ".ckpt" and candidate.is_file() else None


def model_name(path: Path) -> str:
    """`celeba256/model.ckpt` -> "celeba256": the zoo names models by folder."""
    return path.parent.name if path.stem in ("model", "last") and path.parent.name else path.stem


def _scale_buffer(sd: StateDict) -> float | None:
    tensor = sd.get("scale_factor")
    return None if tensor is None else float(tensor.reshape(-1)[0])


def read_config(path: Path, config_path: Path, sd: StateDict | None = None) -> ModelConfig:
    """The model config of a zoo checkpoint (the file is read only when `sd` is not given)."""
    if sd is None:
        sd, _ = read_state_dict(path)
    try:
        return load_config(config_path, model_name(path), _scale_buffer(sd))
    except CompVisConfigError as err:
        raise CheckpointError(str(err)) from None


def _drop_first_stage_copy(parts: dict[str, StateDict], source: str) -> None:
    copy, first = parts["conditioner"], parts["autoencoder"]
    if not copy:
        return
    if set(copy) != set(first):
        odd = sorted(set(copy) ^ set(first))
        raise CheckpointError(f"{source}: cond_stage_model.* should repeat first_stage_model.* "
                              f"(__is_first_stage__), but these keys differ: {_shown(odd)}")
    differing = sorted(k for k in copy if copy[k].shape != first[k].shape or not torch.equal(copy[k], first[k]))
    if differing:
        raise CheckpointError(f"{source}: cond_stage_model.* differs from first_stage_model.* at "
                              f"{_shown(['cond_stage_model.' + k for k in differing])}; the original encodes the "
                              "masked image with the copy, which we do not support")
    parts["conditioner"] = {}


def load_zoo_checkpoint(
    path: Path,
    config_path: Path,
    *,
    tokenizer_dir: Path | None = None,
    use_ema: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentDiffusion:
    """Build the model `config_path` describes and load `path` into it (see the module docstring)."""
    sd, _ = read_state_dict(path)
    config = read_config(path, config_path, sd)
    try:
        parts = split_parts(sd)
        if use_ema:
            ema = ema_unet_keys(sd.keys(), list(parts["unet"]))
            parts["unet"] = {key: sd[ema_key] for key, ema_key in ema.items()}
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if config.concat_input == "masked_image":
        _drop_first_stage_copy(parts, str(path))
    model = _build(config, tokenizer_dir)
    load_parts_strict(model, in_memory_sources(path, parts), str(path), dtype)
    log.info("loaded zoo model %s from %s with %s", config.name, path, config_path)
    return _finish(model, device, dtype)

