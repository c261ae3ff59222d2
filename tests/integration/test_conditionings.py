"""The paper's other conditionings end to end on toy models: a training step of each lowers the loss on a fixed
batch and trains the encoder with the UNet; a trained model saves, reloads and generates through its pipeline
method (and `ldm generate --task`), with bad inputs rejected before any sampling; resume stays exact."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoints import load_model
from models.conditioners import ConditionerConfig
from models.conditioning import Box, ConditionError, LayoutEncoderConfig, SemanticEncoderConfig
from models.pipeline import Pipeline, RunSettings, SampleSpec, UnsupportedTask
from models.train.common import load_checkpoint
from models.train.data import DataConfig
from models.train.data_shapes import CLASS_NAMES, label_map, scene_at, scene_layout
from models.train.ldm_trainer import LDMTrainConfig, LDMTrainer
from models.unet import UNetConfig
from service.cli import main as ldm_main
from tests.helpers import assert_steps_lower_the_loss, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

#: the shipped model's first stage (f = 4, 3 latent channels): `autoencoder_path` may name a whole model file
FIRST_STAGE = str(Path(__file__).resolve().parents[2] / "models" / "zoo" / "tiny-shapes" / "model.safetensors")
UNET = dict(out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
            num_heads=2, norm_groups=8)
#: "layout" is the shipped design (box tokens + a box raster), "layout-tokens" the cross-attention-only one
KINDS = ("class", "layout", "layout-tokens", "semantic", "none")


def config(kind: str, **kw: object) -> LDMTrainConfig:
    conditioners = {
        "class": ConditionerConfig(kind="class", n_classes=18, class_dim=16),
        "layout": ConditionerConfig(kind="layout", n_classes=18,
                                    layout=LayoutEncoderConfig(max_boxes=2, width=16, depth=1, heads=2,
                                                               raster_channels=4, raster_hidden=8)),
        "layout-tokens": ConditionerConfig(kind="layout", n_classes=18,
                                           layout=LayoutEncoderConfig(max_boxes=2, width=16, depth=1, heads=2)),
        "semantic": ConditionerConfig(kind="semantic", n_classes=18,
                                      semantic=SemanticEncoderConfig(channels=4, hidden=8, downsample=4)),
        "none": None,
    }
    unet = UNetConfig(in_channels=7 if kind in ("semantic", "layout") else 3,
                      context_dim=16 if kind in ("class", "layout", "layout-tokens") else None,
                      **UNET)  # type: ignore[arg-type]
    base = dict(autoencoder_path=FIRST_STAGE, unet=unet, conditioner=conditioners[kind],
                data=DataConfig(pair_probability=0.0 if kind in ("class", "none") else 0.4), steps=2, batch_size=4,
                lr=1e-3, warmup_steps=1, latent_pool=8, scale_images=8, log_every=1, sample_every=100,
                checkpoint_every=100, sample_steps=2, name=f"toy-{kind}")
    base.update(kw)
    return LDMTrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind -> model.safetensors of a 2-step run (sample grid at the last step, so the sampling hook runs)."""
    out = {}
    with torch_threads(1):
        for kind in KINDS:
            run = tmp_path_factory.mktemp(kind)
            LDMTrainer(config(kind, sample_every=2), run).train()
            assert (run / "samples" / "step-0000002.png").is_file()
            out[kind] = run / "model.safetensors"
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_lowers_the_loss_and_trains_the_encoder(kind: str, tmp_path: Path) -> None:
    trainer = LDMTrainer(config(kind, cond_drop=0.0, lr=3e-3), tmp_path)
    latents, conds = trainer._batch(0, 4)
    conditioner = trainer.model.conditioner
    before = {k: v.clone() for k, v in conditioner.state_dict().items()} if conditioner is not None else {}
    assert_steps_lower_the_loss(trainer, latents, conds)
    if conditioner is not None:
        assert trainer.trains_conditioner and trainer.contexts is None
        assert any(not torch.equal(v, before[k]) for k, v in conditioner.state_dict().items())
        assert any(k.startswith("conditioner.") for k in trainer.ema.shadow)
    else:
        assert set(trainer.ema.shadow) == set(trainer.unet.state_dict())


def test_the_pool_keeps_each_images_condition(tmp_path: Path) -> None:
    trainer = LDMTrainer(config("semantic"), tmp_path)
    trainer.pool = trainer._pool()
    assert trainer.pool is not None
    latents, conds = trainer._batch(0, 8)  # the whole pool, in its first epoch's order
    assert isinstance(conds, dict) and conds["maps"].shape == (8, 64, 64)
    order = trainer.pool._perm(0).tolist()
    for row, index in enumerate(order):
        assert np.array_equal(conds["maps"][row].numpy(), label_map(scene_at(0, index)))
    assert (tmp_path / "cache" / "latents-8-seed0-semantic.pt").is_file()


