"""LoRA adapters applied unmerged, per sample: parity with diffusers, batches that mix adapters, the cache.

A toy SD v1 model (tests/helpers.py) gets random kohya-format LoRAs on every UNet and text-encoder layer
(attention, feed-forward, the 1x1 proj_in/proj_out convs, LoCon 3x3 convs, the time embedding), with a
different alpha per module. diffusers, which loads the same file with `load_lora_weights` and its
kohya converter, is the independent reference.
"""

import warnings
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from models import cpu_inference
from models.checkpoints import load_model
from models.lora import LoRA, LoraCache, LoraError, adapters_applied, load_lora, parse_lora_arg
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.tokenizers import CLIPTokenizer
from models.winograd import WinogradConv2d
from tests.helpers import (
    TOL,
    assert_close_at_unit_scale,
    kohya_lora,
    original_checkpoint,
    random_model,
    save_diffusers_folder,
    torch_threads,
    toy_sd_config,
    write_clip_tokenizer,
)

SETTINGS = RunSettings(sampler="ddim", steps=10, width=64, height=64)
X, T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([981.0, 1.0])


class Setup:
    def __init__(self, tmp: Path) -> None:
        tokenizer_dir = write_clip_tokenizer(tmp / "tokenizer")
        config = toy_sd_config(CLIPTokenizer.from_dir(tokenizer_dir).vocab_size)
        checkpoint = original_checkpoint(random_model(config, seed=0))
        self.folder = save_diffusers_folder(checkpoint, config, tokenizer_dir, tmp / "sd")
        self.model = load_model(self.folder)
        self.fast = Pipeline(load_model(self.folder))  # packed convs, channels_last
        self.a = kohya_lora(self.model, tmp / "a.safetensors", seed=1)
        self.b = kohya_lora(self.model, tmp / "b.safetensors", seed=2, rank=2, text=False, every=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    with torch_threads(1):
        return Setup(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def reference(setup: Setup) -> Any:
    """diffusers' pipeline of the same folder with LoRA `a` loaded by `load_lora_weights`, at weight 0.8."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(setup.folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    with warnings.catch_warnings():
        # its kohya converter also lists alphas under legacy names, which PEFT reports as matching nothing
        warnings.filterwarnings("ignore", "The following alpha_pattern keys did not match", RuntimeWarning)
        pipe.load_lora_weights(str(setup.a), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.8])
    return pipe


def outputs(pipe_or_model: Any, prompts: list[str], lora: LoRA | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text context, UNet output at two timesteps) of diffusers' pipeline, or of our model with `lora` at 0.8."""
    x, t = X[: len(prompts)], T[: len(prompts)]
    with torch_threads(1), torch.inference_mode():
        if lora is None:
            ids = pipe_or_model.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            context = pipe_or_model.text_encoder(ids).last_hidden_state
            return context, pipe_or_model.unet(x, t, encoder_hidden_states=context).sample
        with adapters_applied(pipe_or_model, [((lora, 0.8),)] * len(prompts)):
            context = pipe_or_model.conditioner.encode(prompts).context
            return context, pipe_or_model.unet(x, t, context)


def test_kohya_lora_matches_diffusers_load_lora_weights(setup: Setup, reference: Any) -> None:
    """Weight 0.8: text encoder context, UNet output and a 10-step DDIM generation with CFG."""
    prompts, seeds = ["a red circle on the left", "a blue square"], [3, 11]
    lora = load_lora(setup.a, setup.model)
    ctx_theirs, eps_theirs = outputs(reference, prompts)
    ctx_ours, eps_ours = outputs(setup.model, prompts, lora)
    assert (ctx_ours - ctx_theirs).abs().max() < TOL
    assert (eps_ours - eps_theirs).abs().max() < TOL
    with torch_threads(1), torch.inference_mode():
        assert setup.model.conditioner is not None
        plain = setup.model.conditioner.encode(prompts).context
        assert (ctx_ours - plain).abs().max() > 100 * TOL  # the adapter changes the text encoding
        assert (eps_ours - setup.model.unet(X, T, ctx_ours)).abs().max() > 100 * TOL  # and the UNet
        expected = reference(prompts, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                             generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
        specs = [SampleSpec(p, seed=s, adapters=((lora, 0.8),)) for p, s in zip(prompts, seeds, strict=True)]
        ours, _ = Pipeline(setup.model, optimize=False).sample_latents(specs, SETTINGS, (64, 64))
    assert_close_at_unit_scale(ours, expected)


def test_diffusers_peft_lora_file_matches(setup: Setup, reference: Any, tmp_path: Path) -> None:
    """The same adapter saved by diffusers in its own format (`unet.*.lora_A/B`, PEFT config with
    alpha_pattern in the metadata) gives what diffusers computes."""
    unet_layers = get_peft_model_state_dict(reference.unet, adapter_name="a")
    text_layers = get_peft_model_state_dict(reference.text_encoder, adapter_name="a")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=reference.unet.peft_config["a"].to_dict(),
        text_encoder_lora_adapter_metadata=reference.text_encoder.peft_config["a"].to_dict(),
        safe_serialization=True)
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors", setup.model)
    assert len(lora.layers) == len(load_lora(setup.a, setup.model).layers)
    for ours, theirs in zip(outputs(setup.model, ["a red circle"], lora), outputs(reference, ["a red circle"]),
                            strict=True):
        assert (ours - theirs).abs().max() < TOL


def test_mixed_batch_gives_every_sample_its_solo_image(setup: Setup) -> None:
    """Two LoRAs, both at once, and none, in one batch (packed CPU model): each item bit-identical alone."""
    a, b = load_lora(setup.a, setup.fast.model), load_lora(setup.b, setup.fast.model)
    specs = [SampleSpec("a red circle", seed=1, adapters=((a, 0.8),)),
             SampleSpec("a red circle", seed=1, adapters=((b, 1.0),)),
             SampleSpec("a red circle", seed=1),
             SampleSpec("a blue square", seed=2, adapters=((a, 0.5), (b, 0.7)), guidance_scale=1.0)]
    with torch_threads(1):
        batch, _ = setup.fast.sample_latents(specs, SETTINGS, (64, 64))
        solos = [setup.fast.sample_latents([spec], SETTINGS, (64, 64))[0] for spec in specs]
    for i, solo in enumerate(solos):
        assert torch.equal(batch[i : i + 1], solo), f"item {i} differs from its solo run"
    assert (solos[0] - solos[2]).abs().max() > 0.01 and (solos[1] - solos[2]).abs().max() > 0.01
    assert not any(m._forward_hooks for m in setup.fast.model.modules())  # nothing outlives the batch


def test_adapters_on_winograd_convolutions_give_the_direct_convolutions_result(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy's convolutions are narrower than Winograd's floor: lowered, every 3x3 UNet conv goes by Winograd,
    LoCon adapters included, and the adapted output equals the unpacked model's to rounding."""
    monkeypatch.setattr(cpu_inference, "WINOGRAD_MIN_CHANNELS", 1)
    model = Pipeline(load_model(setup.folder)).model
    assert sum(isinstance(m, WinogradConv2d) for m in model.unet.modules()) > 4
    lora = load_lora(setup.a, model)
    assert any(isinstance(model.get_submodule(path), WinogradConv2d) for path in lora.layers)
    prompts = ["a red circle on the left", "a blue square"]
    ours = outputs(model, prompts, lora)
    direct = outputs(setup.model, prompts, load_lora(setup.a, setup.model))
    for a, b in zip(ours, direct, strict=True):
        assert (a - b).abs().max() < TOL
    with torch_threads(1), torch.inference_mode():
        assert (ours[1] - model.unet(X, T, ours[0])).abs().max() > 100 * TOL  # the adapters act


def test_cache_is_bounded_in_bytes(setup: Setup, tmp_path: Path) -> None:
    """200 requests cycling through 20 adapter files: the cache never holds more than its byte budget."""
    paths = [kohya_lora(setup.model, tmp_path / f"l{i}.safetensors", seed=10 + i, text=False, every=4)
             for i in range(20)]
    size = load_lora(paths[0], setup.model).nbytes
    cache = LoraCache(setup.model, max_bytes=int(3.5 * size))
    held: list[LoRA] = []
    for i in range(200):
        held = [cache.get(paths[i % 20]), cache.get(paths[0])]  # one adapter in every request, 19 in turn
        assert cache.nbytes <= cache.max_bytes and len(cache) <= 3
        assert cache.nbytes == sum(lora.nbytes for lora in cache._entries.values())  # the running total
    # paths[0] is read once and always held; each of the 190 other requests reads its file (evicted since)
    assert (cache.misses, cache.hits) == (1 + 190, 400 - 191)
    assert [lora.name for lora in held] == ["l19", "l0"]
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first  # a hit
    kohya_lora(setup.model, paths[0], seed=99, text=False, every=4)  # the file changed: read again
    assert cache.get(paths[0]) is not first
    with pytest.raises(LoraError, match="over the cache's"):
        LoraCache(setup.model, max_bytes=size // 2).get(paths[1])


def test_foreign_or_unsupported_loras_are_refused_by_name(setup: Setup, tmp_path: Path) -> None:
    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    cases = {
        "sdxl": ({"lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_down.weight": down,
                  "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_up.weight": up},
                 "adapted layers the model does not have.*input_blocks_7_1_transformer_blocks_9"),
        "dora": ({"lora_unet_down_blocks_0_attentions_0_proj_out.dora_scale": up},
                 r"'dora_scale' tensors \(DoRA"),
        "shape": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
                       torch.zeros(64, 4)}, r"do not fit the layer \(expected \(4, 32\) / \(32, 4\)\)"),
        "half": ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down},
                 "needs both a down and an up matrix"),
        "other": ({"model.diffusion_model.out.2.weight": up}, "neither kohya's"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(LoraError, match=message):
            load_lora(tmp_path / f"{name}.safetensors", setup.model)


def test_parse_lora_arg() -> None:
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
