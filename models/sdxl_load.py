"""Loading SDXL (base and refiner) from a diffusers folder or an original single file (layouts in
models/sdxl_layout.py), with the same strict, copy-free loading as every other model (models/checkpoints.py)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.checkpoints import (
    Sources,
    Stored,
    _build,
    _check_prediction_type,
    _finish,
    _inferred,
    _weights_in,
    diffusers_unet_and_vae,
    in_memory_sources,
    infer_autoencoder_config,
    infer_unet_config,
    load_parts_strict,
)
from models.config import ModelConfig
from models.diffusers_layout import (
    UnsupportedConfigError,
    autoencoder_config_from_diffusers,
    default_size_from_diffusers,
    read_json,
    schedule_config_from_diffusers,
    unet_config_from_diffusers,
)
from models.diffusion import PredictionType, ScheduleConfig
from models.ldm import PREFIXES, LatentDiffusion
from models.sdxl_layout import (
    ORIGINAL_PREFIX,
    SDXL_SCALE_FACTOR,
    infer_sdxl_text,
    sdxl_conditioner_from_original,
    sdxl_model_config,
    sdxl_prediction_type,
    sdxl_text_config,
    sdxl_unet,
    text_encoder_folders,
    text_encoder_key,
    tokenizer_dirs,
)
from models.tensor_files import CheckpointError, StateDict, TensorFile, open_tensor_file
from models.text.sdxl import SDXLTextConditioner

log = logging.getLogger(__name__)


def set_tokenizers(model: LatentDiffusion, dirs: list[Path | None]) -> None:
    """Give an SDXL model's encoders their tokenizer folders (in encoder order)."""
    if isinstance(model.conditioner, SDXLTextConditioner):
        model.conditioner.set_tokenizers(dirs)


def given_tokenizers(model_encoders: int, tokenizer_dir: Path | None,
                     tokenizer_2_dir: Path | None) -> list[Path | None]:
    """`--tokenizer` and `--tokenizer-2` per encoder: the base takes both in order; the refiner's one encoder is
    bigG, the second tokenizer of SDXL, so it takes `--tokenizer-2` (or `--tokenizer` when that is all given)."""
    if model_encoders == 2:
        return [tokenizer_dir, tokenizer_2_dir]
    return [tokenizer_2_dir or tokenizer_dir]


def load_sdxl_folder(folder: Path, index: Mapping[str, Any], *, tokenizer_dir: Path | None = None,
                     tokenizer_2_dir: Path | None = None, prediction_type: PredictionType | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """A diffusers StableDiffusionXL(Img2Img)Pipeline folder (base or refiner)."""
    sched_path = folder / "scheduler" / "scheduler_config.json"
    unet_json = read_json(folder / "unet" / "config.json")
    try:
        unet = unet_config_from_diffusers(unet_json)
        if unet.adm_in_channels is None:
            raise UnsupportedConfigError("an SDXL pipeline whose UNet has no addition_embed_type 'text_time'")
        ae_config, scale = autoencoder_config_from_diffusers(read_json(folder / "vae" / "config.json"))
        text = sdxl_text_config(folder, index, unet_json)
        schedule = schedule_config_from_diffusers(read_json(sched_path)) if sched_path.is_file() else None
        schedule = schedule or ScheduleConfig(prediction_type=prediction_type or "epsilon")
        config = sdxl_model_config(folder.name, unet, ae_config, schedule, text, scale,
                                   default_size_from_diffusers(unet_json, ae_config))
    except (UnsupportedConfigError, KeyError) as err:
        what = f"missing config field {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{folder}: {what}") from None
    _check_prediction_type(sched_path, config.schedule, prediction_type)
    model = _build(config, None)
    found = tokenizer_dirs(folder, text)
    given = given_tokenizers(len(text.encoders), tokenizer_dir, tokenizer_2_dir)
    set_tokenizers(model, [g or f for g, f in zip(given, found, strict=True)])
    conditioner: Sources = {}
    for i, sub in enumerate(text_encoder_folders(text)):
        file = open_tensor_file(_weights_in(folder / sub, ("model", "pytorch_model")))
        conditioner |= {text_encoder_key(i, k): Stored(file, k, t.shape) for k, t in file.meta.items()
                        if not k.endswith("position_ids")}
    parts = diffusers_unet_and_vae(folder, model, unet, ae_config)
    parts["conditioner"] = conditioner
    load_parts_strict(model, parts, str(folder), dtype)
    log.info("loaded %s (family %s) from %s", config.name, config.family, folder)
    return _finish(model, device, dtype)


