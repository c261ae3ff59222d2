"""Shared test helpers: a CLIP tokenizer folder trained here, random weights, diffusers twins, the
loss-decreases check of the trainers, a PNG that claims a huge size, and the polls that wait for processes
and for the API's readiness.

Nothing here downloads: the CLIP vocabulary is a tiny BPE learned from a paragraph, and diffusers /
transformers models are built from our own weights with diffusers' own single-file converters.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import torch
from safetensors.torch import save_file

from models.autoencoder import AutoencoderConfig
from models.conditioners import ConditionerConfig
from models.config import ModelConfig, builtin_config
from models.ldm import LatentDiffusion
from models.lora import target_names
from models.text.clip import CLIPTextConfig
from models.tokenizers import BOS, EOS, bytes_to_unicode
from models.unet import UNetConfig

if TYPE_CHECKING:
    from models.train.ldm_trainer import Conds, LDMTrainer

M = TypeVar("M", bound=torch.nn.Module)
#: parity with diffusers (tests/integration/test_sd*_parity.py)
TOL = 1e-4


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




def assert_close_at_unit_scale(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Whole generations: max |difference| <= TOL / 10 once both are scaled to unit max magnitude.

    A random-weight UNet is no denoiser: its x0 predictions are ~1/sqrt(abar_T) ~ 13x the noise and
    guidance multiplies them, so the final latents reach |x| ~ 30-50 (a trained SD model stays within
    ~4). At that scale float32 rounding alone (1.2e-7 relative per operation, over 20 UNet evaluations)
    adds up to ~1e-4 absolute. Any real mistake (a timestep, an alpha, a guidance sign) differs by O(1).
    """
    scale = expected.abs().max()
    assert scale > 0.1
    assert ((ours - expected).abs().max() / max(1.0, float(scale))) < TOL / 10


def randomize(model: M, seed: int = 0) -> M:
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


# ----------------------------------------------------------------------------------------------------------
# Toy models and checkpoint files (tests/integration/test_checkpoints.py, test_pipeline.py, tests/e2e).


def toy_sd_config(vocab_size: int, *, in_channels: int = 4, clip_width: int = 64,
                  name: str = "toy-sd") -> ModelConfig:
    """SD v1 structure at toy width: a 2-level UNet (32, 64 channels, attention at ds 2 and 1, 8 heads), a
    4-level f=8 KL autoencoder of width 32 and a one-layer CLIP of `clip_width` (64-channel heads). Every
    value is one that shape inference recovers, so a file of it loads back to this very config.
    in_channels 9 = the SD inpainting layout (latent + mask + masked-image latent)."""
    clip = CLIPTextConfig(vocab_size=vocab_size, hidden_size=clip_width, intermediate_size=128, num_layers=1,
                          num_heads=max(1, clip_width // 64))
    inpainting = in_channels == 9
    return ModelConfig(
        name=name, family="sd_v1_inpainting" if inpainting else "sd_v1",
        unet=UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2, 1), num_heads=8, context_dim=clip_width),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
        conditioner=ConditionerConfig(kind="clip", clip=clip),
        conditioning="hybrid" if inpainting else "crossattn",
        concat_input="inpaint" if inpainting else "none",
        default_size=512,
    )


def toy_sdxl_config(vocab_size: int, *, refiner: bool = False, name: str = "toy-sdxl") -> ModelConfig:
    """SDXL's structure at toy width: two text encoders (CLIP ViT-L-like, quick_gelu; bigG-like, gelu, its pooled
    output projected to 32), the added vector of the pooled text and 6 micro-conditioning numbers (8-wide Fourier
    features), a 2-level UNet (32, 64 channels, no attention at the first level, 32-channel heads, linear
    projections), a 3-level f=4 KL autoencoder at SDXL's scale 0.13025. `refiner`: the refiner's make-up (the
    bigG-like encoder alone, aesthetic score in place of the target size: 5 numbers). Saved with `save_model`, a
    file of it loads back to this very config (given the tokenizer folders)."""
    from models.text.sdxl import SDXLTextConfig  # noqa: PLC0415 (only the SDXL tests need it)

    clip_l = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1)
    big_g = dataclasses.replace(clip_l, hidden_act="gelu")
    text = SDXLTextConfig(encoders=(big_g,) if refiner else (clip_l, big_g), projection_dim=32,
                          micro="aesthetic" if refiner else "size", time_embed_dim=8,
                          force_zeros_for_empty_prompt=not refiner)
    return ModelConfig(
        name=name, family="sdxl_refiner" if refiner else "sdxl",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_heads=-1, num_head_channels=32, context_dim=text.context_dim,
                        use_linear_in_transformer=True, adm_in_channels=text.vector_dim, legacy=False),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
        conditioner=ConditionerConfig(kind="sdxl", sdxl=text), scale_factor=0.13025, default_size=64)


