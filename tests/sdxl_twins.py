"""SDXL-structured diffusers parts at reduced width, with random weights, for the SDXL parity tests.

A 3-level UNet (no attention at the first level, 1 / 2 / 3 transformer blocks per level and the middle block's 3,
64-channel heads, linear projections, the `text_time` added embedding of a pooled text vector and 6
Fourier-embedded micro-conditioning numbers), CLIP ViT-L-like (quick_gelu) and bigG-like (gelu, pads with "!",
projected pooled output) text encoders of 3 blocks each, a KL VAE. `sdxl_pipeline` puts them together as
diffusers' StableDiffusionXLPipeline (or its inpainting pipeline, with a 9-channel UNet), built here: nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from safetensors.torch import save_file

from models.checkpoints import load_model
from models.ldm import PREFIXES, LatentDiffusion
from models.sdxl_layout import sdxl_conditioner_to_original
from models.tokenizers import EOS, CLIPTokenizer
from tests.helpers import randomize, write_clip_tokenizer

TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
PROJECTION = 64  # bigG's text_projection width (SDXL: 1280)


def scheduler_config() -> dict[str, Any]:
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading",
            "prediction_type": "epsilon"}


def text_encoder(vocab: int, eos: int, width: int, act: str, projection: bool) -> Any:
    config = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=width // 64, hidden_act=act, max_position_embeddings=77, projection_dim=PROJECTION,
        eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=0)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize(cls(config), seed=5 if projection else 4)


def sdxl_unet(context: int, in_channels: int = 4, seed: int = 6) -> Any:
    unet = diffusers.UNet2DConditionModel(
        sample_size=128, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=context,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_DIM, upcast_attention=False)
    return randomize(unet, seed=seed)


def refiner_unet(seed: int = 8) -> Any:
    """The refiner's UNet at reduced width: bigG's context alone, 2-deep transformers, the aesthetic score in the
    added vector (5 numbers, not 6)."""
    unet = diffusers.UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 2), transformer_layers_per_block=2, cross_attention_dim=128,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + 5 * TIME_DIM, upcast_attention=False)
    return randomize(unet, seed=seed)


def vae() -> Any:
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, sample_size=1024)
    return randomize(model, seed=7)


def tokenizers(tokenizer_dir: Path) -> tuple[Any, Any]:
    """transformers' CLIP tokenizers of the folder: ViT-L's (pads with end-of-text) and bigG's (pads with "!")."""
    files = (str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    return (transformers.CLIPTokenizer(*files, pad_token=EOS, model_max_length=77),
            transformers.CLIPTokenizer(*files, pad_token="!", model_max_length=77))


def sdxl_pipeline(tokenizer_dir: Path, *, inpainting: bool = False) -> Any:
    """diffusers' SDXL base pipeline at reduced width (`inpainting`: StableDiffusionXLInpaintPipeline with a
    9-channel UNet: latent, mask, masked-image latent), DDIM scheduler."""
    ours_tok = CLIPTokenizer.from_dir(tokenizer_dir)
    vocab, eos = ours_tok.vocab_size, ours_tok.eos_id
    tokenizer, tokenizer_2 = tokenizers(tokenizer_dir)
    cls = diffusers.StableDiffusionXLInpaintPipeline if inpainting else diffusers.StableDiffusionXLPipeline
    return cls(vae=vae(), text_encoder=text_encoder(vocab, eos, 64, "quick_gelu", projection=False),
               text_encoder_2=text_encoder(vocab, eos, 128, "gelu", projection=True), tokenizer=tokenizer,
               tokenizer_2=tokenizer_2, unet=sdxl_unet(64 + 128, 9 if inpainting else 4, seed=9 if inpainting else 6),
               scheduler=diffusers.DDIMScheduler.from_config(scheduler_config()), force_zeros_for_empty_prompt=True)


def write_sdxl_file(model: LatentDiffusion, path: Path, pooled_embedder: int = 1) -> None:
    """Our model as Stability's sgm saves SDXL: `conditioner.embedders.*` (bigG in OpenCLIP's layout), made with the
    inverse of our loader's mapping."""
    prefix = PREFIXES["conditioner"]
    state = model.original_state_dict()
    sd = {k: v.contiguous() for k, v in state.items() if not k.startswith(prefix)}
    sd |= {k: v.contiguous() for k, v in sdxl_conditioner_to_original(
        {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}).items()}
    sd[f"conditioner.embedders.{pooled_embedder}.model.logit_scale"] = torch.tensor(4.6052)
    save_file(sd, str(path))


class SDXLTwins:
    """diffusers' SDXL pipeline (base, or inpainting: a 9-channel UNet) at reduced width, its folder, and ours from
    the folder and from a single file."""

    def __init__(self, tmp: Path, *, inpainting: bool = False) -> None:
        name = "sdxl-inpainting" if inpainting else "sdxl"
        self.tokenizer_dir = write_clip_tokenizer(tmp / "vocab")
        self.pipe = sdxl_pipeline(self.tokenizer_dir, inpainting=inpainting)
        self.text_2 = self.pipe.text_encoder_2
        self.folder = tmp / f"{name}-folder"
        self.pipe.save_pretrained(str(self.folder), safe_serialization=True)
        self.ours = load_model(self.folder)
        self.path = tmp / f"{name}.safetensors"
        write_sdxl_file(self.ours, self.path)
        self.from_file = load_model(self.path, tokenizer_dir=self.folder / "tokenizer",
                                    tokenizer_2_dir=self.folder / "tokenizer_2")

    def model(self, source: str) -> LatentDiffusion:
        return self.ours if source == "folder" else self.from_file
