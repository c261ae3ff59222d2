"""Samplers against diffusers' schedulers (SD v1 config) on an analytic, nonlinear eps function: same
initial noise, same per-item generators, same timesteps; plus properties no reference is needed for
(every step count works, a perfect denoiser recovers x0, batches equal single runs)."""

import inspect
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from models.diffusion import NoiseSchedule, ScheduleConfig
from models.noise import generators_from_seeds
from models.samplers import (
    SamplerName,
    SamplingPlan,
    sample,
    sample_euler_ancestral,
    sampling_plan,
)

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
NAMES: tuple[SamplerName, ...] = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler_a")
SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())
SHAPE = (3, 4, 8, 8)
SEEDS = (11, 22, 33)


def _scheduler(name: SamplerName, karras: bool = False, **overrides: object):  # type: ignore[no-untyped-def]
    import diffusers

    cls = {
        "ddpm": diffusers.DDPMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "plms": diffusers.PNDMScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    }[name]
    config = {**SD_CONFIG, **overrides}
    if name == "dpmpp_2m":
        config["use_karras_sigmas"] = karras
    # only the keys the scheduler takes, as a pipeline's from_config(other_scheduler.config) keeps them
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in params})


class EpsFn:
    """eps(x, t) = tanh(w(t) x) + c(t): nonlinear in x, smooth in t; records the timesteps it sees."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        self.calls.append(t[0].item())
        t = t.reshape(-1, 1, 1, 1)
        return torch.tanh(x * (0.5 + t / 1000)) + 0.1 * torch.sin(t / 97.0)


def _init(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g).clamp(-2, 2)  # noise, "x0"


def run_diffusers(
    scheduler,  # type: ignore[no-untyped-def]
    steps: int,
    eps_fn: EpsFn,
    noise: Tensor,
    generators: Sequence[torch.Generator],
    *,
    eta: float | None = None,
    strength: float | None = None,
    x0: Tensor | None = None,
) -> Tensor:
    """diffusers' StableDiffusion(Img2Img)Pipeline denoising loop, model replaced by eps_fn."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if strength is None:
        latents = noise * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    step_params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, object] = {"generator": list(generators)} if "generator" in step_params else {}
    if eta is not None:
        kwargs["eta"] = eta
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = eps_fn(model_input, t.float().repeat(noise.shape[0]))
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
    return latents


def run_ours(
    name: SamplerName,
    steps: int,
    eps_fn: EpsFn,
    noise: Tensor,
    generators: Sequence[torch.Generator],
    *,
    karras: bool = False,
    eta: float = 0.0,
    strength: float | None = None,
    x0: Tensor | None = None,
) -> Tensor:
    plan = sampling_plan(name, SCHEDULE, steps, karras=karras)
    x = noise
    if strength is not None:
        assert x0 is not None
        plan = plan.from_strength(strength)
        x = plan.noise(0, x0, noise)
    return sample(name, eps_fn, x, plan, generators=generators, eta=eta)


PARITY = [
    ("ddim", False, 0.0),
    ("ddim", False, 1.0),
    ("plms", False, 0.0),
    ("dpmpp_2m", False, 0.0),
    ("dpmpp_2m", True, 0.0),
    ("euler_a", False, 0.0),
    ("ddpm", False, 0.0),
]


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize(("name", "karras", "eta"), PARITY)
def test_txt2img_matches_diffusers(name: SamplerName, karras: bool, eta: float, steps: int) -> None:
    noise, _ = _init()
    ours_fn, theirs_fn = EpsFn(), EpsFn()
    ours = run_ours(name, steps, ours_fn, noise, generators_from_seeds(SEEDS), karras=karras, eta=eta)
    scheduler, their_eta = _scheduler(name, karras), (eta if name == "ddim" else None)
    theirs = run_diffusers(scheduler, steps, theirs_fn, noise, generators_from_seeds(SEEDS), eta=their_eta)
    assert ours_fn.calls == theirs_fn.calls  # the same model timesteps, in order (PLMS: S + 1 calls)
    assert (ours - theirs).abs().max().item() <= 1e-5


# PLMS only at strength 1.0: diffusers' PNDM img2img misaligns levels below that (test_plms_img2img_levels)
IMG2IMG = [(*p, s) for p in PARITY for s in (0.3, 1.0) if p[0] != "plms" or s == 1.0]


