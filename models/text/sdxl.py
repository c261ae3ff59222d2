"""SDXL's text conditioning: two CLIP text transformers, their penultimate layers side by side, and a pooled
vector that, with the micro-conditioning, joins the time embedding.

SDXL (Podell et al. 2023, "Improving Latent Diffusion Models") conditions its UNet on
- a context [N, 77, 768 + 1280]: the hidden states *before* the last block of OpenAI's CLIP ViT-L (quick_gelu)
  and of OpenCLIP ViT-bigG (exact gelu), concatenated along channels, no final LayerNorm;
- a vector y [N, 1280 + 6 x 256]: bigG's pooled output (final LayerNorm of the last block's output at the first
  end-of-text token, through `text_projection`), then the sinusoidal embeddings (256 wide, cos first, as the
  timestep's) of original size (h, w), crop top-left (top, left) and target size (h, w).
The refiner has bigG alone and conditions on an aesthetic score in place of the target size (5 numbers).

Module names: `embedders.<i>.transformer.text_model.*` (HF's CLIPTextModel, as an SDXL file's
`conditioner.embedders.0.*` holds ViT-L) and `embedders.<i>.text_projection.weight` on the pooled encoder
(HF's CLIPTextModelWithProjection: out = W x). Both encoders keep their every block: the last block of the
pooled encoder makes the pooled vector; that of ViT-L is unused but is part of every SDXL file and folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from models.layers import Linear
from models.text.base import EncodedPrompts, device_of
from models.text.clip import CLIPTextConfig, CLIPTextModel, MissingTokenizerError
from models.tokenizers import CLIPTokenizer
from models.unet import timestep_embedding

#: SDXL base's encoders: OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (pads with "!")
CLIP_L = CLIPTextConfig()
CLIP_BIGG = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                           hidden_act="gelu", pad_token="!")
#: what the micro-conditioning numbers are: base (original size, crop, target size), refiner (original size,
#: crop, aesthetic score)
Micro = Literal["size", "aesthetic"]
MICRO_COUNT: dict[Micro, int] = {"size": 6, "aesthetic": 5}
#: the vectors of an SDXL textual-inversion embedding, by encoder (A1111's and diffusers' file keys)
EMBEDDING_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class SDXLTextConfig:
    """The encoders in context order (the last one is pooled and projected), and the added vector's make-up.

    force_zeros_for_empty_prompt: an empty negative prompt is a zero context and a zero pooled vector rather
    than the encoding of "" (diffusers' pipeline flag of that name; SDXL base: on, refiner: off)."""

    encoders: tuple[CLIPTextConfig, ...] = (CLIP_L, CLIP_BIGG)
    projection_dim: int = 1280
    micro: Micro = "size"
    time_embed_dim: int = 256
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self) -> None:
        if not self.encoders:
            raise ValueError("SDXLTextConfig needs at least one text encoder")
        if self.micro not in MICRO_COUNT:
            raise ValueError(f"SDXLTextConfig.micro must be one of {list(MICRO_COUNT)}, got {self.micro!r}")

    @property
    def context_dim(self) -> int:
        return sum(e.hidden_size for e in self.encoders)

    @property
    def vector_dim(self) -> int:
        """Width of the UNet's added vector y (`adm_in_channels`): base 2816, refiner 2560."""
        return self.projection_dim + MICRO_COUNT[self.micro] * self.time_embed_dim


