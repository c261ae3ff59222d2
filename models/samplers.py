"""Samplers for discrete-time (VP) diffusion models: small pure functions over an epsilon predictor.

Every sampler takes and returns **VP-space latents** x = sqrt(abar) x0 + sqrt(1 - abar) eps, walks the
levels of a `SamplingPlan` (model timesteps [S], alpha-bar at S + 1 levels) and calls
`eps_fn(x [N, C, H, W], t [N] float)`. Classifier-free guidance, v -> eps conversion and concat
conditioning are wrappers around `eps_fn`, not sampler code.

Parity target: diffusers' StableDiffusionPipeline with the SD v1 scheduler config (scaled_linear
0.00085 -> 0.012, 1000 steps, steps_offset 1, "leading" spacing, set_alpha_to_one False, clip_sample
False, skip_prk_steps True). Plans reproduce the timesteps of diffusers' DDIM, PNDM, DDPM,
DPMSolverMultistep and EulerAncestralDiscrete schedulers, and each update repeats their arithmetic, so
results match them to float rounding. Deliberate differences, all where diffusers breaks:
- Every step count 1..T works. diffusers' "leading" with steps_offset 1 and S = T asks for timestep T
  (out of range: DDIM/PNDM/DDPM raise IndexError); DPMSolverMultistep's S + 1 point "leading" grid gives
  timestep T at S = T - 1 and a zero step ratio at S = T (NaNs). We lower the offset just enough that
  the largest timestep is T - 1 (S = T - 1 for DPM: 999..1), and S = T always means all of T-1..0.
- "trailing" spacing: numpy's float `arange` makes diffusers return S + 1 timesteps ending at -1 for
  some S (61, 103, ...); we keep the first S.
- DDIM/PNDM step to t - T // S; we step to the next level of the plan. Identical for "leading";
  for "linspace" (and some "trailing" S) diffusers' target level is not the next timestep.
- PLMS img2img: diffusers slices PNDM's S + 1 entry timestep list (which repeats one timestep for the
  warm-up step) by t_start, so for strength < 1 it noises one level too high and then steps from a level
  other than the sample's. We run the same PLMS (improved-Euler warm-up, then Adams-Bashforth) on the
  kept DDIM levels. Strength 1.0 (txt2img) is identical.
- Euler ancestral, "linspace"/"trailing" only: diffusers' init_noise_sigma is sigma_max there, not
  sqrt(sigma_max^2 + 1); we always start from the VP latent at level 0 (x_ve = x_vp sqrt(sigma^2 + 1)).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from models.diffusion import NoiseSchedule, ScheduleConfig
from models.names import SAMPLERS, SamplerName
from models.noise import randn_per_item

EpsFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], Tensor | None]


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The noise levels a sampler walks, highest first. S = len(timesteps).

    timesteps: [S] float32, the model timesteps fed to the UNet (diffusers' `scheduler.timesteps`;
        PLMS evaluates the model once more, at timesteps[1], on its first step).
    abar: [S + 1] float32, alpha-bar at every level; level i is the sample's level before step i, level S
        the final one: alphas_cumprod[0] for ddim/plms (set_alpha_to_one=False, as CompVis), 1.0 for
        ddpm, dpmpp_2m and euler_a (sigma 0).
    sigmas: [S + 1] float32, VE noise levels sqrt((1 - abar) / abar); for dpmpp_2m and euler_a these are
        diffusers' own values (Karras sigmas when asked) and `abar` is derived from them.
    """

    name: SamplerName
    timesteps: Tensor
    abar: Tensor
    sigmas: Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def from_strength(self, strength: float) -> "SamplingPlan":
        """img2img (SDEdit) plan: keep the last int(S * strength) steps, diffusers' rule; strength 1.0
        keeps all of them (the original CompVis script crashed there). Noise the init latent with
        `plan.noise(0, ...)` of the returned plan. When int(S * strength) is 0 the plan is empty
        (no step runs; `sample` returns its input), which is CompVis' "strength 0 changes nothing"."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        start = self.steps - min(int(self.steps * strength), self.steps)
        return replace(
            self, timesteps=self.timesteps[start:], abar=self.abar[start:], sigmas=self.sigmas[start:]
        )

    def noise(self, index: int, x0: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x at level `index` | x0) in VP space: sqrt(abar) x0 + sqrt(1 - abar) noise, rounded as
        the matching diffusers scheduler's `add_noise` rounds it."""
        if self.name in ("dpmpp_2m", "euler_a"):  # alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma alpha
            sigma = self.sigmas[index].to(dtype=x0.dtype)
            alpha = 1 / (sigma**2 + 1) ** 0.5
            return alpha * x0 + sigma * alpha * noise
        abar = self.abar[index].to(dtype=x0.dtype)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


