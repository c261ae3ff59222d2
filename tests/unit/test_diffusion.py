"""The forward process and the loss: schedules bit-for-bit against diffusers' schedulers, q_sample and the
v target against diffusers' add_noise / get_velocity, v/eps/x0 conversions, Eq. 1, training timesteps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.diffusion import (
    NoiseSchedule,
    ScheduleConfig,
    diffusion_loss,
    eps_to_x0,
    q_sample,
    v_target,
    v_to_eps,
    v_to_x0,
)

SCHEDULES = [
    ScheduleConfig(),  # SD v1 (CompVis "linear" == diffusers "scaled_linear")
    ScheduleConfig(beta_start=0.0015, beta_end=0.0195),  # LDM VQ models
    ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    ScheduleConfig(beta_schedule="cosine"),
]


def _diffusers_ddpm(cfg: ScheduleConfig):  # type: ignore[no-untyped-def]
    from diffusers import DDPMScheduler

    name = "squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else cfg.beta_schedule
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=name,
        clip_sample=False,
        prediction_type=cfg.prediction_type,
    )


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: f"{c.beta_schedule}-{c.beta_start}")
def test_schedule_matches_diffusers_bit_for_bit(cfg: ScheduleConfig) -> None:
    ours, theirs = NoiseSchedule.from_config(cfg), _diffusers_ddpm(cfg)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_sd_schedule_is_compvis_linear() -> None:
    """CompVis computes `linear` = linspace(sqrt(start), sqrt(end))^2 in float64; ours differs by rounding."""
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod.double()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    compvis = torch.from_numpy(np.cumprod(1 - betas))
    torch.testing.assert_close(ac, compvis, atol=2e-6, rtol=0)
    assert round(ac[0].item(), 6) == 0.999150 and round(ac[999].item(), 6) == 0.004660


def test_q_sample_and_v_target_match_diffusers() -> None:
    cfg = ScheduleConfig(prediction_type="v_prediction")
    schedule, theirs = NoiseSchedule.from_config(cfg), _diffusers_ddpm(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    assert torch.equal(q_sample(schedule, x0, t, noise), theirs.add_noise(x0, noise, t))
    assert torch.equal(v_target(x0, noise, schedule.abar_at(t, x0)), theirs.get_velocity(x0, noise, t))


def test_v_and_eps_conversions_round_trip() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 600, 999])
    abar = schedule.abar_at(t, x0)
    assert abar.shape == (5, 1, 1, 1)
    x_t = q_sample(schedule, x0, t, noise)
    v = v_target(x0, noise, abar)
    torch.testing.assert_close(v_to_eps(v, x_t, abar), noise, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_to_x0(v, x_t, abar), x0, atol=1e-5, rtol=0)
    # eps -> x0 loses precision where sqrt(abar) is small (t = 999: 0.068), hence the looser bound
    torch.testing.assert_close(eps_to_x0(noise, x_t, abar), x0, atol=1e-4, rtol=0)
    t_float = t.float()  # what a sampler passes to the model wrapper
    torch.testing.assert_close(schedule.eps_from_v(v, x_t, t_float), noise, atol=1e-5, rtol=0)
    torch.testing.assert_close(schedule.x0_from_v(v, x_t, t_float), x0, atol=1e-5, rtol=0)
    # the (x0, eps) a v prediction implies give back the same v
    x0_hat, eps_hat = v_to_x0(v, x_t, abar), v_to_eps(v, x_t, abar)
    torch.testing.assert_close(v_target(x0_hat, eps_hat, abar), v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_eq1(prediction_type: str) -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig(prediction_type=prediction_type))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(2)
    x0, noise, pred = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = schedule.sample_timesteps(3, g)
    target = noise if prediction_type == "epsilon" else v_target(x0, noise, schedule.abar_at(t, x0))
    assert diffusion_loss(target, x0, noise, t, schedule).item() == 0.0
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, t, schedule), F.mse_loss(pred, target))
    l1 = diffusion_loss(pred, x0, noise, t, schedule, loss_type="l1")
    torch.testing.assert_close(l1, F.l1_loss(pred, target))
    with pytest.raises(ValueError):
        diffusion_loss(pred, x0, noise, t, schedule, loss_type="huber")  # type: ignore[arg-type]


def test_loss_gradient_flows_to_the_prediction() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    pred = torch.zeros(2, 4, 4, 4, requires_grad=True)
    noise = torch.ones(2, 4, 4, 4)
    diffusion_loss(pred, torch.zeros_like(noise), noise, torch.tensor([3, 7]), schedule).backward()
    assert pred.grad is not None and torch.allclose(pred.grad, torch.full_like(pred, -2.0 / pred.numel()))


def test_sample_timesteps_uniform_and_seeded() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    a = schedule.sample_timesteps(20000, torch.Generator().manual_seed(3))
    b = schedule.sample_timesteps(20000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (20000,)
    assert a.min().item() == 0 and a.max().item() == 999
    counts = torch.bincount(a // 100, minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1  # ~2000 per bucket, sd ~45


def test_config_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError):
        ScheduleConfig(beta_schedule="sqrt_linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ScheduleConfig(prediction_type="sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ScheduleConfig(timestep_spacing="uniform")  # type: ignore[arg-type]
