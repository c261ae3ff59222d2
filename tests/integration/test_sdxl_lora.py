"""LoRA adapters on SDXL: kohya's SDXL layout (UNet in sgm's names, `lora_te1_*` CLIP ViT-L, `lora_te2_*` bigG with
its text projection) and diffusers' own (`unet.*`, `text_encoder.*`, `text_encoder_2.*`), against diffusers'
`load_lora_weights` on the same SDXL pipeline (tests/sdxl_twins.py: random weights, reduced width, the real
structure), at weight 0.8: both encoders' contexts and the pooled vector, the UNet output, a 3-step DDIM
generation with classifier-free guidance, to 1e-4.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from models.checkpoints import load_model
from models.ldm import LatentDiffusion
from models.lora import LoRA, LoraError, adapters_applied, load_lora, target_names
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.text.sdxl import SDXLTextConditioner, added_vector
from tests.helpers import (
    KOHYA_UNET_SGM,
    TOL,
    assert_close_at_unit_scale,
    kohya_lora,
    torch_threads,
    write_clip_tokenizer,
)
from tests.sdxl_twins import TIME_DIM, sdxl_pipeline

PROMPTS = ["a red circle on the left", "a blue square"]
X, T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([981.0, 1.0])
TIME_IDS = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 32.0, 512.0, 512.0]])
SETTINGS = RunSettings(sampler="ddim", steps=3, width=64, height=64)


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.pipe = sdxl_pipeline(write_clip_tokenizer(tmp / "vocab"))
        self.folder = tmp / "sdxl"
        self.pipe.save_pretrained(str(self.folder), safe_serialization=True)
        self.ours = load_model(self.folder)
        self.lora = kohya_lora(self.ours, tmp / "xl.safetensors", seed=1, unet_names=KOHYA_UNET_SGM,
                               text_names=("lora_te1_", "lora_te2_"))
        with warnings.catch_warnings():
            # its kohya converter names attention alphas after legacy processors, which PEFT reports as matching
            # nothing (tests/helpers.py shared_alpha: those layers get one common alpha in the file)
            warnings.filterwarnings("ignore", "The following alpha_pattern keys did not match", RuntimeWarning)
            self.pipe.load_lora_weights(str(self.lora), adapter_name="a")
        self.pipe.set_adapters(["a"], adapter_weights=[0.8])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    with torch_threads(1):
        return Setup(tmp_path_factory.mktemp("sdxl-lora"))


def theirs(pipe: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context, pooled, UNet output) of diffusers' pipeline with its adapters."""
    with torch_threads(1), torch.inference_mode():
        ctx, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        eps = pipe.unet(X, T, encoder_hidden_states=ctx,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": TIME_IDS}).sample
    return ctx, pooled, eps


def ours(model: LatentDiffusion, lora: LoRA | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same of our model with `lora` at 0.8 (None: no adapter)."""
    assert isinstance(model.conditioner, SDXLTextConditioner)
    adapters = [((lora, 0.8),) if lora is not None else ()] * len(PROMPTS)
    with torch_threads(1), torch.inference_mode(), adapters_applied(model, adapters):
        encoded = model.conditioner.encode(PROMPTS)
        assert encoded.pooled is not None
        eps = model.unet(X, T, encoded.context, added_vector(encoded.pooled, TIME_IDS, TIME_DIM))
    return encoded.context, encoded.pooled, eps


def test_kohya_sdxl_lora_matches_diffusers_load_lora_weights(setup: Setup) -> None:
    lora = load_lora(setup.lora, setup.ours)
    assert {p.split(".")[2] for p in lora.layers if p.startswith("conditioner.")} == {"0", "1"}  # both encoders
    names = target_names(setup.ours)
    layer = "transformer.text_model.encoder.layers.0.mlp.fc1"
    assert names["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == f"conditioner.embedders.1.{layer}"
    # kohya's SD 1 prefix names ViT-L, as diffusers reads it
    assert names["lora_te_text_model_encoder_layers_0_mlp_fc1"] == f"conditioner.embedders.0.{layer}"
    assert "conditioner.embedders.1.text_projection" in lora.layers  # bigG's pooled projection is adapted too
    assert "unet.input_blocks.0.0" in lora.layers and "unet.label_emb.0.0" in lora.layers  # conv_in, add_embedding
    expected = theirs(setup.pipe)
    got, plain = ours(setup.ours, lora), ours(setup.ours, None)
    for name, a, b, base in zip(("context", "pooled", "UNet output"), got, expected, plain, strict=True):
        assert (a - b).abs().max() < TOL, name
        assert (a - base).abs().max() > 100 * TOL, f"the adapter does not change the {name}"
    assert (got[0][..., :64] - plain[0][..., :64]).abs().max() > 100 * TOL  # ViT-L's half of the context too
    with torch_threads(1):
        seeds = [3, 11]
        latents = setup.pipe(PROMPTS, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                             generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
        specs = [SampleSpec(p, seed=s, adapters=((lora, 0.8),)) for p, s in zip(PROMPTS, seeds, strict=True)]
        ours_latents, _ = Pipeline(setup.ours, optimize=False).sample_latents(specs, SETTINGS, (64, 64))
    assert_close_at_unit_scale(ours_latents, latents)


def test_diffusers_sdxl_lora_file_matches(setup: Setup, tmp_path: Path) -> None:
    """The adapter saved by diffusers in its own format (`unet.*`, `text_encoder.*`, `text_encoder_2.*` with lora_A /
    lora_B, PEFT configs in the metadata) gives what diffusers computes."""
    pipe = setup.pipe
    layers = {f"{part}_lora_layers": get_peft_model_state_dict(getattr(pipe, part), adapter_name="a")
              for part in ("unet", "text_encoder", "text_encoder_2")}
    metadata = {f"{part}_lora_adapter_metadata": getattr(pipe, part).peft_config["a"].to_dict()
                for part in ("unet", "text_encoder", "text_encoder_2")}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), **layers, **metadata,
                                                          safe_serialization=True)
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors", setup.ours)
    assert set(lora.layers) == set(load_lora(setup.lora, setup.ours).layers)
    for name, a, b in zip(("context", "pooled", "UNet output"), ours(setup.ours, lora), theirs(pipe), strict=True):
        assert (a - b).abs().max() < TOL, name


def test_sdxl_batch_mixing_adapters_gives_each_sample_its_solo_image(setup: Setup) -> None:
    """One batch with the adapter at 0.8 and without it (packed CPU model): each item as alone, bit for bit."""
    fast = Pipeline(load_model(setup.folder))
    lora = load_lora(setup.lora, fast.model)
    specs = [SampleSpec("a red circle", seed=1, adapters=((lora, 0.8),)), SampleSpec("a red circle", seed=1)]
    settings = RunSettings(sampler="ddim", steps=2, width=64, height=64)
    with torch_threads(1):
        batch, _ = fast.sample_latents(specs, settings, (64, 64))
        solos = [fast.sample_latents([spec], settings, (64, 64))[0] for spec in specs]
    for i, solo in enumerate(solos):
        assert torch.equal(batch[i : i + 1], solo), f"item {i} differs from its solo run"
    assert (solos[0] - solos[1]).abs().max() > 0.01


def test_unknown_sdxl_lora_keys_are_refused_by_name(setup: Setup, tmp_path: Path) -> None:
    down, up = torch.zeros(4, 128), torch.zeros(128, 4)
    cases = {
        "te2_layer": {"lora_te2_text_model_encoder_layers_7_mlp_fc2.lora_down.weight": down,
                      "lora_te2_text_model_encoder_layers_7_mlp_fc2.lora_up.weight": up},
        "te3": {"lora_te3_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": down},
        "peft_te2": {"text_encoder_2.text_model.encoder.layers.9.self_attn.q_proj.lora_A.weight": down,
                     "text_encoder_2.text_model.encoder.layers.9.self_attn.q_proj.lora_B.weight": up},
    }
    messages = {"te2_layer": r"adapted layers the model does not have.*lora_te2_text_model_encoder_layers_7_mlp_fc2",
                "te3": r"'lora_te3_text_model_encoder_layers_0_mlp_fc2.lora_down.weight' is neither kohya's",
                "peft_te2": r"does not have.*text_encoder_2.text_model.encoder.layers.9.self_attn.q_proj"}
    for name, sd in cases.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(LoraError, match=messages[name]):
            load_lora(tmp_path / f"{name}.safetensors", setup.ours)


def test_refiner_takes_te2_names_only(setup: Setup) -> None:
    """The refiner's one encoder is bigG: kohya's `lora_te2_*` / diffusers' `text_encoder_2.*` name it (embedder 0),
    and `lora_te1_*` / `lora_te_*` / `text_encoder.*` name nothing (refused when a file has them)."""
    base = setup.ours.config
    assert base.conditioner is not None
    text = dataclasses.replace(base.conditioner.sdxl, encoders=base.conditioner.sdxl.encoders[1:], micro="aesthetic",
                               force_zeros_for_empty_prompt=False)
    config = dataclasses.replace(
        base, family="sdxl_refiner", conditioner=dataclasses.replace(base.conditioner, sdxl=text),
        unet=dataclasses.replace(base.unet, context_dim=text.context_dim, adm_in_channels=text.vector_dim))
    with torch.device("meta"):
        refiner = LatentDiffusion(config)
    names = target_names(refiner)
    bigg = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1"
    assert names["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == bigg
    assert names["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"] == bigg
    assert names["lora_te2_text_projection"] == "conditioner.embedders.0.text_projection"
    assert not [n for n in names if n.startswith(("lora_te1_", "lora_te_", "text_encoder."))]