@pytest.mark.parametrize(("name", "karras", "eta", "strength"), IMG2IMG)
def test_img2img_matches_diffusers(name: SamplerName, karras: bool, eta: float, strength: float) -> None:
    noise, x0 = _init(1)
    ours_fn, theirs_fn = EpsFn(), EpsFn()
    gens, their_gens = generators_from_seeds(SEEDS), generators_from_seeds(SEEDS)
    ours = run_ours(name, 10, ours_fn, noise, gens, karras=karras, eta=eta, strength=strength, x0=x0)
    their_eta = eta if name == "ddim" else None
    scheduler = _scheduler(name, karras)
    theirs = run_diffusers(
        scheduler, 10, theirs_fn, noise, their_gens, eta=their_eta, strength=strength, x0=x0
    )
    assert ours_fn.calls == theirs_fn.calls
    assert len(set(ours_fn.calls)) == int(10 * strength)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_plms_img2img_levels() -> None:
    """Ours: PLMS on the kept DDIM levels. diffusers slices PNDM's S + 1 entry list, noising at 301."""
    plan = sampling_plan("plms", SCHEDULE, 10).from_strength(0.3)
    assert plan.timesteps.tolist() == [201, 101, 1]
    eps_fn = EpsFn()
    noise, x0 = _init(2)
    out = sample("plms", eps_fn, plan.noise(0, x0, noise), plan, generators=generators_from_seeds(SEEDS))
    assert eps_fn.calls == [201, 101, 101, 1] and out.isfinite().all()
    pndm = _scheduler("plms")
    pndm.set_timesteps(10)
    assert pndm.timesteps[10 - 3 :].tolist() == [301, 201, 101, 1]  # what diffusers' img2img would run


def _diffusers_timesteps(name: SamplerName, steps: int, karras: bool = False, **overrides: object) -> Tensor:
    scheduler = _scheduler(name, karras, **overrides)
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.float()
    return torch.unique_consecutive(ts) if name == "plms" else ts  # PNDM repeats t_1 for its warm-up


@pytest.mark.parametrize("name", NAMES)
def test_timesteps_match_diffusers_for_every_step_count(name: SamplerName) -> None:
    """Every S in 1..1000, except where diffusers leaves [0, 999] (documented in models/samplers.py)."""
    broken = {1000} | ({999} if name == "dpmpp_2m" else set())
    for steps in range(1, 1001):
        plan = sampling_plan(name, SCHEDULE, steps)
        if steps not in broken:
            assert torch.equal(plan.timesteps, _diffusers_timesteps(name, steps)), steps
        else:
            theirs = _diffusers_timesteps(name, steps)
            assert theirs.max() >= 1000 or len(set(theirs.tolist())) < steps
    assert sampling_plan(name, SCHEDULE, 1000).timesteps.tolist() == list(range(999, -1, -1))
    if name == "dpmpp_2m":
        assert sampling_plan(name, SCHEDULE, 999).timesteps.tolist() == list(range(999, 0, -1))


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_other_spacings_match_diffusers(name: SamplerName, spacing: str) -> None:
    """diffusers' "trailing" returns S + 1 timesteps ending at -1 for some S (float arange): we keep S."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(timestep_spacing=spacing))  # type: ignore[arg-type]
    for steps in [*range(1, 80), 103, 121, 122, 201, 250, 333, 500, 999]:
        assert torch.equal(
            sampling_plan(name, schedule, steps).timesteps,
            _diffusers_timesteps(name, steps, timestep_spacing=spacing)[:steps],
        ), steps


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a"])
def test_sigmas_match_diffusers(name: SamplerName) -> None:
    cases = [(s, False) for s in (1, 2, 7, 10, 25, 50, 998)]
    cases += [(s, True) for s in (1, 2, 10, 25)] if name == "dpmpp_2m" else []
    for steps, karras in cases:
        scheduler = _scheduler(name, karras)
        scheduler.set_timesteps(steps)
        plan = sampling_plan(name, SCHEDULE, steps, karras=karras)
        assert torch.equal(plan.sigmas, scheduler.sigmas), (steps, karras)
        assert torch.equal(plan.timesteps, scheduler.timesteps.float()), (steps, karras)


def test_karras_timesteps_match_diffusers() -> None:
    for steps in [*range(1, 31), 50, 100, 250, 1000]:
        assert torch.equal(
            sampling_plan("dpmpp_2m", SCHEDULE, steps, karras=True).timesteps,
            _diffusers_timesteps("dpmpp_2m", steps, karras=True),
        ), steps


def _check_plan(plan: SamplingPlan, steps: int, karras: bool = False) -> None:
    ts, abar = plan.timesteps, plan.abar
    assert ts.shape == (steps,) and abar.shape == plan.sigmas.shape == (steps + 1,)
    assert ts.min() >= 0 and ts.max() <= 999 and (ts == ts.round()).all()
    assert (ts[1:] <= ts[:-1]).all() if karras else (ts[1:] < ts[:-1]).all()
    assert abar.isfinite().all() and (abar > 0).all() and (abar <= 1).all() and (abar[1:] >= abar[:-1]).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_step_count_gives_a_valid_plan(name: SamplerName) -> None:
    for steps in range(1, 1001):
        _check_plan(sampling_plan(name, SCHEDULE, steps), steps)
    for steps in (1, 2, 3, 9, 27, 81, 243, 729, 999, 1000):
        if name == "dpmpp_2m":
            _check_plan(sampling_plan(name, SCHEDULE, steps, karras=True), steps, karras=True)
        for strength in (1.0, 0.5, 0.01):
            if (kept := int(steps * strength)) >= 1:
                _check_plan(sampling_plan(name, SCHEDULE, steps).from_strength(strength), kept)


def _perfect_eps_fn(plan: SamplingPlan, x0: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """A denoiser that knows x0 and the sampler's level at each timestep: returns the exact noise in x."""

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        (index,) = (plan.timesteps == t[0]).nonzero()[0].tolist()
        abar = plan.abar[index]
        return (x - abar**0.5 * x0) / (1 - abar) ** 0.5

    return eps_fn