@pytest.mark.parametrize("kind", ["layout", "layout-tokens"])
def test_null_conditions_are_dropped_in(kind: str, tmp_path: Path) -> None:
    trainer = LDMTrainer(config(kind, cond_drop=1.0), tmp_path)
    latents, conds = trainer._batch(0, 2)
    context, concat = trainer._conditions(conds, latents)
    conditioner = trainer.model.conditioner
    with torch.no_grad():
        null_context, null_raster = conditioner.encode_layouts([[], []], (64, 64))  # type: ignore[union-attr]
    assert context is not None and torch.allclose(context, null_context)
    if kind == "layout-tokens":
        assert concat is None and null_raster is None
    else:  # the empty layout's raster: all unknown, the encoder's bias alone
        assert concat is not None and null_raster is not None and concat.shape == (2, 4, 16, 16)
        assert torch.allclose(concat, null_raster) and torch.allclose(concat, concat[..., :1, :1].expand_as(concat))


def test_class_training_needs_single_objects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pair_probability: 0"):
        LDMTrainer(config("class", data=DataConfig()), tmp_path)
    with pytest.raises(ValueError, match="n_classes to 18"):
        LDMTrainer(config("class", conditioner=ConditionerConfig(kind="class", n_classes=10, class_dim=16)), tmp_path)


def test_resume_equals_uninterrupted_with_a_trained_encoder(tmp_path: Path) -> None:
    LDMTrainer(config("layout", steps=4), tmp_path / "whole").train()
    LDMTrainer(config("layout", steps=2), tmp_path / "cut").train()
    LDMTrainer(config("layout", steps=4), tmp_path / "cut").train()
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for part in ("unet", "conditioner"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    for key, value in a["ema"]["shadow"].items():
        assert torch.equal(value, b["ema"]["shadow"][key]), key


SETTINGS = RunSettings(steps=2)


def _specs(n: int = 2, guidance: float = 3.0) -> list[SampleSpec]:
    return [SampleSpec(seed=i, guidance_scale=guidance) for i in range(n)]


def test_models_reload_and_generate(trained: dict[str, Path]) -> None:
    scene = scene_at(1, 0)
    runs = {
        "class": lambda p: p.class2img(_specs(), SETTINGS, ["red circle", 5]),
        "layout": lambda p: p.layout2img(_specs(), SETTINGS, [scene_layout(scene), []]),
        "layout-tokens": lambda p: p.layout2img(_specs(), SETTINGS, [scene_layout(scene), []]),
        "semantic": lambda p: p.semantic2img(_specs(), SETTINGS, [label_map(scene)] * 2),
        "none": lambda p: p.unconditional(_specs(), SETTINGS),
    }
    for kind, path in trained.items():
        model = load_model(path)
        if kind != "none":
            assert model.config.conditioner is not None and model.config.conditioner.class_names == CLASS_NAMES
        first = runs[kind](Pipeline(model)).images
        again = runs[kind](Pipeline(load_model(path))).images
        assert [im.size for im in first] == [(64, 64)] * 2
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True)), kind
        # an image does not depend on its batch: item 0 alone equals item 0 of the pair
        assert kind == "none" or np.array_equal(np.asarray(first[0]), np.asarray(_alone(kind, Pipeline(model))))


def _alone(kind: str, pipeline: Pipeline) -> Image.Image:
    scene = scene_at(1, 0)
    if kind == "class":
        return pipeline.class2img(_specs(1), SETTINGS, ["red circle"]).images[0]
    if kind in ("layout", "layout-tokens"):
        return pipeline.layout2img(_specs(1), SETTINGS, [scene_layout(scene)]).images[0]
    return pipeline.semantic2img(_specs(1), SETTINGS, [label_map(scene)]).images[0]


def test_guidance_steers_from_the_null_condition(trained: dict[str, Path]) -> None:
    pipeline = Pipeline(load_model(trained["class"]))
    plain = pipeline.class2img(_specs(1, 1.0), SETTINGS, ["blue square"]).images[0]
    guided = pipeline.class2img(_specs(1, 4.0), SETTINGS, ["blue square"]).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))
    unguided = pipeline.unconditional(_specs(1, 4.0), SETTINGS).images[0]  # the null class, scale ignored
    assert unguided.size == (64, 64)


