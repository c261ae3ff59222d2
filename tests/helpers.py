"""Shared test helpers: a CLIP tokenizer folder trained here, random weights, diffusers twins.

Nothing here downloads: the CLIP vocabulary is a tiny BPE learned from a paragraph, and diffusers /
transformers models are built from our own weights with diffusers' own single-file converters.
"""

import collections
import json
import re
from pathlib import Path
from typing import Any, TypeVar

import torch

from models.autoencoder import AutoencoderConfig
from models.tokenizers import BOS, EOS, bytes_to_unicode
from models.unet import UNetConfig

M = TypeVar("M", bound=torch.nn.Module)


CORPUS = """
A photograph of an astronaut riding a horse on the moon. A painting of a castle in the mountains at
sunset, highly detailed, trending on artstation. It's a dog's life; they're happy, we've been there,
I'm sure you'll see what he'd do. The quick brown fox jumps over the lazy dog. Portrait of a woman
with red hair, oil on canvas, by a famous painter. A cat sitting on a windowsill watching the rain.
Numbers like 1999, 2024 and 3.14 appear in prompts too. Café au lait, naïve art, über cool, jalapeño.
A beautiful landscape with rivers, forests and lakes; photorealistic, 8k, cinematic lighting.
An old man reading a newspaper in a crowded train station, black and white photography.
Science fiction city with flying cars and neon lights, cyberpunk style, digital art.
Watercolor illustration of flowers in a vase; still life; soft colors; morning light.
"""


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """A tiny BPE trainer in CLIP's format: byte-mapped symbols, `</w>` on a word's last symbol,
    repeatedly merge the most frequent adjacent pair (ties: the smallest pair, for determinism)."""
    enc = bytes_to_unicode()
    words = collections.Counter(re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", text.lower()))
    split = {w: [*[enc[b] for b in w.encode()][:-1], enc[w.encode()[-1]] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, count in words.items():
            for pair in zip(split[w], split[w][1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges.append(best)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = out
    return merges


def write_clip_tokenizer(folder: Path, n_merges: int = 300) -> Path:
    """vocab.json + merges.txt laid out like CLIP's: bytes, bytes + `</w>`, merges, then the specials."""
    chars = list(bytes_to_unicode().values())
    merges = train_bpe(CORPUS, n_merges)
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder




def randomize(model: M, seed: int) -> M:
    """Seeded random weights everywhere (zero-init convs and norm affines included), so a swapped or
    dropped tensor cannot hide behind a zero or an identity."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            state[name] = p
        elif p.ndim >= 2:
            state[name] = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        else:
            state[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def original_config(unet: UNetConfig, vae: AutoencoderConfig) -> dict[str, Any]:
    """The parts of an original `v1-inference.yaml`-style config that diffusers' config builders read."""
    unet_params: dict[str, Any] = {
        "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "model_channels": unet.model_channels, "channel_mult": list(unet.channel_mult),
        "num_res_blocks": unet.num_res_blocks, "attention_resolutions": list(unet.attention_resolutions),
        "transformer_depth": unet.transformer_depth, "context_dim": unet.context_dim,
        "use_linear_in_transformer": unet.use_linear_in_transformer,
    }
    if unet.num_heads != -1:
        unet_params["num_heads"] = unet.num_heads
    else:
        unet_params["num_head_channels"] = unet.num_head_channels
    if unet.num_classes is not None:
        unet_params["num_classes"] = unet.num_classes
    ddconfig = {
        "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae.ch,
        "ch_mult": list(vae.ch_mult), "num_res_blocks": vae.num_res_blocks, "z_channels": vae.z_channels,
    }
    return {"model": {"params": {"unet_config": {"params": unet_params},
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def diffusers_unet(checkpoint: dict[str, torch.Tensor], unet: UNetConfig) -> Any:
    """diffusers' UNet2DConditionModel from an original-layout checkpoint, by diffusers' converter."""
    import diffusers
    from diffusers.loaders import single_file_utils

    config = single_file_utils.create_unet_diffusers_config_from_ldm(
        original_config(unet, AutoencoderConfig()), checkpoint
    )
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**config)
    theirs.load_state_dict(converted, strict=True, assign=True)
    return theirs.eval()


def diffusers_vae(checkpoint: dict[str, torch.Tensor], vae: AutoencoderConfig) -> Any:
    """diffusers' AutoencoderKL from an original-layout checkpoint, by diffusers' converter."""
    import diffusers
    from diffusers.loaders import single_file_utils

    config = single_file_utils.create_vae_diffusers_config_from_ldm(original_config(UNetConfig(), vae), checkpoint)
    converted = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**config)
    theirs.load_state_dict(converted, strict=True, assign=True)
    return theirs.eval()