def toy_x4_upscaler_config(vocab_size: int, *, name: str = "toy-x4") -> ModelConfig:
    """The SD x4 upscaler's structure at toy width: a 7-channel UNet (latent + the noised low-resolution image) with
    the noise level as its class label (1000 classes) and text in attn1 at the first level, linear projections,
    v-prediction; a 3-level f=4 KL autoencoder at scale 0.08333; a one-layer OpenCLIP-like (gelu) text encoder; the
    low-resolution input's own DDPM schedule. `save_model` writes it (config in the metadata) and it loads back."""
    from models.diffusion import ScheduleConfig  # noqa: PLC0415 (only the upscaler tests need it)

    clip = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1,
                          hidden_act="gelu")
    return ModelConfig(
        name=name, family="sd_v2_upscaler",
        unet=UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(1, 2), num_heads=-1, num_head_channels=32, context_dim=64,
                        use_linear_in_transformer=True, num_classes=1000, legacy=False,
                        disable_self_attentions=(True, False)),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
        schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"),
        conditioner=ConditionerConfig(kind="clip", clip=clip), conditioning="hybrid", concat_input="lowres",
        scale_factor=0.08333, default_size=64,
        lowres_noise=ScheduleConfig(beta_start=0.0001, beta_end=0.02, steps_offset=0))


def toy_sr_config() -> ModelConfig:
    """models/configs/ldm-sr.yaml (VQ f=4 autoencoder, 6-channel UNet with legacy attention, no text) at toy
    width; as toy_sd_config, a config that shape inference recovers exactly."""
    base = builtin_config("ldm-sr")
    return dataclasses.replace(
        base, name="toy-sr",
        unet=dataclasses.replace(base.unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(2,)),
        autoencoder=dataclasses.replace(base.autoencoder, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=64),
    )


def unit_eps(model: LatentDiffusion) -> LatentDiffusion:
    """Scale the UNet's last conv so that its output has about unit std, like a trained epsilon predictor:
    random weights predict |eps| ~ 10, and guided sampling then saturates every pixel, which would make
    "the image changed" and "the images are equal" vacuous."""
    g = torch.Generator().manual_seed(123)
    cfg = model.config.unet
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g) if cfg.context_dim else None
    y = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None  # SDXL's added vector
    if cfg.num_classes is not None:  # class labels (the x4 upscaler's noise level)
        y = torch.tensor([20, 20])
    with torch.no_grad():
        std = model.unet(x, torch.tensor([500.0, 500.0]), ctx, *(() if y is None else (y,))).std()
        last = model.unet.out[2]
        assert isinstance(last, torch.nn.Conv2d)
        last.weight.div_(std)
        assert last.bias is not None
        last.bias.div_(std)
    return model


def random_model(config: ModelConfig, seed: int = 0, tokenizer_dir: Path | None = None) -> LatentDiffusion:
    """A LatentDiffusion of `config` with seeded random weights (UNet output at unit scale), frozen, eval."""
    model = randomize(LatentDiffusion(config, tokenizer_dir=tokenizer_dir), seed)
    return unit_eps(model).requires_grad_(False)


