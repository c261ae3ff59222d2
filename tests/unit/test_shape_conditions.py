"""The shapes dataset's conditions (class label, layout, label map) against the rendered image and the caption,
the conditioning encoders' shapes and invariances, every bad box and map rejected with a clear error, and the
evaluation criteria of the other conditionings validated on ground-truth renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.autoencoder import AutoencoderConfig
from models.class_conditioner import ClassConditioner
from models.conditioners import ConditionerConfig, build_conditioner
from models.conditioning import (
    Box,
    ConditionError,
    LayoutEncoder,
    LayoutEncoderConfig,
    SemanticEncoder,
    SemanticEncoderConfig,
    label_map_array,
    label_map_tensor,
    pack_layouts,
    parse_layout,
    resolve_label,
)
from models.config import ModelConfig
from models.eval.conditions import evaluate_task, heldout_scenes, real_images, score, write_conditions
from models.eval.features import load_feature_net
from models.eval.judge import analyse
from models.eval.prompts import parse_prompt
from models.names import CONDITION_TASKS
from models.train.data import DataConfig, condition_tensors, make_sources
from models.train.data_shapes import (
    CLASS_NAMES,
    IMAGE_SIZE,
    LABEL_PALETTE,
    ShapesDataset,
    class_id,
    class_of,
    label_map,
    render,
    scene_at,
    scene_class,
    scene_conditions,
    scene_layout,
)
from models.unet import UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

N_SCENES = 150
NAMES = list(CLASS_NAMES)


@pytest.fixture(scope="module")
def scenes() -> list:
    return [scene_at(0, i) for i in range(N_SCENES)]


# --- the label numbering --------------------------------------------------------------------------------------


def test_class_numbering_is_colour_major_and_round_trips() -> None:
    assert len(CLASS_NAMES) == 18 and len(set(CLASS_NAMES)) == 18
    assert CLASS_NAMES[:4] == ("red circle", "red square", "red triangle", "green circle")
    assert CLASS_NAMES[-1] == "orange triangle"
    for k, name in enumerate(CLASS_NAMES):
        colour, shape = class_of(k)
        assert f"{colour} {shape}" == name and class_id(colour, shape) == k
    assert len(LABEL_PALETTE) == 19 and LABEL_PALETTE[0] == (255, 255, 255)
    with pytest.raises(ValueError, match="outside 0..17"):
        class_of(18)


# --- the conditions agree with the image and the caption ------------------------------------------------------


def test_label_map_layout_class_and_caption_describe_the_same_image(scenes: list) -> None:
    ious = []
    for scene in scenes:
        image, labels = render(scene), label_map(scene)
        layout, spec = scene_layout(scene), parse_prompt(scene.caption)
        # the caption's objects, the layout's classes and the map's labels are the same objects, in order
        asked = [class_id(o.colour, o.shape) for o in spec.objects]
        assert [b.label for b in layout] == asked
        assert set(np.unique(labels)) == {0, *(k + 1 for k in asked)}
        assert scene_class(scene) == (asked[0] if len(asked) == 1 else None)
        analysis = analyse(image)
        assert len(analysis.objects) == len(asked)
        for box in layout:
            region = labels == box.label + 1
            # the box encloses the object's pixels (a pixel is in the map if its centre's side of the edge
            # holds at least half of it, so its centre lies within half a pixel of the box)
            ys, xs = np.nonzero(region)
            assert (xs + 0.5).min() >= box.x0 * IMAGE_SIZE - 0.5 and (xs + 0.5).max() <= box.x1 * IMAGE_SIZE + 0.5
            assert (ys + 0.5).min() >= box.y0 * IMAGE_SIZE - 0.5 and (ys + 0.5).max() <= box.y1 * IMAGE_SIZE + 0.5
            assert math.isclose(box.x1 - box.x0, box.y1 - box.y0, abs_tol=1e-9)  # all three shapes: a square box
            # the judge's segmentation of the render finds the same object where the map puts it
            colour, shape = class_of(box.label)
            (found,) = [o for o in analysis.objects if o.colour == colour]
            assert found.shape == shape
            ious.append((region & found.mask).sum() / (region | found.mask).sum())
            # the map's pixels are drawn in the object's colour (closer to it than to the background)
            rgb = np.array(LABEL_PALETTE[box.label + 1], dtype=float)
            pixels = image[region].astype(float)
            background = np.array(analysis.background_rgb)
            assert (np.linalg.norm(pixels - rgb, axis=1) < np.linalg.norm(pixels - background, axis=1) + 40).all()
    assert min(ious) > 0.75 and np.mean(ious) > 0.97  # ties at exactly half a pixel go either way on thin apexes


def test_conditions_are_deterministic_and_the_images_unchanged() -> None:
    data = ShapesDataset(seed=0)
    images, texts, conditions = data.batch_with_conditions(5, 4)
    plain_images, plain_texts = data.batch(5, 4)
    assert torch.equal(images, plain_images) and texts == plain_texts
    for i, cond in enumerate(conditions):
        again = scene_conditions(scene_at(0, 5 + i))
        assert cond.class_id == again.class_id and cond.layout == again.layout
        assert np.array_equal(cond.label_map, again.label_map) and cond.label_map.dtype == np.uint8
    # the single-object stream: scenes that are single in the default stream are the very same
    single = ShapesDataset(seed=0, pair_probability=0.0)
    for index in range(40):
        default, only = scene_at(0, index), single.scene(index)
        assert len(only.objects) == 1
        if len(default.objects) == 1:
            assert only == default


def test_condition_tensors_per_kind() -> None:
    _, _, conditions = ShapesDataset(seed=3).batch_with_conditions(0, 6)
    pairs = [c for c in conditions if c.class_id is None]
    assert pairs, "stream 3 should hold a two-object scene in its first 6"
    layout = condition_tensors(conditions, "layout", max_boxes=4)
    assert layout["boxes"].shape == (6, 4, 4) and layout["box_labels"].shape == (6, 4)
    assert ((layout["box_labels"] >= 0).sum(1) == torch.tensor([len(c.layout) for c in conditions])).all()
    maps = condition_tensors(conditions, "semantic")["maps"]
    assert maps.shape == (6, 64, 64) and maps.dtype == torch.uint8
    with pytest.raises(ValueError, match="pair_probability: 0"):
        condition_tensors(conditions, "class")
    single, _ = make_sources(DataConfig(pair_probability=0.0))
    assert condition_tensors(single.batch_with_conditions(0, 6)[2], "class")["labels"].shape == (6,)
    assert condition_tensors(conditions, "text") == {}


# --- encoders -------------------------------------------------------------------------------------------------


def test_layout_encoder_shapes_order_invariance_and_null() -> None:
    torch.manual_seed(0)
    enc = LayoutEncoder(18, LayoutEncoderConfig(max_boxes=3, width=32, depth=2, heads=4), NAMES).eval()
    a, b = Box(0, 0.1, 0.1, 0.4, 0.4), Box(7, 0.5, 0.2, 0.9, 0.6)
    with torch.no_grad():
        out, raster = enc.encode_layouts([[a, b], [b, a], []])
    assert raster is None and out.shape == (3, 4, 32) and torch.isfinite(out).all()
    # a layout is a set: listing the boxes the other way round permutes the box tokens, nothing else
    assert torch.allclose(out[0, 0], out[1, 0], atol=1e-5)
    assert torch.allclose(out[0, 1], out[1, 2], atol=1e-5) and torch.allclose(out[0, 2], out[1, 1], atol=1e-5)
    assert not torch.allclose(out[0, 0], out[2, 0], atol=1e-3)  # the null (empty) layout differs
    # empty slots are masked out as keys: what they hold does not reach the real tokens
    boxes, labels = pack_layouts([[a]], 3)
    noisy = boxes.clone()
    noisy[0, 1:] = torch.rand(2, 4)
    with torch.no_grad():
        assert torch.allclose(enc(boxes, labels)[:, :2], enc(noisy, labels)[:, :2], atol=1e-6)
    with pytest.raises(ConditionError, match="at most 3 boxes"):
        enc.encode_layouts([[a, b, a, b]])
    with pytest.raises(ConditionError, match="outside 0..17"):
        enc.encode_layouts([[Box(18, 0.1, 0.1, 0.2, 0.2)]])
    with pytest.raises(ConditionError, match="not on a prompt"):
        enc.encode(["a red circle"])


def test_semantic_encoder_shapes_locality_and_null() -> None:
    torch.manual_seed(0)
    enc = SemanticEncoder(18, SemanticEncoderConfig(channels=5, hidden=16, downsample=4))
    maps = torch.zeros(2, 64, 64, dtype=torch.long)
    maps[1, 9, 13] = 4  # one pixel in latent cell (2, 3)
    with torch.no_grad():
        out = enc(maps)
        null = enc.null(2, 64, 64)
    assert out.shape == (2, 5, 16, 16)
    changed = (out[0] - out[1]).abs().sum(0) > 0
    assert changed.nonzero().tolist() == [[2, 3]]  # folded 4x4: a pixel reaches its own latent cell only
    # the null map (all unknown) is the learned bias alone, the same everywhere, and no real map's encoding
    assert torch.allclose(null, null[:, :, :1, :1].expand_as(null)) and not torch.allclose(null, out)
    with pytest.raises(ConditionError, match="multiples of 4"):
        enc(torch.zeros(1, 62, 64, dtype=torch.long))
    assert enc.encode_maps([np.zeros((8, 12), dtype=np.uint8)]).shape == (1, 5, 2, 3)


def test_class_conditioner_takes_names_and_keeps_its_null_class() -> None:
    cond = ClassConditioner(18, 8, CLASS_NAMES)
    ids = cond.encode(["red circle", " Orange   TRIANGLE ", "4", ""]).context
    assert ids.shape == (4, 1, 8)
    assert torch.equal(ids[0, 0], cond.embedding.weight[0]) and torch.equal(ids[1, 0], cond.embedding.weight[17])
    assert torch.equal(ids[3, 0], cond.embedding.weight[18])  # "" = the null class of guidance
    with pytest.raises(ValueError, match="or a class name"):
        cond.encode(["pink circle"])
    with pytest.raises(ValueError, match="3 class names for 18"):
        ClassConditioner(18, 8, CLASS_NAMES[:3])


def test_conditioner_configs_and_their_wiring() -> None:
    layout = ConditionerConfig(kind="layout", n_classes=18, class_names=CLASS_NAMES,
                               layout=LayoutEncoderConfig(width=32, heads=4, depth=1))
    assert layout.context_dim == 32 and isinstance(build_conditioner(layout), LayoutEncoder)
    semantic = ConditionerConfig(kind="semantic", n_classes=18, semantic=SemanticEncoderConfig(channels=8))
    assert semantic.context_dim is None and isinstance(build_conditioner(semantic), SemanticEncoder)
    with pytest.raises(ValueError, match="2 class_names for n_classes 18"):
        ConditionerConfig(kind="class", n_classes=18, class_names=("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        ConditionerConfig(kind="class", n_classes=2, class_names=("a", "A"))
    ae = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), z_channels=3, embed_dim=3)  # f = 4
    unet = UNetConfig(in_channels=11, out_channels=3, model_channels=32, channel_mult=(1, 2), context_dim=None)
    ok = ModelConfig("s", "ldm", unet, ae, conditioner=semantic, conditioning="concat", concat_input="semantic")
    assert ok.unet.in_channels == 3 + 8
    with pytest.raises(ValueError, match="needs 11"):
        ModelConfig("s", "ldm", UNetConfig(**{**unet.__dict__, "in_channels": 3}), ae, conditioner=semantic,
                    conditioning="concat", concat_input="semantic")
    with pytest.raises(ValueError, match="concat_input 'semantic'"):
        ModelConfig("s", "ldm", unet, ae, conditioner=semantic, conditioning="concat", concat_input="lowres")
    with pytest.raises(ValueError, match="differs from the layout conditioner's width 32"):
        ModelConfig("l", "ldm", UNetConfig(in_channels=3, model_channels=32, context_dim=64), ae,
                    conditioner=layout)
    # a layout encoder with a raster: both wirings at once (hybrid), its channels stacked on the latent
    raster = ConditionerConfig(kind="layout", n_classes=18, layout=LayoutEncoderConfig(
        width=32, heads=4, depth=1, raster_channels=8, raster_downsample=4))
    both = UNetConfig(in_channels=11, out_channels=3, model_channels=32, channel_mult=(1, 2), context_dim=32)
    assert ModelConfig("r", "ldm", both, ae, conditioner=raster, conditioning="hybrid", concat_input="layout")
    with pytest.raises(ValueError, match="needs conditioning 'hybrid'"):
        ModelConfig("r", "ldm", both, ae, conditioner=raster, conditioning="concat", concat_input="layout")
    with pytest.raises(ValueError, match="with a raster goes with concat_input 'layout'"):
        ModelConfig("r", "ldm", both, ae, conditioner=raster, conditioning="crossattn")
    with pytest.raises(ValueError, match="with a raster goes with concat_input 'layout'"):
        ModelConfig("l", "ldm", both, ae, conditioner=layout, conditioning="hybrid", concat_input="layout")
    with pytest.raises(ValueError, match="raster_downsample must equal the first stage's factor 4"):
        ModelConfig("r", "ldm", both, ae, conditioning="hybrid", concat_input="layout",
                    conditioner=ConditionerConfig(kind="layout", n_classes=18, layout=LayoutEncoderConfig(
                        width=32, heads=4, depth=1, raster_channels=8, raster_downsample=8)))


# --- bad inputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("coords", "message"), [
    ((0.5, 0.1, 0.4, 0.3), "empty or inverted"),
    ((0.1, 0.3, 0.4, 0.3), "empty or inverted"),
    ((-0.1, 0.1, 0.4, 0.3), "not inside the image"),
    ((0.1, 0.1, 1.2, 0.3), "not inside the image"),
    ((0.1, float("nan"), 0.4, 0.3), "finite numbers"),
])
def test_bad_boxes_are_rejected(coords: tuple[float, float, float, float], message: str) -> None:
    with pytest.raises(ConditionError, match=message):
        Box(0, *coords)


def test_layouts_from_json_are_checked() -> None:
    good = parse_layout([{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}, {"label": 4, "box": [0.5, 0, 1, 1]}],
                        NAMES, 18, 4)
    assert good == [Box(0, 0.1, 0.1, 0.4, 0.4), Box(4, 0.5, 0, 1, 1)]
    assert parse_layout({"boxes": []}, NAMES, 18, 4) == []
    cases = [
        ([{"label": "pink circle", "box": [0.1, 0.1, 0.4, 0.4]}], "layout box 0: unknown class 'pink circle'"),
        ([{"label": 18, "box": [0.1, 0.1, 0.4, 0.4]}], "class id 18 is outside 0..17"),
        ([{"label": True, "box": [0.1, 0.1, 0.4, 0.4]}], "expected a class name or id"),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.4]}], "4 numbers"),
        ([{"label": "red circle", "box": [0.4, 0.1, 0.1, 0.4]}], "layout box 0: .* inverted"),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.4, 1.5]}], "not inside the image"),
        ([{"label": "red circle"}], "expected"),
        ({"label": "red circle"}, "a layout is a list"),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}] * 5, "at most 4 boxes"),
    ]
    for data, message in cases:
        with pytest.raises(ConditionError, match=message):
            parse_layout(data, NAMES, 18, 4)
    assert resolve_label("7", NAMES, 18) == 7 and resolve_label("Blue  Square", NAMES, 18) == 7


def test_bad_label_maps_are_rejected() -> None:
    good = np.zeros((8, 8), dtype=np.uint8)
    good[2:4, 2:4] = 18
    assert label_map_array(Image.fromarray(good), 18).max() == 18
    cases = [
        (Image.new("RGB", (8, 8)), "single-channel image .* got a mode RGB image"),
        (Image.new("RGBA", (8, 8)), "mode RGBA"),
        (np.full((8, 8), 19, dtype=np.uint8), r"unknown label\(s\) \[19\]"),
        (np.full((8, 8), -1, dtype=np.int64), r"unknown label\(s\) \[-1\]"),
        (np.zeros((8, 8), dtype=np.float32), "integer array"),
        (np.zeros((8, 8, 3), dtype=np.uint8), "integer array"),
        (np.zeros((0, 8), dtype=np.uint8), "empty"),
    ]
    for image, message in cases:
        with pytest.raises(ConditionError, match=message):
            label_map_array(image, 18)
    with pytest.raises(ConditionError, match="share a size"):
        label_map_tensor([good, np.zeros((8, 12), dtype=np.uint8)], 18)


def test_example_conditions_round_trip(tmp_path: Path) -> None:
    written = write_conditions(tmp_path, 2)
    assert len(written) == 6
    scene = heldout_scenes("layout", 2)[1]
    with Image.open(tmp_path / "map-001.png") as image:
        assert image.mode == "P"
        assert np.array_equal(label_map_array(image, 18), label_map(scene))
    boxes = parse_layout(json.loads((tmp_path / "layout-001.json").read_text()), NAMES, 18, 4)
    for got, want in zip(boxes, scene_layout(scene), strict=True):
        assert got.label == want.label and np.allclose(got.coords, want.coords, atol=1e-6)


# --- evaluation criteria on ground truth ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_net() -> object:
    return load_feature_net()


@pytest.mark.parametrize("task", CONDITION_TASKS)
def test_real_renders_score_full_marks(task: str, feature_net: object) -> None:
    report = evaluate_task(real_images, task, 24, feature_net=feature_net, progress=False)  # type: ignore[arg-type]
    assert report.accuracy == 1.0 and report.image_accuracy == 1.0 and report.metrics["count"] == 1.0
    if task in ("semantic", "layout"):
        assert report.metrics["mean_iou"] > 0.9
    assert report.fd is not None and report.fd_reference is not None and abs(report.fd) < 1e-2 < report.fd_reference


def test_wrong_images_score_low() -> None:
    """The criteria reject images of another scene: the asked class, region or box is not where it is asked."""
    for task in ("class", "semantic", "layout"):
        scenes = heldout_scenes(task, 24)  # type: ignore[arg-type]
        shifted = scenes[1:] + scenes[:1]
        right = [score(task, analyse(render(other)), scene)[0]  # type: ignore[arg-type]
                 for scene, other in zip(scenes, shifted, strict=True)]
        assert np.mean(right) < 0.2, task


def test_layout_raster_marks_boxes_background_and_null() -> None:
    torch.manual_seed(0)
    enc = LayoutEncoder(18, LayoutEncoderConfig(max_boxes=3, width=16, depth=1, heads=2, raster_channels=5,
                                                raster_hidden=8, raster_downsample=4))
    boxes, labels = pack_layouts([[Box(2, 0.0, 0.0, 0.5, 0.5), Box(7, 0.25, 0.25, 1.0, 0.5)], []], 3)
    maps = enc.box_maps(boxes, labels, 8, 8)
    assert maps.shape == (2, 19, 8, 8)
    assert maps[0, 3, :4, :4].all() and maps[0, 3].sum() == 16  # class 2 -> channel 3, the top-left quarter
    assert maps[0, 8, 2:4, 2:].all() and maps[0, 8].sum() == 12  # class 7 overlaps it: both marked there
    assert maps[0, 0].sum() == 64 - 16 - 8 and not (maps[0, 0] * maps[0, 1:].sum(0)).any()  # outside every box
    assert not maps[1].any()  # the empty layout (the null) is unknown everywhere, not background
    with torch.no_grad():
        raster = enc.raster(boxes, labels, 64, 64)
        context, again = enc.encode_layouts([[Box(2, 0.0, 0.0, 0.5, 0.5), Box(7, 0.25, 0.25, 1.0, 0.5)], []], (64, 64))
    assert raster.shape == (2, 5, 16, 16) and torch.equal(raster, again) and context.shape == (2, 4, 16)
    with pytest.raises(ConditionError, match="not a multiple of 4"):
        enc.raster(boxes, labels, 62, 64)
    with pytest.raises(ValueError, match="needs the image size"):
        enc.encode_layouts([[]])
    with pytest.raises(ConditionError, match="no raster"):
        LayoutEncoder(18, LayoutEncoderConfig()).raster(boxes, labels, 64, 64)
