"""SDXL base, refiner and inpainting in: diffusers folders and original (Stability `sgm`) single files.

A diffusers SDXL folder: `model_index.json` (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline or
StableDiffusionXLInpaintPipeline, with `force_zeros_for_empty_prompt` and, for the refiner,
`requires_aesthetics_score`), `unet/` (addition_embed_type 'text_time'), `text_encoder/` (CLIPTextModel, ViT-L;
absent in the refiner), `text_encoder_2/` (CLIPTextModelWithProjection, bigG), `tokenizer/`, `tokenizer_2/`,
`vae/`, `scheduler/`.

An original single file: `model.diffusion_model.*` (the UNet; `label_emb.0.{0,2}` is the added vector's MLP),
`first_stage_model.*`, and `conditioner.embedders.<i>.*`: the base's embedder 0 is HF's CLIP ViT-L
(`transformer.text_model.*`), embedder 1 OpenCLIP bigG (`model.*`: fused q/k/v, every block used,
`model.text_projection` [width, proj] applied as x @ P); the refiner's embedder 0 is bigG. Ours are
`cond_stage_model.embedders.<i>.transformer.text_model.*` + `.text_projection.weight` (= P transposed), which
`sdxl_conditioner_from_original` / `sdxl_conditioner_to_original` convert.

The family is read, never guessed from names: two encoders and a 6-number added vector is the base, bigG alone
with 5 numbers (an aesthetic score) the refiner; the base's conditioning with a 9-channel UNet (latent, mask,
masked-image latent) is SDXL inpainting; every other combination is refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.autoencoder import AutoencoderConfig
from models.conditioners import ConditionerConfig
from models.config import Family, ModelConfig
from models.diffusers_layout import (
    UnsupportedConfigError,
    clip_config_from_transformers,
    read_json,
)
from models.diffusion import PredictionType, ScheduleConfig
from models.openclip_layout import clip_to_openclip, openclip_to_clip
from models.tensor_files import CheckpointError, StateDict
from models.text.clip import CLIPTextConfig
from models.text.sdxl import CLIP_BIGG, MICRO_COUNT, Micro, SDXLTextConfig
from models.unet import UNetConfig

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
#: SDXL's VAE latent scale (sgm's `scale_factor`, diffusers' vae `scaling_factor`): single files do not store it
SDXL_SCALE_FACTOR = 0.13025
ORIGINAL_PREFIX = "conditioner.embedders."
_OURS = "embedders."
#: model_index.json fields read (components are the entries whose value is a [library, class] pair)
_INDEX_READ = {"force_zeros_for_empty_prompt", "requires_aesthetics_score"}


# --------------------------------------------------------------------------- diffusers folders


def sdxl_text_config(folder: Path, index: Mapping[str, Any], unet_cfg: Mapping[str, Any]) -> SDXLTextConfig:
    """The text side of an SDXL folder: its encoders' configs, the pooled projection and the added vector, every
    field that changes the math read or refused by name."""
    unknown = sorted(k for k, v in index.items() if not k.startswith("_") and k not in _INDEX_READ
                     and not (isinstance(v, list) and len(v) == 2))
    if unknown:
        raise UnsupportedConfigError(f"model_index.json has fields this loader does not know: {unknown}")
    encoders: list[CLIPTextConfig] = []
    if _component(folder, index, "text_encoder"):
        encoders.append(clip_config_from_transformers(read_json(folder / "text_encoder" / "config.json")))
    if not _component(folder, index, "text_encoder_2"):
        raise UnsupportedConfigError("an SDXL folder without text_encoder_2 (the pooled OpenCLIP bigG encoder)")
    second = read_json(folder / "text_encoder_2" / "config.json")
    encoders.append(clip_config_from_transformers(second, "CLIPTextModelWithProjection"))
    aesthetic = bool(index.get("requires_aesthetics_score", False))
    micro: Micro = "aesthetic" if aesthetic else "size"
    text = SDXLTextConfig(
        encoders=tuple(encoders), projection_dim=int(second.get("projection_dim", second["hidden_size"])),
        micro=micro, time_embed_dim=int(unet_cfg["addition_time_embed_dim"]),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    check_sdxl_text(text, int(unet_cfg["projection_class_embeddings_input_dim"]))
    return text


def _component(folder: Path, index: Mapping[str, Any], name: str) -> bool:
    """Whether the folder has component `name` (model_index.json lists [null, null] for an absent one)."""
    entry = index.get(name)
    listed = isinstance(entry, list) and entry[0] is not None
    return listed and (folder / name / "config.json").is_file()


def check_sdxl_text(text: SDXLTextConfig, vector_dim: int) -> None:
    """The UNet's added-vector width must be what the encoders and micro-conditioning make: base = 2 encoders
    and 6 numbers, refiner = bigG alone and 5 numbers (an aesthetic score)."""
    if vector_dim != text.vector_dim:
        raise UnsupportedConfigError(
            f"the UNet's added vector is {vector_dim} wide, but a {text.projection_dim}-wide pooled text and "
            f"{MICRO_COUNT[text.micro]} micro-conditioning numbers x {text.time_embed_dim} make {text.vector_dim}")
    if (len(text.encoders), text.micro) not in ((2, "size"), (1, "aesthetic")):
        raise UnsupportedConfigError(
            f"{len(text.encoders)} text encoder(s) with micro-conditioning {text.micro!r}: supported are SDXL base "
            "(CLIP ViT-L + bigG, sizes) and the refiner (bigG alone, requires_aesthetics_score)")


def sdxl_family(text: SDXLTextConfig, unet: UNetConfig, latent_channels: int) -> Family:
    """Base, refiner or inpainting, from the encoders' make-up and the UNet's input: a base's conditioning with a
    UNet taking latent + mask + masked-image latent (2 x latent + 1 channels) is SDXL inpainting
    (`diffusers/stable-diffusion-xl-1.0-inpainting-0.1`); any other input width is refused by name."""
    inpainting = 2 * latent_channels + 1
    if unet.in_channels not in (latent_channels, inpainting):
        raise UnsupportedConfigError(
            f"an SDXL UNet with {unet.in_channels} input channels: expected {latent_channels} (base, refiner) or "
            f"{inpainting} (inpainting: latent, mask, masked-image latent)")
    if unet.in_channels == inpainting:
        if text.micro != "size":
            raise UnsupportedConfigError("an SDXL refiner (aesthetic-score conditioning) with an inpainting UNet "
                                         f"({inpainting} input channels): only the base's inpainting model loads")
        return "sdxl_inpainting"
    return "sdxl_refiner" if text.micro == "aesthetic" else "sdxl"


def sdxl_model_config(name: str, unet: UNetConfig, autoencoder: AutoencoderConfig, schedule: ScheduleConfig,
                      text: SDXLTextConfig, scale_factor: float, default_size: int) -> ModelConfig:
    if unet.context_dim != text.context_dim:
        raise UnsupportedConfigError(f"the UNet's cross-attention is {unet.context_dim} wide, the text encoders "
                                     f"make {text.context_dim}")
    family = sdxl_family(text, unet, autoencoder.embed_dim)
    inpainting = family == "sdxl_inpainting"
    return ModelConfig(name=name, family=family, unet=unet, autoencoder=autoencoder, schedule=schedule,
                       conditioner=ConditionerConfig(kind="sdxl", sdxl=text),
                       conditioning="hybrid" if inpainting else "crossattn",
                       concat_input="inpaint" if inpainting else "none",
                       scale_factor=scale_factor, default_size=default_size)


def tokenizer_dirs(folder: Path, text: SDXLTextConfig) -> list[Path | None]:
    """The folder's tokenizer folders, one per encoder (the refiner's one encoder uses tokenizer_2/)."""
    names = ["tokenizer", "tokenizer_2"][-len(text.encoders):]
    return [folder / n if (folder / n).is_dir() else None for n in names]


def text_encoder_folders(text: SDXLTextConfig) -> list[str]:
    return ["text_encoder", "text_encoder_2"][-len(text.encoders):]


def text_encoder_key(index: int, key: str) -> str:
    """A transformers CLIPTextModel(WithProjection) key -> ours under embedder `index` (no `text_model.` level in
    transformers >= 5's CLIPTextModel files)."""
    if key == "text_projection.weight":
        return f"{_OURS}{index}.text_projection.weight"
    return f"{_OURS}{index}.transformer." + (key if key.startswith("text_model.") else "text_model." + key)


# --------------------------------------------------------------------------- original single files


def is_sdxl_file(keys: Mapping[str, Any]) -> bool:
    return any(k.startswith(ORIGINAL_PREFIX) for k in keys)


def sdxl_conditioner_from_original(sd: StateDict) -> StateDict:
    """`conditioner.embedders.<i>.*` (prefix included) -> our SDXL conditioner keys. HF CLIP embedders keep their
    names; OpenCLIP ones (`model.*`) are converted with every block kept and `text_projection` transposed into a
    Linear weight. Raises CheckpointError naming a key with no place."""
    by_embedder: dict[int, StateDict] = {}
    for key, tensor in sd.items():
        m = re.match(r"conditioner\.embedders\.(\d+)\.(.+)", key)
        if m is None:
            raise CheckpointError(f"unexpected SDXL conditioner key {key}")
        by_embedder.setdefault(int(m[1]), {})[m[2]] = tensor
    if sorted(by_embedder) != list(range(len(by_embedder))):
        raise CheckpointError(f"SDXL conditioner embedders {sorted(by_embedder)}: expected 0..{len(by_embedder) - 1}")
    out: StateDict = {}
    for i, keys in sorted(by_embedder.items()):
        if any(k.startswith("model.") for k in keys):
            projection = keys.pop("model.text_projection", None)
            if projection is None:
                raise CheckpointError(f"missing key {ORIGINAL_PREFIX}{i}.model.text_projection (bigG's pooled output)")
            try:
                clip = openclip_to_clip(keys, all_blocks=True)
            except ValueError as err:
                raise CheckpointError(f"{ORIGINAL_PREFIX}{i}.*: {err}") from None
            out |= {f"{_OURS}{i}.{k}": v for k, v in clip.items()}
            out[f"{_OURS}{i}.text_projection.weight"] = projection.t()
        else:
            stray = sorted(k for k in keys if not k.startswith("transformer.text_model."))
            if stray:
                raise CheckpointError(f"SDXL embedder {i} keys with no known meaning: {stray[:8]}")
            out |= {f"{_OURS}{i}.{k}": v for k, v in keys.items() if not k.endswith("position_ids")}
    return out


def sdxl_conditioner_to_original(sd: StateDict) -> StateDict:
    """The inverse of `sdxl_conditioner_from_original` (ours -> `conditioner.embedders.*`): the pooled embedder
    becomes OpenCLIP's layout (fused q/k/v, `model.text_projection` = P), the others stay HF CLIP. Tests write
    original-layout SDXL files with it."""
    by_embedder: dict[int, StateDict] = {}
    for key, tensor in sd.items():
        m = re.match(r"embedders\.(\d+)\.(.+)", key)
        if m is None:
            raise ValueError(f"not an SDXL conditioner key: {key}")
        by_embedder.setdefault(int(m[1]), {})[m[2]] = tensor
    out: StateDict = {}
    for i, keys in by_embedder.items():
        prefix = f"{ORIGINAL_PREFIX}{i}."
        projection = keys.pop("text_projection.weight", None)
        if projection is None:
            out |= {prefix + k: v for k, v in keys.items()}
            continue
        out |= {prefix + k: v for k, v in clip_to_openclip(keys).items()}
        out[prefix + "model.text_projection"] = projection.t().contiguous()
    return out


def infer_sdxl_text(conditioner: StateDict, vector_dim: int) -> SDXLTextConfig:
    """The encoders' sizes from our conditioner keys; the OpenCLIP (pooled) one is bigG-like (gelu, pads "!"), the
    HF one OpenAI's ViT-L (quick_gelu). Heads: CLIP's 64-channel ones (not stored). An empty negative prompt is
    zeros for the base (its diffusers folders say force_zeros_for_empty_prompt), encoded "" for the refiner."""
    encoders = []
    n = len({k.split(".")[1] for k in conditioner})
    for i in range(n):
        p = f"{_OURS}{i}.transformer.text_model."
        tok = conditioner[p + "embeddings.token_embedding.weight"]
        width = tok.shape[1]
        pooled = i == n - 1
        encoders.append(CLIPTextConfig(
            vocab_size=tok.shape[0], hidden_size=width,
            intermediate_size=conditioner[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_layers=len({k[len(p):].split(".")[2] for k in conditioner if k.startswith(p + "encoder.layers.")}),
            num_heads=width // 64 if width % 64 == 0 else 1,
            max_positions=conditioner[p + "embeddings.position_embedding.weight"].shape[0],
            hidden_act="gelu" if pooled else "quick_gelu", pad_token=CLIP_BIGG.pad_token if pooled else None))
    projection = conditioner[f"{_OURS}{n - 1}.text_projection.weight"].shape[0]
    micro: Micro = "aesthetic" if n == 1 else "size"
    # the micro-conditioning's embedding width is in no tensor but follows from the MLP's input (SDXL: 256)
    time_dim = (vector_dim - projection) // MICRO_COUNT[micro]
    text = SDXLTextConfig(encoders=tuple(encoders), projection_dim=projection, micro=micro, time_embed_dim=time_dim,
                          force_zeros_for_empty_prompt=micro == "size")
    check_sdxl_text(text, vector_dim)
    return text


def sdxl_prediction_type(keys: Mapping[str, Any], given: PredictionType | None) -> PredictionType:
    """SDXL files are epsilon unless they carry the `v_pred` marker key (v-prediction fine-tunes, as ComfyUI
    reads them); a `ztsnr` marker (zero terminal SNR) is refused, as in diffusers folders."""
    if "ztsnr" in keys:
        raise CheckpointError("this SDXL file is marked zero-terminal-SNR (key `ztsnr`), which is not supported")
    found: PredictionType = "v_prediction" if "v_pred" in keys else "epsilon"
    if given is not None and given != found:
        raise CheckpointError(f"prediction type {given!r} asked, but the file is {found!r} "
                              f"({'a v_pred key' if found == 'v_prediction' else 'no v_pred key'})")
    return found


def sdxl_unet(unet: UNetConfig, text: SDXLTextConfig) -> UNetConfig:
    """An inferred UNet made SDXL's: 64-channel heads (sgm's `num_head_channels: 64`; no tensor stores it)."""
    if unet.context_dim != text.context_dim:
        raise CheckpointError(f"the UNet's cross-attention is {unet.context_dim} wide, the SDXL text encoders make "
                              f"{text.context_dim}")
    return dataclasses.replace(unet, num_heads=-1, num_head_channels=64)