def original_checkpoint(model: LatentDiffusion) -> dict[str, torch.Tensor]:
    """The model's weights as an original CompVis file holds them: prefixed keys plus the schedule's `betas`
    buffer and CLIP's `position_ids`, and no config of ours."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.original_state_dict().items()}
    sd["betas"] = model.schedule.betas.float().clone()
    if model.config.conditioner is not None and model.config.conditioner.kind == "clip":
        positions = model.config.conditioner.clip.max_positions
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return sd


def hf_clip_text_model(checkpoint: dict[str, torch.Tensor], clip: CLIPTextConfig) -> Any:
    """transformers' CLIPTextModel holding the `cond_stage_model.*` weights of an original-layout checkpoint."""
    import transformers

    vocab = clip.vocab_size
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads,
        max_position_embeddings=clip.max_positions, hidden_act="quick_gelu",
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )).eval()
    # transformers >= 5 drops the `text_model.` level of the original key names
    strip = "cond_stage_model.transformer." + ("" if "text_model.final_layer_norm.weight"
                                               in text.state_dict() else "text_model.")
    weights = {k[len(strip):]: v for k, v in checkpoint.items() if k.startswith(strip) and "position_ids" not in k}
    text.load_state_dict(weights, strict=True)
    return text


def save_diffusers_folder(checkpoint: dict[str, torch.Tensor], config: ModelConfig, tokenizer_dir: Path,
                          folder: Path) -> Path:
    """Convert an original-layout SD v1 checkpoint to a diffusers folder with diffusers itself: its
    single-file converters, transformers' CLIP model and tokenizer, the SD scheduler config, and
    `StableDiffusion[Inpaint]Pipeline.save_pretrained(folder, safe_serialization=True)`.

    transformers >= 5 writes the tokenizer as tokenizer.json only; vocab.json and merges.txt are copied
    next to it, as every SD v1 repository on the Hub ships them.
    """
    import diffusers
    import transformers

    assert config.conditioner is not None
    clip = config.conditioner.clip
    unet = diffusers_unet({k: v for k, v in checkpoint.items() if k.startswith("model.")}, config.unet)
    vae = diffusers_vae({k: v for k, v in checkpoint.items() if k.startswith("first_stage_model.")},
                        config.autoencoder)
    text = hf_clip_text_model(checkpoint, clip)
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           model_max_length=clip.max_positions)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                                        set_alpha_to_one=False)
    inpainting = config.unet.in_channels == 9
    cls: Any = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / "tokenizer" / name)
    return folder


def openclip_text_keys(text: dict[str, torch.Tensor], clip: CLIPTextConfig, seed: int = 7) -> dict[str, torch.Tensor]:
    """Our CLIP text encoder's keys (`transformer.text_model.*`, SD 2's penultimate-cut OpenCLIP) as an original SD 2
    file holds them under `cond_stage_model.`: OpenCLIP's names (fused q/k/v), plus the unused last block, the
    contrastive head's projection and logit scale (random)."""
    from models.openclip_layout import clip_to_openclip

    prefix = "cond_stage_model."
    out = {prefix + k: v.contiguous() for k, v in clip_to_openclip(text).items()}
    g, width, inner = torch.Generator().manual_seed(seed), clip.hidden_size, clip.intermediate_size
    last = f"{prefix}model.transformer.resblocks.{clip.num_layers}."
    for name, shape in (("ln_1.weight", [width]), ("ln_1.bias", [width]), ("attn.in_proj_weight", [3 * width, width]),
                        ("attn.in_proj_bias", [3 * width]), ("attn.out_proj.weight", [width, width]),
                        ("attn.out_proj.bias", [width]), ("ln_2.weight", [width]), ("ln_2.bias", [width]),
                        ("mlp.c_fc.weight", [inner, width]), ("mlp.c_fc.bias", [inner]),
                        ("mlp.c_proj.weight", [width, inner]), ("mlp.c_proj.bias", [width])):
        out[last + name] = torch.randn(shape, generator=g)
    out[prefix + "model.text_projection"] = torch.randn(width, width, generator=g)
    out[prefix + "model.logit_scale"] = torch.tensor(4.6052)
    return out


def shared_alpha(name: str) -> bool:
    """Layers that get one common alpha in the test files, because diffusers 0.42 (with peft 0.21 and
    transformers 5) applies its most common alpha to them whatever the file says: it names the alphas of
    attention projections after its legacy processors (`...attn1.processor.to_q_lora.down.weight`) and
    those of the text encoder with a `text_model.` level transformers 5 dropped, so its alpha_pattern
    matches none of them (PEFT warns). Every other layer (feed-forward, proj_in/out, LoCon convs, time
    embedding) gets an alpha of its own, which diffusers and we both apply."""
    return name.startswith(("lora_te_", "lora_te1_", "lora_te2_")) or "_attn1_" in name or "_attn2_" in name