def sdxl_file_config(path: Path, file: TensorFile, prediction_type: PredictionType | None = None
                     ) -> tuple[ModelConfig, dict[str, Sources], StateDict]:
    """An original SDXL file's config, where each UNet and VAE tensor is, and its conditioner in our keys (read:
    bigG's fused q/k/v are split in memory)."""
    groups: dict[str, Sources] = {"unet": {}, "autoencoder": {}}
    raw: StateDict = {}
    unexpected = []
    for key in file.meta:
        if key in ("v_pred", "ztsnr"):
            continue
        part = next((p for p in groups if key.startswith(PREFIXES[p])), None)
        if part is not None:
            groups[part][key[len(PREFIXES[part]):]] = Stored(file, key, file.meta[key].shape)
        elif key.startswith(ORIGINAL_PREFIX):
            raw[key] = file.read(key)
        else:
            unexpected.append(key)
    try:
        if unexpected:
            raise CheckpointError(f"unexpected keys outside an SDXL file's parts: {sorted(unexpected)[:8]}")
        conditioner = sdxl_conditioner_from_original(raw)
        unet = _inferred("unet", infer_unet_config, {k: file.meta[s.key] for k, s in groups["unet"].items()})
        adm = unet.adm_in_channels
        if adm is None:
            raise CheckpointError("an SDXL conditioner with a UNet that takes no added vector (no "
                                  "model.diffusion_model.label_emb.0.0.weight)")
        # cross-attention's key width is the context's (shape inference cannot tell it from self-attention's
        # when it equals the channels; an SDXL UNet always has a text context)
        to_k = next(stored for key, stored in groups["unet"].items() if key.endswith(".attn2.to_k.weight"))
        unet = dataclasses.replace(unet, context_dim=to_k.shape[1])
        text = infer_sdxl_text(conditioner, adm)
        autoencoder = _inferred("autoencoder", infer_autoencoder_config,
                                {k: file.meta[s.key] for k, s in groups["autoencoder"].items()})
        schedule = ScheduleConfig(prediction_type=sdxl_prediction_type(file.meta, prediction_type))
        config = sdxl_model_config(path.stem, sdxl_unet(unet, text), autoencoder, schedule, text,
                                   SDXL_SCALE_FACTOR, 1024)
    except KeyError as err:
        raise CheckpointError(f"{path}: missing conditioner key {err.args[0]}, needed to infer the architecture") \
            from None
    except (UnsupportedConfigError, CheckpointError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return config, groups, conditioner


def load_sdxl_file(path: Path, file: TensorFile, *, tokenizer_dir: Path | None = None,
                   tokenizer_2_dir: Path | None = None, prediction_type: PredictionType | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """An original SDXL single file (`conditioner.embedders.*`, `model.diffusion_model.*`, `first_stage_model.*`).
    Shapes give the architecture; heads (64 channels), the VAE scale (0.13025), the schedule (SD's) and the
    default size (1024) are SDXL's, which no tensor records."""
    config, groups, conditioner = sdxl_file_config(path, file, prediction_type)
    text = config.conditioner.sdxl if config.conditioner is not None else None
    assert text is not None
    model = _build(config, None)
    set_tokenizers(model, given_tokenizers(len(text.encoders), tokenizer_dir, tokenizer_2_dir))
    parts = {"unet": groups["unet"], "autoencoder": groups["autoencoder"],
             "conditioner": in_memory_sources(path, {"conditioner": conditioner})["conditioner"]}
    load_parts_strict(model, parts, str(path), dtype)
    log.info("loaded %s (family %s) from %s", config.name, config.family, path)
    return _finish(model, device, dtype)
