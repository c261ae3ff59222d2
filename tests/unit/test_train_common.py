"""Training helpers: learning-rate schedule, EMA, the loss log across a resume, metrics, losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.train.common import EMA, LossLog, load_train_config, psnr, ssim, warmup_lr
from models.train.ldm_trainer import LDMTrainConfig
from models.train.losses import LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss


def test_warmup_then_constant_then_linear_decay() -> None:
    assert warmup_lr(0, 1.0, 10) == pytest.approx(0.1)
    assert warmup_lr(9, 1.0, 10) == warmup_lr(500, 1.0, 10) == 1.0
    assert warmup_lr(75, 1.0, 10, decay_start=50, total_steps=100) == pytest.approx(0.55)
    assert warmup_lr(100, 1.0, 10, decay_start=50, total_steps=100) == pytest.approx(0.1)


def test_ema_warms_up_and_tracks() -> None:
    module = nn.Linear(2, 2)
    ema = EMA(module, decay=0.99)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay min(0.99, 2/11): mostly the new value
    assert torch.allclose(ema.shadow["weight"], before * 2 / 11 + 9 / 11)
    target = nn.Linear(2, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])
    restored = EMA(nn.Linear(2, 2))
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.shadow["bias"], ema.shadow["bias"])


def test_loss_log_drops_rows_past_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    log = LossLog(path, ["loss"])
    for step in (1, 2, 3):
        log.write(step, {"loss": float(step)})
    LossLog(path, ["loss"], resume_step=2).write(3, {"loss": 9.0})
    assert path.read_text().splitlines() == ["step,loss", "1,1", "2,2", "3,9"]


def test_psnr_and_ssim() -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noisy = x + 0.02 * torch.randn_like(x)
    assert 30 < psnr(noisy, x).mean() < 50
    assert ssim(noisy, x).mean() > ssim(torch.zeros_like(x), x).mean()


def test_train_config_from_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nunet:\n  model_channels: 32\n  norm_groups: 8\n")
    config = load_train_config(LDMTrainConfig, path, {"lr": 0.5, "steps": None})
    assert config.steps == 7 and config.lr == 0.5 and config.unet.norm_groups == 8
    path.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="stepz"):
        load_train_config(LDMTrainConfig, path)
    with pytest.raises(FileNotFoundError):
        load_train_config(LDMTrainConfig, tmp_path / "none.yaml")


def test_discriminator_and_hinge_loss() -> None:
    disc = PatchDiscriminator(3, width=16, layers=2)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[-1] > 1  # one logit per patch
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0


def test_adaptive_weight_balances_gradient_norms() -> None:
    layer = nn.Parameter(torch.ones(3))
    nll = (layer * 4).sum()
    g = (layer * 2).sum()
    assert adaptive_weight(nll, g, layer, 1.0).item() == pytest.approx(2.0, rel=1e-3)


def test_lpips_loads_local_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = LPIPS()
    vgg = {f"features.{k}": v for k, v in reference.features.state_dict().items()}
    lin = {f"lin{i}.model.1.weight": m.weight.abs() for i, m in enumerate(reference.lins)}
    torch.save(vgg, tmp_path / "vgg.pth")
    torch.save(lin, tmp_path / "lin.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg.pth", tmp_path / "lin.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loaded(x, x).item() == 0.0
    assert loaded(x, -x).item() > 0.0
    with pytest.raises(FileNotFoundError, match="perceptual"):
        LPIPS.from_files(tmp_path / "missing.pth", tmp_path / "lin.pth")