#: kohya's UNet names for SD 1/2 LoRAs (diffusers' module paths) and for SDXL ones (sgm's: the original layout)
KOHYA_UNET_DIFFUSERS = ("lora_unet_down_blocks", "lora_unet_mid_block_", "lora_unet_up_blocks")
KOHYA_UNET_SGM = ("lora_unet_input_blocks", "lora_unet_middle_block_", "lora_unet_output_blocks",
                  "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_unet_out_")


def kohya_lora(model: LatentDiffusion, path: Path, *, seed: int, rank: int = 4, unet: bool = True,
               text: bool = True, every: int = 1, unet_names: tuple[str, ...] = KOHYA_UNET_DIFFUSERS,
               text_names: tuple[str, ...] = ("lora_te_",)) -> Path:
    """A random kohya LoRA on every `every`-th layer whose name starts with one of `unet_names` / `text_names`
    (SD 1/2: diffusers-style UNet names and `lora_te_`; SDXL: KOHYA_UNET_SGM and `lora_te1_`, `lora_te2_`),
    alpha per module."""
    g = torch.Generator().manual_seed(seed)
    all_names = target_names(model)
    names = [n for n in all_names if (unet and n.startswith(unet_names)) or (text and n.startswith(text_names))]
    sd = {}
    for name in sorted(names)[::every]:
        layer = model.get_submodule(all_names[name])
        weight = layer.weight
        out_f, in_f = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        fan_in = weight[0].numel()
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, *kernel, generator=g) / fan_in**0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, *((1, 1) if kernel else ()), generator=g) * 0.5
        ratio = 0.75 if shared_alpha(name) else 0.5 + torch.rand((), generator=g).item()
        sd[f"{name}.alpha"] = torch.tensor(float(rank) * ratio)
    save_file(sd, str(path))
    return path


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore the count. Toy models gain nothing from threads, and on a
    busy 2-core machine OpenMP's barriers make 2 threads several times slower than 1 (measured: 74 s vs 12 s
    for tests/integration/test_checkpoints.py while another process kept both cores busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def drop_keys(redis_url: str, prefix: str) -> None:
    """Delete every Redis key of one test's key prefix (`<prefix>:*`)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def assert_steps_lower_the_loss(trainer: LDMTrainer, latents: torch.Tensor, conds: Conds, steps: int = 3) -> None:
    """`steps` training steps on one batch lower the loss on that batch. Every loss and step draws the same
    timesteps and noise (seed 123), so a lower loss is the weights' doing, not the draw's."""

    def loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return trainer.loss(latents, conds).item()

    first = loss()
    for _ in range(steps):
        torch.manual_seed(123)
        trainer.train_step(latents, conds)
    assert loss() < first


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims `width` x `height` RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, *, every_s: float = 0.02,
               procs: Sequence[subprocess.Popen[Any]] = (), log: Callable[[], str] | None = None) -> None:
    """Poll `predicate` every `every_s` seconds until it holds. Fail (naming `what`) after `timeout_s`, or as soon
    as one of `procs` has exited, which will then never make it hold; `log()` (e.g. a log file's text) is added to
    the message."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited with {proc.returncode} while waiting for {what}"
                                     + (f":\n{log()}" if log else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}" + (f":\n{log()}" if log else ""))
        time.sleep(every_s)


def wait_ready(get: Callable[[str], Any], timeout_s: float, *, procs: Sequence[subprocess.Popen[Any]] = (),
               log: Callable[[], str] | None = None) -> Any:
    """The readiness poll: wait until GET /readyz answers 200 (the API is up and a worker serves the default
    model) and return that answer, failing as `wait_until` does. `get` is a TestClient's `get`, or httpx's bound to
    a base URL; a connection that fails (nothing listening yet) counts as not ready."""
    answers: list[Any] = []

    def ready() -> bool:
        try:
            answers.append(get("/readyz"))
        except httpx.HTTPError:
            return False
        return bool(answers[-1].status_code == 200)

    wait_until(ready, timeout_s, "GET /readyz to answer 200", every_s=0.1, procs=procs, log=log)
    return answers[-1]