# ---- plans --------------------------------------------------------------------------------------------


def _grid_timesteps(cfg: ScheduleConfig, steps: int, family: Literal["ddim", "dpm", "euler"]) -> np.ndarray:
    """Descending [steps] model timesteps of diffusers' `set_timesteps` (numpy arithmetic copied).

    "ddim" covers DDIM, PNDM and DDPM; DPMSolverMultistep spaces S + 1 points and drops the last;
    EulerAncestral does not round its "linspace" grid. See the module docstring for the repairs.
    """
    T, S = cfg.num_train_timesteps, steps
    if S == T:
        return np.arange(T - 1, -1, -1, dtype=np.float64)
    n = S + 1 if family == "dpm" else S
    if cfg.timestep_spacing == "linspace":
        grid = np.linspace(0, T - 1, n, dtype=np.float32 if family == "euler" else np.float64)
        return (grid if family == "euler" else grid.round())[::-1][:S].astype(np.float64)
    if cfg.timestep_spacing == "leading":
        raw = np.arange(n)[::-1][:S] * (T // n)
        return (raw + min(cfg.steps_offset, T - 1 - int(raw.max()))).astype(np.float64)
    return np.round(np.arange(T, 0, -T / S))[:S] - 1  # "trailing"


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) Eq. 5: n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log sigma (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # [T, n]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _sigma_grid(
    schedule: NoiseSchedule, steps: int, family: Literal["dpm", "euler"], karras: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [S], sigmas [S]) of DPMSolverMultistep / EulerAncestral, in float64 numpy."""
    ac = schedule.alphas_cumprod
    all_sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # [T] fp32, computed in torch as diffusers does
    if karras:
        sigmas = karras_sigmas(float(all_sigmas[0]), float(all_sigmas[-1]), steps)
        timesteps = _sigma_to_t(sigmas, np.log(all_sigmas))
        if schedule.config.beta_schedule != "cosine":
            timesteps = timesteps.round()
        return timesteps.astype(np.int64).astype(np.float64), sigmas  # int64 cast as diffusers stores them
    timesteps = _grid_timesteps(schedule.config, steps, family)
    return timesteps, np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)


def sampling_plan(
    name: SamplerName, schedule: NoiseSchedule, steps: int, *, karras: bool = False
) -> SamplingPlan:
    """The plan diffusers' scheduler for `name` would follow with `steps` inference steps (any 1..T).

    karras=True (dpmpp_2m only): Karras sigmas between the schedule's extremes, model timesteps rounded
    from them (not rounded for the cosine schedule), as DPMSolverMultistepScheduler(use_karras_sigmas).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
    if karras and name != "dpmpp_2m":
        raise ValueError("karras sigmas are supported by dpmpp_2m only")
    ac = schedule.alphas_cumprod
    if name in ("dpmpp_2m", "euler_a"):
        ts, sig = _sigma_grid(schedule, steps, "dpm" if name == "dpmpp_2m" else "euler", karras)
        sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        abar = 1 / (1 + sigmas**2)
    else:
        ts = _grid_timesteps(schedule.config, steps, "ddim")
        final = torch.ones(1) if name == "ddpm" else ac[:1]
        abar = torch.cat([ac[torch.from_numpy(ts.astype(np.int64))], final])
        sigmas = ((1 - abar) / abar) ** 0.5
    return SamplingPlan(
        name=name, timesteps=torch.from_numpy(ts.astype(np.float32)), abar=abar, sigmas=sigmas
    )