def test_wrong_task_and_bad_inputs_are_clear_errors(trained: dict[str, Path]) -> None:
    layout, semantic, klass = (Pipeline(load_model(trained[k])) for k in ("layout", "semantic", "class"))
    with pytest.raises(UnsupportedTask, match="layout-to-image model: use layout2img"):
        layout.txt2img(_specs(1), SETTINGS)
    with pytest.raises(UnsupportedTask, match="semantic-synthesis model: use semantic2img"):
        semantic.txt2img(_specs(1), SETTINGS)
    with pytest.raises(UnsupportedTask, match="not a layout-to-image model"):
        klass.layout2img(_specs(1), SETTINGS, [[]])
    with pytest.raises(ConditionError, match="at most 2 boxes"):
        layout.layout2img(_specs(1), SETTINGS, [[Box(0, 0, 0, 0.2, 0.2)] * 3])
    with pytest.raises(ConditionError, match="unknown class 'pink circle'"):
        klass.class2img(_specs(1), SETTINGS, ["pink circle"])
    with pytest.raises(ValueError, match="one class label per item"):
        klass.class2img(_specs(2), SETTINGS, ["red circle"])
    with pytest.raises(ConditionError, match="map is 64x64, but 32x64"):
        semantic.semantic2img(_specs(1), dataclasses.replace(SETTINGS, width=32), [np.zeros((64, 64), np.uint8)])
    with pytest.raises(ConditionError, match="not a multiple of 4"):
        semantic.semantic2img(_specs(1), SETTINGS, [np.zeros((62, 64), np.uint8)])
    with pytest.raises(ConditionError, match=r"unknown label\(s\) \[19\]"):
        semantic.semantic2img(_specs(1), SETTINGS, [np.full((64, 64), 19, np.uint8)])


def test_generate_cli_tasks(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scene = scene_at(1, 0)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps([{"label": CLASS_NAMES[b.label], "box": list(b.coords)} for b in scene_layout(scene)]))
    labels = tmp_path / "map.png"
    Image.fromarray(label_map(scene)).save(labels)
    common = ["--steps", "2", "--device", "cpu"]
    runs = [(["--model", str(trained["class"]), "--class", "red circle", "--n", "2"], ["c-0.png", "c-1.png"], "c"),
            (["--model", str(trained["layout"]), "--layout", str(layout)], ["l.png"], "l"),
            (["--model", str(trained["semantic"]), "--task", "semantic", "--map", str(labels)], ["s.png"], "s"),
            (["--model", str(trained["none"]), "--task", "unconditional"], ["u.png"], "u")]
    for args, files, stem in runs:
        assert ldm_main(["generate", *args, *common, "-o", str(tmp_path / f"{stem}.png")]) == 0
        for name in files:
            with Image.open(tmp_path / name) as image:
                assert image.size == (64, 64) and image.text["task"] in ("class", "layout", "semantic", "unconditional")
    with Image.open(tmp_path / "c-0.png") as image:
        assert image.text["class"] == "red circle" and image.text["guidance_scale"] == "5.0"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"label": "red circle", "box": [0.6, 0.1, 0.2, 0.5]}]))
    failures = [(["--model", str(trained["layout"]), "--layout", str(bad)], "inverted"),
                (["--model", str(trained["class"]), "--class", "cyan circle"], "unknown class 'cyan circle'"),
                (["--model", str(trained["semantic"]), "--map", str(layout)], "not a readable image"),
                (["--model", str(trained["class"]), "--task", "semantic", "--class", "red circle"],
                 "--task semantic needs --map")]
    for args, message in failures:
        assert ldm_main(["generate", *args, *common, "-o", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err


def test_init_partial_starts_a_layout_raster_model_from_a_semantic_one(trained: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    semantic = load_model(trained["semantic"])
    with pytest.raises(ValueError, match="UNet config differs"):
        LDMTrainer(config("layout", init_from=str(trained["semantic"])), tmp_path / "strict")
    trainer = LDMTrainer(config("layout", init_from=str(trained["semantic"]), init_partial=True), tmp_path / "run")
    ours, theirs = trainer.unet.state_dict(), semantic.unet.state_dict()
    attn2 = [k for k in ours if ".attn2." in k]
    assert attn2 and all(torch.equal(ours[k], theirs[k].float()) for k in ours if k not in attn2)
    # the semantic model's attn2 is a self-attention: the new cross-attention starts fresh, adding nothing
    assert all(not ours[k].any() for k in attn2 if ".to_out." in k)
    encoder, map_encoder = trainer.model.conditioner, semantic.conditioner
    assert torch.equal(encoder.raster_in.weight, map_encoder.proj_in.weight.float())  # type: ignore[union-attr]
    assert torch.equal(encoder.raster_out.bias, map_encoder.proj_out.bias.float())  # type: ignore[union-attr]
    # so at the start a box raster drives the UNet exactly as the same map drives the semantic model without its
    # second self-attention (which a model with cross-attention has no place for)
    for name, tensor in semantic.unet.named_parameters():
        if ".attn2.to_out." in name:
            tensor.data.zero_()
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[4, -1]])
    full = torch.full((1, 64, 64), 5)  # class 4 everywhere = label 5
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        context, raster = encoder.encode_layouts([[Box(4, 0.0, 0.0, 1.0, 1.0)]], (64, 64))  # type: ignore[union-attr]
        assert torch.allclose(raster, encoder.raster(boxes, labels, 64, 64))  # type: ignore[union-attr]
        ours_eps = trainer.unet(torch.cat([x, raster], 1), t, context)
        theirs_eps = semantic.unet.float()(torch.cat([x, map_encoder.float()(full)], 1), t)  # type: ignore[union-attr]
    assert torch.allclose(ours_eps, theirs_eps, atol=1e-5)