class SDXLTextEncoder(nn.Module):
    """One CLIP text transformer; `projection_dim` makes it the pooled (projected) one."""

    def __init__(self, config: CLIPTextConfig, projection_dim: int | None = None) -> None:
        super().__init__()
        self.transformer = CLIPTextModel(config)
        self.text_projection = (Linear(config.hidden_size, projection_dim, bias=False)
                                if projection_dim is not None else None)

    def forward(self, ids: Tensor, eos_id: int, tokens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """ids [N, L] -> (penultimate hidden states [N, L, D], projected pooled [N, P] or None). `tokens` [N, L, D]:
        token embeddings in place of `ids`' (textual inversion puts its vectors there)."""
        text = self.transformer.text_model
        if ids.shape[1] > text.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens do not fit CLIP's {text.max_positions} positions")
        h = text.embeddings(ids, tokens)
        layers = text.encoder.layers
        for layer in layers[:-1]:
            h = layer(h)
        if self.text_projection is None:
            return h, None
        last = text.final_layer_norm(layers[-1](h))  # [N, L, D]
        eos = (ids == eos_id).int().argmax(dim=1)  # the first end-of-text token (transformers' rule)
        pooled: Tensor = self.text_projection(last[torch.arange(ids.shape[0], device=ids.device), eos])
        return h, pooled


class SDXLTextConditioner(nn.Module):
    """Prompts -> context [N, 77, sum of widths] with the pooled vector [N, projection_dim]."""

    def __init__(self, config: SDXLTextConfig, tokenizer_dirs: Sequence[Path | None] = ()) -> None:
        super().__init__()
        self.config = config
        last = len(config.encoders) - 1
        self.embedders = nn.ModuleList(
            SDXLTextEncoder(c, config.projection_dim if i == last else None) for i, c in enumerate(config.encoders))
        self.context_dim = config.context_dim
        self.tokenizers: list[CLIPTokenizer | None] = [None] * len(config.encoders)
        self.set_tokenizers(tokenizer_dirs)
        self.requires_grad_(False)

    def set_tokenizers(self, dirs: Sequence[Path | None]) -> None:
        """One tokenizer folder (vocab.json + merges.txt) per encoder, in order; None leaves one unset."""
        if len(dirs) > len(self.tokenizers):
            raise ValueError(f"{len(dirs)} tokenizer folders for {len(self.tokenizers)} text encoders")
        for i, folder in enumerate(dirs):
            if folder is None:
                continue
            clip = self.config.encoders[i]
            tokenizer = CLIPTokenizer.from_dir(folder, max_length=clip.max_positions, pad_token=clip.pad_token)
            if tokenizer.vocab_size > clip.vocab_size:
                raise ValueError(f"tokenizer {folder} ({tokenizer.vocab_size} tokens) does not fit text encoder "
                                 f"{i + 1} ({clip.vocab_size} tokens)")
            self.tokenizers[i] = tokenizer

    def require_tokenizers(self) -> list[CLIPTokenizer]:
        """The encoders' tokenizers, in order; MissingTokenizerError naming the flags of those not given."""
        missing = [i for i, t in enumerate(self.tokenizers) if t is None]
        if missing:
            # the base's encoders take --tokenizer and --tokenizer-2; the refiner's one (bigG) --tokenizer-2
            names = ["--tokenizer DIR", "--tokenizer-2 DIR"][-len(self.tokenizers):]
            flags = " ".join(names[i] for i in missing)
            raise MissingTokenizerError(
                f"SDXL text encoder(s) {[i + 1 for i in missing]} have no tokenizer: give {flags} (the "
                "`tokenizer/` and `tokenizer_2/` folders of a diffusers SDXL repository; the refiner has only the "
                "second)")
        return [t for t in self.tokenizers if t is not None]

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """The keys of the encoders' vectors in an SDXL textual-inversion file, in order: `clip_l` (ViT-L) and
        `clip_g` (bigG) for the base, `clip_g` for the refiner (its one encoder is bigG)."""
        return EMBEDDING_KEYS[-len(self.embedders):]

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokenizers = self.require_tokenizers()
        device = device_of(self)
        contexts: list[Tensor] = []
        warnings: list[str] = []
        pooled: Tensor | None = None
        for encoder, tokenizer in zip(self.embedders, tokenizers, strict=True):
            tokens = tokenizer.tokenize(prompts)
            if not warnings:
                warnings = list(tokens.warnings)
            context, pooled = encoder(tokens.ids.to(device), tokenizer.eos_id)
            contexts.append(context)
        return EncodedPrompts(torch.cat(contexts, dim=-1), warnings, pooled)


def added_vector(pooled: Tensor, micro: Tensor, time_embed_dim: int) -> Tensor:
    """y [N, P + k * time_embed_dim]: the pooled text, then each of the k micro-conditioning numbers [N, k]
    embedded as a timestep is (diffusers' `add_time_proj`, the original's ConcatTimestepEmbedderND)."""
    n = micro.shape[0]
    embedded = timestep_embedding(micro.reshape(-1), time_embed_dim).reshape(n, -1)  # [N, k * 256]
    return torch.cat([pooled, embedded.to(pooled.dtype)], dim=1)