# ---- helpers ------------------------------------------------------------------------------------------


def _timestep(plan: SamplingPlan, i: int, x: Tensor) -> Tensor:
    """Model timestep of step i for every item: [N] float32 on x's device."""
    return plan.timesteps[i].repeat(x.shape[0]).to(x.device)


def _after_step(callback: StepCallback | None, i: int, x: Tensor) -> Tensor:
    """Run the step callback; a tensor it returns replaces x (inpainting blends the known region here)."""
    if callback is None:
        return x
    out = callback(i, x)
    return x if out is None else out


def _check_generators(generators: Sequence[torch.Generator], x: Tensor) -> None:
    if len(generators) != x.shape[0]:
        raise ValueError(
            f"need one generator per batch item: {x.shape[0]} items, {len(generators)} generators"
        )


def _noise_like(x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    return randn_per_item(x.shape, generators, device=x.device, dtype=x.dtype)


# ---- samplers -----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn,
    x: Tensor,
    plan: SamplingPlan,
    *,
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) between the plan's levels, with the posterior variance
    beta-tilde (diffusers' DDPMScheduler, variance_type "fixed_small"); noise wherever the timestep > 0."""
    _check_generators(generators, x)
    for i in range(plan.steps):
        a_t, a_prev = plan.abar[i], plan.abar[i + 1]
        eps = eps_fn(x, _timestep(plan, i, x))
        beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
        alpha_t = a_t / a_prev  # the step's effective alpha and beta when levels are skipped
        beta_t = 1 - alpha_t
        x0 = (x - beta_prod_t**0.5 * eps) / a_t**0.5
        x_prev = (a_prev**0.5 * beta_t) / beta_prod_t * x0 + alpha_t**0.5 * beta_prod_prev / beta_prod_t * x
        if plan.timesteps[i] > 0:
            variance = torch.clamp(beta_prod_prev / beta_prod_t * beta_t, min=1e-20)
            x_prev = x_prev + variance**0.5 * _noise_like(eps, generators)
        x = _after_step(callback, i, x_prev)
    return x


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x: Tensor,
    plan: SamplingPlan,
    *,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12 with sigma from Eq. 16): deterministic at eta 0, DDPM-like at eta 1."""
    _check_generators(generators, x)
    for i in range(plan.steps):
        a_t, a_prev = plan.abar[i], plan.abar[i + 1]
        eps = eps_fn(x, _timestep(plan, i, x))
        beta_prod_t = 1 - a_t
        x0 = (x - beta_prod_t**0.5 * eps) / a_t**0.5
        std = eta * (((1 - a_prev) / beta_prod_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + torch.clamp(1 - a_prev - std**2, min=0) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + std * _noise_like(eps, generators)
        x = _after_step(callback, i, x_prev)
    return x


def _pndm_transfer(x: Tensor, a_t: Tensor, a_prev: Tensor, eps: Tensor) -> Tensor:
    """PNDM's transfer phi(x, eps, t -> t_prev) (Liu et al. 2022, Eq. 9): the DDIM eta-0 step, written
    as diffusers' `_get_prev_sample` writes it (same rounding)."""
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    denom = a_t * beta_prod_prev**0.5 + (a_t * beta_prod_t * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def _adams_bashforth(ets: list[Tensor]) -> Tensor:
    """Linear multistep combination of the last 1-4 eps (newest last), orders 1-4."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


@torch.no_grad()
def sample_plms(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, callback: StepCallback | None = None
) -> Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multistep) as diffusers' PNDMScheduler(skip_prk_steps=True),
    the scheduler of diffusers' StableDiffusionPipeline: the first step is a pseudo improved-Euler step
    (one extra model call at the next level, eps averaged), then Adams-Bashforth of order 2, 3, 4 on the
    stored eps (the extra call's eps is not stored). S steps cost S + 1 model calls (1 when S = 1)."""
    ets: list[Tensor] = []
    for i in range(plan.steps):
        a_t, a_prev = plan.abar[i], plan.abar[i + 1]
        eps = eps_fn(x, _timestep(plan, i, x))
        ets = [*ets[-3:], eps]
        if i == 0 and plan.steps > 1:
            eps_next = eps_fn(_pndm_transfer(x, a_t, a_prev, eps), _timestep(plan, 1, x))
            eps = (eps_next + eps) / 2
        else:
            eps = _adams_bashforth(ets)
        x = _after_step(callback, i, _pndm_transfer(x, a_t, a_prev, eps))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, callback: StepCallback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; diffusers' DPMSolverMultistepScheduler, midpoint form):
    multistep in x0-prediction, first order on the first step and on the last (final sigma 0, so the
    last step returns the x0 prediction: lower_order_final / final_sigmas_type "zero"). The update runs
    in fp32 and is cast back each step, as diffusers does."""
    alpha = 1 / (plan.sigmas**2 + 1) ** 0.5  # [S + 1] VP alpha_t and sigma_t from the VE sigmas
    sigma = plan.sigmas * alpha
    lam = torch.log(alpha) - torch.log(sigma)  # half log-SNR; +inf at the final level
    x0_prev: Tensor | None = None
    for i in range(plan.steps):
        eps = eps_fn(x, _timestep(plan, i, x))
        x0 = (x - sigma[i] * eps) / alpha[i]
        h = lam[i + 1] - lam[i]
        decay = alpha[i + 1] * (torch.exp(-h) - 1.0)
        x_next = (sigma[i + 1] / sigma[i]) * x.float() - decay * x0
        if x0_prev is not None and i < plan.steps - 1:  # second order: midpoint correction D1
            d1 = (1.0 / ((lam[i] - lam[i - 1]) / h)) * (x0 - x0_prev)
            x_next = x_next - 0.5 * decay * d1
        x0_prev = x0
        x = _after_step(callback, i, x_next.to(eps.dtype))
    return x


@torch.no_grad()
def sample_euler_ancestral(
    eps_fn: EpsFn,
    x: Tensor,
    plan: SamplingPlan,
    *,
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`; diffusers' EulerAncestralDiscreteScheduler):
    an Euler step of the probability-flow ODE down to sigma_down, then fresh noise of size sigma_up.
    Works in VE space x_ve = x_vp * sqrt(sigma^2 + 1) (diffusers' init_noise_sigma / scale_model_input)."""
    _check_generators(generators, x)
    s = plan.sigmas
    scale = (s**2 + 1) ** 0.5  # [S + 1] VP -> VE factors
    x = x * scale[0]
    for i in range(plan.steps):
        eps = eps_fn(x / scale[i], _timestep(plan, i, x))
        x_ve = x.float()
        x0 = x_ve - s[i] * eps
        sigma_up = (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5
        sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
        x_ve = x_ve + (x_ve - x0) / s[i] * (sigma_down - s[i])
        x = (x_ve + _noise_like(eps, generators) * sigma_up).to(eps.dtype)
        if callback is not None:
            out = callback(i, x / scale[i + 1])
            x = x if out is None else out * scale[i + 1]
    return x / scale[-1]


def sample(
    name: SamplerName,
    eps_fn: EpsFn,
    x: Tensor,
    plan: SamplingPlan,
    *,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run sampler `name` from x [N, C, H, W] (VP latent at plan level 0: randn for txt2img,
    `plan.noise(0, x0, noise)` for img2img) to the final level. `generators`: one per item, always
    (a wrong count is a ValueError even for deterministic samplers); `eta` is DDIM's only."""
    if plan.name != name:
        raise ValueError(f"plan was made for {plan.name!r}, not {name!r}")
    _check_generators(generators, x)
    if eta != 0.0 and name != "ddim":
        raise ValueError(f"eta applies to ddim only, got eta={eta} for {name!r}")
    if plan.steps == 0:
        return x
    if name == "ddpm":
        return sample_ddpm(eps_fn, x, plan, generators=generators, callback=callback)
    if name == "ddim":
        return sample_ddim(eps_fn, x, plan, generators=generators, eta=eta, callback=callback)
    if name == "plms":
        return sample_plms(eps_fn, x, plan, callback=callback)
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(eps_fn, x, plan, callback=callback)
    return sample_euler_ancestral(eps_fn, x, plan, generators=generators, callback=callback)