# (Karras only to S = 27: at large S rounded Karras timesteps repeat, so a timestep no longer names a level)
PERFECT = [(n, False, s) for n in ("ddim", "plms", "dpmpp_2m") for s in (1, 2, 3, 9, 27, 999, 1000)]
PERFECT += [("dpmpp_2m", True, s) for s in (1, 2, 3, 9, 27)]


@pytest.mark.parametrize(("name", "karras", "steps"), PERFECT)
def test_perfect_denoiser_recovers_x0(name: SamplerName, karras: bool, steps: int) -> None:
    """Deterministic samplers stay on the ray sqrt(abar) x0 + sqrt(1 - abar) n: the result is x0 at the
    final level (alphas_cumprod[0] for ddim/plms, as SD's set_alpha_to_one=False; exactly x0 for DPM)."""
    noise, x0 = _init(3)
    noise, x0 = noise[:1, :1], x0[:1, :1]
    plan = sampling_plan(name, SCHEDULE, steps, karras=karras)
    x = plan.noise(0, x0, noise)
    out = sample(name, _perfect_eps_fn(plan, x0), x, plan, generators=generators_from_seeds([0]))
    torch.testing.assert_close(out, plan.noise(steps, x0, noise), atol=1e-4, rtol=0)
    if name == "dpmpp_2m":
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [1, 3, 9, 27, 999, 1000])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_step_counts_sample(name: SamplerName, steps: int) -> None:
    noise, _ = _init(4)
    noise = noise[:1, :1, :4, :4]
    eps_fn = EpsFn()
    plan = sampling_plan(name, SCHEDULE, steps)
    out = sample(name, eps_fn, noise, plan, generators=generators_from_seeds([5]))
    assert out.shape == noise.shape and out.isfinite().all()
    assert len(eps_fn.calls) == steps + (1 if name == "plms" and steps > 1 else 0)


@pytest.mark.parametrize(("name", "eta"), [("ddpm", 0.0), ("ddim", 1.0), ("euler_a", 0.0), ("dpmpp_2m", 0.0)])
def test_batch_equals_single_runs(name: SamplerName, eta: float) -> None:
    noise, _ = _init(5)
    seeds = (7, 8, 9, 10)
    noise = torch.cat([noise, noise[:1] * 0.5])  # 4 items
    plan = sampling_plan(name, SCHEDULE, 12)
    batch = sample(name, EpsFn(), noise, plan, generators=generators_from_seeds(seeds), eta=eta)
    for i, seed in enumerate(seeds):
        gens = generators_from_seeds([seed])
        single = sample(name, EpsFn(), noise[i : i + 1], plan, generators=gens, eta=eta)
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-6, rtol=0)


def test_ancestral_noise_depends_on_the_generators() -> None:
    noise, _ = _init(6)
    plan = sampling_plan("euler_a", SCHEDULE, 8)
    a = sample("euler_a", EpsFn(), noise, plan, generators=generators_from_seeds([1, 2, 3]))
    b = sample("euler_a", EpsFn(), noise, plan, generators=generators_from_seeds([1, 2, 4]))
    assert torch.equal(a[:2], b[:2]) and not torch.equal(a[2], b[2])


