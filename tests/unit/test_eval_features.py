"""ShapeFeatureNet and the Fréchet distance: exact on known Gaussians, safe on singular covariances,
and the shipped weights order real < blurred < noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.eval.features import (
    DEFAULT_WEIGHTS,
    HEADS,
    SCENE_HEADS,
    ShapeFeatureNet,
    TrainConfig,
    extract_features,
    frechet_distance,
    frechet_from_statistics,
    load_feature_net,
    main,
    render_scenes,
    save_feature_net,
    scene_labels,
    train_feature_net,
)
from models.eval.judge import degrade
from models.train.data_shapes import scene_at


def test_frechet_of_diagonal_gaussians_is_the_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_from_statistics(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)


def test_frechet_of_samples_is_zero_for_the_same_set_and_grows_with_a_shift() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats, feats + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)


def test_frechet_survives_singular_covariances_without_warnings() -> None:
    rng = np.random.default_rng(1)
    few = rng.normal(size=(5, 32))  # fewer samples than dimensions: rank-4 covariances
    dead = np.concatenate([rng.normal(size=(100, 4)), np.zeros((100, 4))], axis=1)  # dead units
    assert np.isfinite(frechet_distance(few, rng.normal(size=(6, 32))))
    assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(("a", "b"), [((1, 4), (10, 4)), ((10, 4), (10, 5)), ((10,), (10,))])
def test_frechet_rejects_bad_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(a), np.zeros(b))


def test_labels_follow_the_scene() -> None:
    for index in range(100):
        truth = scene_at(0, index)
        labels = scene_labels(truth)
        assert set(labels) == set(SCENE_HEADS) and all(0 <= labels[k] < n for k, n in SCENE_HEADS.items())
        assert labels["count"] == len(truth.objects) - 1
        assert (labels["colour2"] == 0) == (len(truth.objects) == 1)


def test_net_shapes_and_input_checks() -> None:
    net = ShapeFeatureNet().eval()
    images = np.zeros((3, 64, 64, 3), np.uint8)
    assert extract_features(net, images).shape == (3, 128)
    assert extract_features(net, list(images)).shape == (3, 128)
    assert {k: v.shape for k, v in net(torch.zeros(2, 3, 64, 64)).items()} == {k: (2, n) for k, n in HEADS.items()}
    with pytest.raises(ValueError, match="uint8"):
        extract_features(net, images.astype(np.float32))
    with pytest.raises(ValueError, match="64x64"):
        extract_features(net, np.zeros((1, 32, 32, 3), np.uint8))


def test_training_is_deterministic_and_saves_a_loadable_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = TrainConfig(steps=3, batch_size=8, pool=16, validation=16, seed=3)
    (net_a, acc_a), (net_b, _) = (train_feature_net(config, progress=False) for _ in range(2))
    for (key, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert set(acc_a) == set(HEADS) and all(0.0 <= v <= 1.0 for v in acc_a.values())
    path = tmp_path / "net.safetensors"
    save_feature_net(net_a, path, {"val_accuracy": acc_a})
    loaded = load_feature_net(path)
    images, _ = render_scenes(0, 4, "", progress=False)
    np.testing.assert_array_equal(extract_features(loaded, images), extract_features(net_a, images))


def test_missing_weights_name_the_command_that_makes_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="python -m models.eval.features"):
        load_feature_net(tmp_path / "absent.safetensors")


def test_command_line_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "--steps" in capsys.readouterr().out


def test_shipped_weights_are_small_and_order_real_damaged_noise() -> None:
    """Real vs real (other scenes) < real vs the same scenes blurred 1 px with noise 8 < real vs noise."""
    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000
    net = load_feature_net()
    real, _ = render_scenes(500, 300, "", progress=False)
    other, _ = render_scenes(501, 300, "", progress=False)
    rng = np.random.default_rng(0)
    damaged = np.stack([degrade(image, rng) for image in other])
    noise = rng.integers(0, 256, other.shape, dtype=np.uint8)
    feats = extract_features(net, real)
    fd_real, fd_damaged, fd_noise = (frechet_distance(feats, extract_features(net, x)) for x in (other, damaged, noise))
    assert 5 * fd_real < fd_damaged < fd_noise
