"""SD 2's text encoder in the original single-file layout (OpenCLIP names), read into the CLIP layout.

SD 2 conditions on OpenCLIP ViT-H/14's text transformer, `FrozenOpenCLIPEmbedder(layer="penultimate")`:
token + position embeddings, the residual blocks but the last, then `ln_final`, no projection. That is
the CLIP text transformer with exact GELU, so we run it as `CLIPTextModel` (models/text.py) with one
layer fewer, as diffusers folders store it. The file's keys under `cond_stage_model.`:

    model.token_embedding.weight              -> transformer.text_model.embeddings.token_embedding.weight
    model.positional_embedding [L, D]         -> transformer.text_model.embeddings.position_embedding.weight
    model.transformer.resblocks.i.ln_1/ln_2   -> transformer.text_model.encoder.layers.i.layer_norm1/2
    model.transformer.resblocks.i.attn.in_proj_weight/bias [3D, D]
                                              -> ...layers.i.self_attn.{q,k,v}_proj (rows split in thirds)
    model.transformer.resblocks.i.attn.out_proj -> ...layers.i.self_attn.out_proj
    model.transformer.resblocks.i.mlp.c_fc/c_proj -> ...layers.i.mlp.fc1/fc2
    model.ln_final                            -> transformer.text_model.final_layer_norm

Dropped by name: the last residual block (the penultimate layer's output is the context, so the last
block never runs), `text_projection` and `logit_scale` (CLIP's contrastive head, unused by SD), and
`attn_mask` (the causal mask, which the attention rebuilds).
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

OPENCLIP_PREFIX = "model."  # OpenCLIP's keys inside cond_stage_model.*
_CLIP = "transformer.text_model."
_BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_UNUSED = ("text_projection", "logit_scale", "attn_mask")
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def is_openclip(conditioner: StateDict) -> bool:
    """Whether conditioner keys (without `cond_stage_model.`) are OpenCLIP's (SD 2), not HF CLIP's (SD 1)."""
    return any(k.startswith(OPENCLIP_PREFIX + "transformer.resblocks.") for k in conditioner)


def openclip_to_clip(sd: StateDict, *, all_blocks: bool = False) -> StateDict:
    """OpenCLIP text keys (`model.*`) -> our CLIP keys, without the last block (SD 2: penultimate output) unless
    `all_blocks` (SDXL's bigG, whose last block makes the pooled output). Raises ValueError naming any key that
    has no place in the layout."""
    blocks = {int(m[1]) for k in sd if (m := _BLOCK.match(k.removeprefix(OPENCLIP_PREFIX)))}
    if not blocks:
        raise ValueError("no OpenCLIP residual blocks (cond_stage_model.model.transformer.resblocks.*)")
    last = max(blocks)
    out: StateDict = {}
    unknown = []
    for key, tensor in sd.items():
        name = key.removeprefix(OPENCLIP_PREFIX)
        if not key.startswith(OPENCLIP_PREFIX):
            unknown.append(key)
        elif name in _UNUSED:
            continue
        elif name == "token_embedding.weight":
            out[_CLIP + "embeddings.token_embedding.weight"] = tensor
        elif name == "positional_embedding":
            out[_CLIP + "embeddings.position_embedding.weight"] = tensor
        elif name.startswith("ln_final."):
            out[_CLIP + "final_layer_norm." + name.removeprefix("ln_final.")] = tensor
        elif m := _BLOCK.match(name):
            if (all_blocks or int(m[1]) != last) and not _block_key(out, int(m[1]), m[2], tensor):
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"OpenCLIP text encoder keys with no known meaning: {sorted(unknown)[:8]}")
    return out


def _block_key(out: StateDict, i: int, rest: str, tensor: torch.Tensor) -> bool:
    layer = f"{_CLIP}encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.removeprefix("attn.in_proj_")
        for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
            out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk
        return True
    for old, new in _BLOCK_RENAMES.items():
        if rest.startswith(old + "."):
            out[layer + new + rest[len(old):]] = tensor
            return True
    return False


def clip_to_openclip(sd: StateDict) -> StateDict:
    """The inverse of `openclip_to_clip` for the blocks it keeps (q, k, v fused back into in_proj): tests
    write original-layout SD 2 files with it, adding the unused last block and projection themselves."""
    out: StateDict = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    inverse = {new: old for old, new in _BLOCK_RENAMES.items()}
    for key, tensor in sd.items():
        name = key.removeprefix(_CLIP)
        if name == "embeddings.token_embedding.weight":
            out[OPENCLIP_PREFIX + "token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            out[OPENCLIP_PREFIX + "positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            out[OPENCLIP_PREFIX + "ln_final." + name.removeprefix("final_layer_norm.")] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
            fused.setdefault(f"{OPENCLIP_PREFIX}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)", name):
            rest = next(inverse[new] + m[2][len(new):] for new in inverse if m[2].startswith(new + "."))
            out[f"{OPENCLIP_PREFIX}transformer.resblocks.{m[1]}.{rest}"] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for CLIP text key {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