def test_wrong_generator_count_raises() -> None:
    noise, _ = _init(7)
    for name in NAMES:
        plan = sampling_plan(name, SCHEDULE, 5)
        with pytest.raises(ValueError, match="one generator per batch item"):
            sample(name, EpsFn(), noise, plan, generators=generators_from_seeds([1, 2]))
    with pytest.raises(ValueError, match="one generator per batch item"):
        sample_euler_ancestral(EpsFn(), noise, sampling_plan("euler_a", SCHEDULE, 5), generators=[])


def test_bad_arguments_raise() -> None:
    noise, _ = _init(8)
    gens = generators_from_seeds(SEEDS)
    with pytest.raises(ValueError):
        sampling_plan("ddim", SCHEDULE, 0)
    with pytest.raises(ValueError):
        sampling_plan("ddim", SCHEDULE, 1001)
    with pytest.raises(ValueError):
        sampling_plan("euler_a", SCHEDULE, 10, karras=True)
    with pytest.raises(ValueError):
        sampling_plan("heun", SCHEDULE, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sample("plms", EpsFn(), noise, sampling_plan("ddim", SCHEDULE, 5), generators=gens)
    with pytest.raises(ValueError):
        sample("plms", EpsFn(), noise, sampling_plan("plms", SCHEDULE, 5), generators=gens, eta=0.5)
    with pytest.raises(ValueError):
        sampling_plan("ddim", SCHEDULE, 10).from_strength(1.5)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_strength_gives_an_empty_plan_that_returns_its_input(name: SamplerName) -> None:
    plan = sampling_plan(name, SCHEDULE, 10).from_strength(0.05)  # int(0.5) = 0 steps kept
    assert plan.steps == 0 and plan.abar.shape == (1,)
    noise, _ = _init(10)
    eps_fn = EpsFn()
    assert sample(name, eps_fn, noise, plan, generators=generators_from_seeds(SEEDS)) is noise
    assert eps_fn.calls == []


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_level_and_can_replace_x(name: SamplerName) -> None:
    noise, _ = _init(9)
    plan = sampling_plan(name, SCHEDULE, 6)
    seen: list[tuple[int, Tensor]] = []

    def record(i: int, x: Tensor) -> None:
        seen.append((i, x.clone()))

    out = sample(name, EpsFn(), noise, plan, generators=generators_from_seeds(SEEDS), callback=record)
    assert [i for i, _ in seen] == list(range(6)) and torch.equal(seen[-1][1], out)
    # a VP latent: the latent after step 0 has about the std of level 1 (x0 is O(1) here, noise dominates)
    assert 0.5 < seen[0][1].std().item() < 2.0

    def zero_last(i: int, x: Tensor) -> Tensor | None:
        return torch.zeros_like(x) if i == 5 else None

    out = sample(name, EpsFn(), noise, plan, generators=generators_from_seeds(SEEDS), callback=zero_last)
    assert torch.equal(out, torch.zeros_like(out))
    plain = sample(name, EpsFn(), noise, plan, generators=generators_from_seeds(SEEDS))
    gens = generators_from_seeds(SEEDS)
    again = sample(name, EpsFn(), noise, plan, generators=gens, callback=lambda i, x: None)
    assert torch.equal(plain, again)


def test_cosine_schedule_plans_match_diffusers() -> None:
    """squaredcos_cap_v2: DPM's Karras timesteps are not rounded there (diffusers truncates them to int)."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(beta_schedule="cosine"))
    for karras in (False, True):
        scheduler = _scheduler("dpmpp_2m", karras, beta_schedule="squaredcos_cap_v2")
        for steps in (1, 2, 10, 20, 50, 500):
            scheduler.set_timesteps(steps)
            plan = sampling_plan("dpmpp_2m", schedule, steps, karras=karras)
            assert torch.equal(plan.timesteps, scheduler.timesteps.float()), (karras, steps)
            assert torch.equal(plan.sigmas, scheduler.sigmas), (karras, steps)
    for name in NAMES:
        for steps in (1, 10, 999, 1000):
            _check_plan(sampling_plan(name, schedule, steps), steps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_latents_keep_their_dtype(name: SamplerName, dtype: torch.dtype) -> None:
    noise = _init(11)[0][:2].to(dtype)
    plan = sampling_plan(name, SCHEDULE, 6)
    out = sample(name, lambda x, t: torch.tanh(x), noise, plan, generators=generators_from_seeds([1, 2]))
    assert out.dtype == dtype and out.isfinite().all()
    assert plan.from_strength(0.5).noise(0, noise, noise).dtype == dtype
