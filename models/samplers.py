"""Samplers for discrete-time (VP) diffusion models: small pure functions over an epsilon predictor.

Every sampler takes and returns **VP-space latents** x = sqrt(abar) x0 + sqrt(1 - abar) eps, walks the
levels of a `SamplingPlan` (model timesteps [S], alpha-bar at S + 1 levels) and calls
`eps_fn(x [N, C, H, W], t [N] float)`. Classifier-free guidance, v -> eps conversion and concat
conditioning are wrappers around `eps_fn`, not sampler code. Each sampler is written once, as one step
(`init_state`, `model_input`, `step` over a `SamplerState`), so that a scheduler can interleave runs of
different samplers in one model call (models/step_batch.py); `sample_<name>` is the loop over its steps.

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
    #: what the model function returns and `step` takes: epsilon (a v-prediction model's v converted by the
    #: wrapper, models/guidance.py), or, on a zero-terminal-SNR schedule, the guided v itself, converted per step
    #: at the plan's own level (x0 = sqrt(abar) x - sqrt(1 - abar) v: at abar 0, epsilon = x carries no x0)
    model_output: Literal["epsilon", "v_prediction"] = "epsilon"

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

    def between(self, start: int, stop: int) -> "SamplingPlan":
        """Steps start..stop-1 of this plan, its levels start..stop: one model's share of a run that another model
        continues (SDXL base then refiner, diffusers' denoising_end / denoising_start). A part that ends above
        the final level keeps its last step's order (dpmpp_2m's first-order final step is for sigma 0 only)."""
        if not 0 <= start <= stop <= self.steps:
            raise ValueError(f"steps {start}..{stop} are not within this plan's 0..{self.steps}")
        return replace(self, timesteps=self.timesteps[start:stop], abar=self.abar[start:stop + 1],
                       sigmas=self.sigmas[start:stop + 1])

    def switch_index(self, fraction: float, num_train_timesteps: int) -> int:
        """Steps before a switch at `fraction` of the schedule (diffusers' denoising_end): those whose timestep
        is at or above round(T - fraction T)."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"a switch point must be within (0, 1), got {fraction}")
        cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
        return int((self.timesteps >= cutoff).sum())

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
    sigmas: np.ndarray = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return sigmas


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log sigma (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # [T, n]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    t: np.ndarray = (1 - w) * low + w * (low + 1)
    return t


def _sigma_grid(
    schedule: NoiseSchedule, steps: int, family: Literal["dpm", "euler"], karras: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [S], sigmas [S]) of DPMSolverMultistep / EulerAncestral, in float64 numpy."""
    ac = schedule.alphas_cumprod
    if schedule.config.rescale_betas_zero_snr:  # DPMSolverMultistep's: near 0, so that the first sigma is finite
        ac = torch.cat([ac[:-1], torch.tensor([2.0**-24])])
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
    zero_snr = schedule.config.rescale_betas_zero_snr
    if zero_snr and name not in _V_STEPS:
        raise ValueError(f"sampler {name!r} cannot sample a zero-terminal-SNR schedule (rescale_betas_zero_snr): it "
                         f"steps by epsilon, which at alpha-bar 0 carries no x0; use one of {sorted(_V_STEPS)}")
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
        name=name, timesteps=torch.from_numpy(ts.astype(np.float32)), abar=abar, sigmas=sigmas,
        model_output="v_prediction" if zero_snr else "epsilon",
    )


# ---- the step form ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SamplerState:
    """Where one sampler run stands between two model calls: what `step` needs to go on, nothing else.

    Every sampler is unrolled into `init_state` / `model_input` / `step`, so that a scheduler can interleave
    runs of different samplers, plans and lengths in one model call (models/step_batch.py); `sample_<name>`
    is the loop over this form. The state holds N items that share the plan (one per generator).

    x: [N, C, H, W] the sample at level `i`: the VP latent, except euler_a's VE latent x_vp sqrt(sigma_i^2 + 1)
        (read it with `latent`).
    i: sampler steps done (the run is over at i = plan.steps).
    ets: plms only, the last (up to 4) eps of the Adams-Bashforth history, oldest first.
    warmup_eps: plms only, step 0's eps while its second (improved-Euler) model call is pending.
    x0_prev: dpmpp_2m only, the previous step's denoised estimate.
    denoised: the latest x0 estimate [N, C, H, W] (None before the first step): what a preview shows.
    """

    plan: SamplingPlan
    x: Tensor
    generators: tuple[torch.Generator, ...] = ()
    eta: float = 0.0
    i: int = 0
    ets: tuple[Tensor, ...] = ()
    warmup_eps: Tensor | None = None
    x0_prev: Tensor | None = None
    denoised: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.i >= self.plan.steps


def init_state(
    plan: SamplingPlan, x: Tensor, *, generators: Sequence[torch.Generator] = (), eta: float = 0.0
) -> SamplerState:
    """The state before step 0, from x [N, C, H, W], the VP latent at plan level 0. `generators`: one per
    item, needed by the ancestral samplers (ddpm, euler_a, ddim with eta > 0) and checked whenever given."""
    if eta != 0.0 and plan.name != "ddim":
        raise ValueError(f"eta applies to ddim only, got eta={eta} for {plan.name!r}")
    if generators or plan.name in ("ddpm", "euler_a") or eta > 0:
        _check_generators(generators, x)
    if plan.name == "euler_a" and plan.steps > 0:
        x = x * _ve_scale(plan)[0]
    return SamplerState(plan=plan, x=x, generators=tuple(generators), eta=eta)


def model_input(state: SamplerState) -> tuple[Tensor, Tensor]:
    """(x [N, C, H, W] VP latent, t [N] float32) of the model call the next `step` needs."""
    plan, i = state.plan, state.i
    if state.done:
        raise ValueError(f"the run is over: all {plan.steps} steps are done")
    if state.warmup_eps is not None:  # plms step 0, second call: at the next level, from the DDIM guess
        guess = _pndm_transfer(state.x, plan.abar[0], plan.abar[1], state.warmup_eps)
        return guess, _timestep(plan, 1, state.x)
    if plan.name == "euler_a":
        return state.x / _ve_scale(plan)[i], _timestep(plan, i, state.x)
    return state.x, _timestep(plan, i, state.x)


def step(state: SamplerState, eps: Tensor) -> SamplerState:
    """Advance by one model call, given eps [N, C, H, W] at `model_input(state)` (v on a zero-terminal-SNR plan:
    `SamplingPlan.model_output`). Every call completes a sampler step (i + 1) except plms' first call of a run
    longer than one step."""
    if state.done:
        raise ValueError(f"the run is over: all {state.plan.steps} steps are done")
    if state.plan.model_output == "v_prediction":
        return _V_STEPS[state.plan.name](state, *_eps_x0_from_v(state, eps))
    return _STEPS[state.plan.name](state, eps)


def _eps_x0_from_v(state: SamplerState, v: Tensor) -> tuple[Tensor, Tensor]:
    """(eps, x0) of a v prediction at the state's level, as the matching diffusers scheduler converts it: VP
    alpha-bar for ddim (DDIMScheduler), alpha_t and sigma_t from the plan's sigma for dpmpp_2m
    (DPMSolverMultistepScheduler). No division: finite at alpha-bar 0."""
    plan, i, x = state.plan, state.i, state.x
    if plan.name == "dpmpp_2m":
        alpha = 1 / (plan.sigmas[i] ** 2 + 1) ** 0.5
        sigma = plan.sigmas[i] * alpha
    else:
        alpha, sigma = plan.abar[i] ** 0.5, (1 - plan.abar[i]) ** 0.5
    return alpha * v + sigma * x, alpha * x - sigma * v


def latent(state: SamplerState) -> Tensor:
    """The VP latent at the state's level [N, C, H, W]: after the last step, the sampler's output."""
    if state.plan.name == "euler_a" and state.plan.steps > 0:
        return state.x / _ve_scale(state.plan)[state.i]
    return state.x


def with_latent(state: SamplerState, x: Tensor) -> SamplerState:
    """The state with its sample replaced by the VP latent x (inpainting's blend between steps)."""
    if state.plan.name == "euler_a" and state.plan.steps > 0:
        x = x * _ve_scale(state.plan)[state.i]
    return replace(state, x=x)


def run_steps(eps_fn: EpsFn, state: SamplerState, callback: StepCallback | None = None) -> Tensor:
    """Run a state to the end (what every `sample_<name>` is): the final VP latent. The callback sees the
    VP latent after every step; a tensor it returns replaces it."""
    while not state.done:
        i = state.i
        state = step(state, eps_fn(*model_input(state)))
        if callback is not None and state.i > i:
            out = callback(i, latent(state))
            state = state if out is None else with_latent(state, out)
    return latent(state)


def _ve_scale(plan: SamplingPlan) -> Tensor:
    """[S + 1] VP -> VE factors sqrt(sigma^2 + 1) (euler_a works in VE space)."""
    return (plan.sigmas**2 + 1) ** 0.5


# ---- helpers ------------------------------------------------------------------------------------------


def _timestep(plan: SamplingPlan, i: int, x: Tensor) -> Tensor:
    """Model timestep of step i for every item: [N] float32 on x's device."""
    return plan.timesteps[i].repeat(x.shape[0]).to(x.device)


def _check_generators(generators: Sequence[torch.Generator], x: Tensor) -> None:
    if len(generators) != x.shape[0]:
        raise ValueError(
            f"need one generator per batch item: {x.shape[0]} items, {len(generators)} generators"
        )


def _noise_like(x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    return randn_per_item(x.shape, generators, device=x.device, dtype=x.dtype)


# ---- sampler steps ------------------------------------------------------------------------------------


def _step_ddpm(state: SamplerState, eps: Tensor) -> SamplerState:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) between the plan's levels, with the posterior variance
    beta-tilde (diffusers' DDPMScheduler, variance_type "fixed_small"); noise wherever the timestep > 0."""
    plan, i, x = state.plan, state.i, state.x
    a_t, a_prev = plan.abar[i], plan.abar[i + 1]
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    alpha_t = a_t / a_prev  # the step's effective alpha and beta when levels are skipped
    beta_t = 1 - alpha_t
    x0 = (x - beta_prod_t**0.5 * eps) / a_t**0.5
    x_prev = (a_prev**0.5 * beta_t) / beta_prod_t * x0 + alpha_t**0.5 * beta_prod_prev / beta_prod_t * x
    if plan.timesteps[i] > 0:
        variance = torch.clamp(beta_prod_prev / beta_prod_t * beta_t, min=1e-20)
        x_prev = x_prev + variance**0.5 * _noise_like(eps, state.generators)
    return replace(state, x=x_prev, i=i + 1, denoised=x0)


def _step_ddim(state: SamplerState, eps: Tensor, x0: Tensor | None = None) -> SamplerState:
    """DDIM (Song et al. 2021, Eq. 12 with sigma from Eq. 16): deterministic at eta 0, DDPM-like at eta 1.
    `x0`: the model's own (from v), else the one eps implies."""
    plan, i, x, eta = state.plan, state.i, state.x, state.eta
    a_t, a_prev = plan.abar[i], plan.abar[i + 1]
    beta_prod_t = 1 - a_t
    if x0 is None:
        x0 = (x - beta_prod_t**0.5 * eps) / a_t**0.5
    std = eta * (((1 - a_prev) / beta_prod_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev**0.5 * x0 + torch.clamp(1 - a_prev - std**2, min=0) ** 0.5 * eps
    if eta > 0:
        x_prev = x_prev + std * _noise_like(eps, state.generators)
    return replace(state, x=x_prev, i=i + 1, denoised=x0)


def _pndm_transfer(x: Tensor, a_t: Tensor, a_prev: Tensor, eps: Tensor) -> Tensor:
    """PNDM's transfer phi(x, eps, t -> t_prev) (Liu et al. 2022, Eq. 9): the DDIM eta-0 step, written
    as diffusers' `_get_prev_sample` writes it (same rounding)."""
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    denom = a_t * beta_prod_prev**0.5 + (a_t * beta_prod_t * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def _adams_bashforth(ets: Sequence[Tensor]) -> Tensor:
    """Linear multistep combination of the last 1-4 eps (newest last), orders 1-4."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


def _step_plms(state: SamplerState, eps: Tensor) -> SamplerState:
    """PLMS (Liu et al. 2022) as diffusers' PNDMScheduler(skip_prk_steps=True): step 0 is a pseudo
    improved-Euler step (a second call at the next level, eps averaged; that eps is not stored), then
    Adams-Bashforth of order 2, 3, 4 on the stored eps."""
    plan, i, x = state.plan, state.i, state.x
    a_t, a_prev = plan.abar[i], plan.abar[i + 1]
    if state.warmup_eps is not None:  # step 0's second call: eps is at the next level
        mean = (eps + state.warmup_eps) / 2
        return replace(state, x=_pndm_transfer(x, a_t, a_prev, mean), i=1, warmup_eps=None)
    ets = (*state.ets[-3:], eps)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # for previews only
    if i == 0 and plan.steps > 1:
        return replace(state, ets=ets, warmup_eps=eps, denoised=x0)
    x_prev = _pndm_transfer(x, a_t, a_prev, _adams_bashforth(ets))
    return replace(state, x=x_prev, i=i + 1, ets=ets, denoised=x0)


def _step_dpmpp_2m(state: SamplerState, eps: Tensor, x0: Tensor | None = None) -> SamplerState:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; diffusers' DPMSolverMultistepScheduler, midpoint form):
    multistep in x0-prediction, first order on the first step and on the last (final sigma 0, so the
    last step returns the x0 prediction: lower_order_final / final_sigmas_type "zero"). The update runs
    in fp32 and is cast back each step, as diffusers does."""
    plan, i, x = state.plan, state.i, state.x
    alpha = 1 / (plan.sigmas**2 + 1) ** 0.5  # [S + 1] VP alpha_t and sigma_t from the VE sigmas
    sigma = plan.sigmas * alpha
    lam = torch.log(alpha) - torch.log(sigma)  # half log-SNR; +inf at the final level
    if x0 is None:  # else the model's own (from v)
        x0 = (x - sigma[i] * eps) / alpha[i]
    h = lam[i + 1] - lam[i]
    decay = alpha[i + 1] * (torch.exp(-h) - 1.0)
    x_next = (sigma[i + 1] / sigma[i]) * x.float() - decay * x0
    if state.x0_prev is not None and float(plan.sigmas[i + 1]) > 0:  # second order but onto sigma 0: midpoint D1
        d1 = (1.0 / ((lam[i] - lam[i - 1]) / h)) * (x0 - state.x0_prev)
        x_next = x_next - 0.5 * decay * d1
    return replace(state, x=x_next.to(eps.dtype), i=i + 1, x0_prev=x0, denoised=x0)


def _step_euler_ancestral(state: SamplerState, eps: Tensor) -> SamplerState:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`; diffusers' EulerAncestralDiscreteScheduler):
    an Euler step of the probability-flow ODE down to sigma_down, then fresh noise of size sigma_up.
    Works in VE space x_ve = x_vp * sqrt(sigma^2 + 1) (diffusers' init_noise_sigma / scale_model_input)."""
    s, i = state.plan.sigmas, state.i
    x_ve = state.x.float()
    x0 = x_ve - s[i] * eps
    sigma_up = (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5
    sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
    x_ve = x_ve + (x_ve - x0) / s[i] * (sigma_down - s[i])
    x = (x_ve + _noise_like(eps, state.generators) * sigma_up).to(eps.dtype)
    return replace(state, x=x, i=i + 1, denoised=x0)


_STEPS: dict[SamplerName, Callable[[SamplerState, Tensor], SamplerState]] = {
    "ddpm": _step_ddpm, "ddim": _step_ddim, "plms": _step_plms, "dpmpp_2m": _step_dpmpp_2m,
    "euler_a": _step_euler_ancestral,
}
#: the samplers that can step from the model's own x0 (`step` on a plan whose model_output is v)
_V_STEPS: dict[SamplerName, Callable[[SamplerState, Tensor, Tensor], SamplerState]] = {
    "ddim": _step_ddim, "dpmpp_2m": _step_dpmpp_2m,
}


# ---- samplers: loops over the step form ----------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, Alg. 2) over the plan's levels (`_step_ddpm`)."""
    return run_steps(eps_fn, init_state(plan, x, generators=generators), callback)


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, generators: Sequence[torch.Generator],
    eta: float = 0.0, callback: StepCallback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021), deterministic at eta 0 (`_step_ddim`)."""
    return run_steps(eps_fn, init_state(plan, x, generators=generators, eta=eta), callback)


@torch.no_grad()
def sample_plms(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, callback: StepCallback | None = None
) -> Tensor:
    """PLMS (Liu et al. 2022) as diffusers' PNDMScheduler(skip_prk_steps=True) (`_step_plms`).
    S steps cost S + 1 model calls (1 when S = 1)."""
    return run_steps(eps_fn, init_state(plan, x), callback)


@torch.no_grad()
def sample_dpmpp_2m(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, callback: StepCallback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep in x0-prediction (`_step_dpmpp_2m`)."""
    return run_steps(eps_fn, init_state(plan, x), callback)


@torch.no_grad()
def sample_euler_ancestral(
    eps_fn: EpsFn, x: Tensor, plan: SamplingPlan, *, generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`) in VE space (`_step_euler_ancestral`)."""
    return run_steps(eps_fn, init_state(plan, x, generators=generators), callback)


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
    with torch.no_grad():
        return run_steps(eps_fn, init_state(plan, x, generators=generators, eta=eta), callback)
