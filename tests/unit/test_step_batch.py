"""The step scheduler on an analytic denoiser: samples with different samplers, step counts, guidance scales and
seeds join a running batch at step boundaries and leave when their plan ends, and each one's final latent is the
one its solo run gives, bit for bit; a cancelled sample leaves at the next step; incompatible samples are refused.

The denoiser is built from +, -, *, / and `where` only (IEEE-exact, so one row's result cannot depend on the other
rows): what is tested is the scheduler's bookkeeping (states, plans, generators, rows). The same property on a
real UNet is tests/integration/test_continuous_batching.py.
"""

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from models.diffusion import NoiseSchedule, ScheduleConfig
from models.guidance import Conditioning
from models.noise import generators_from_seeds, randn_per_item
from models.samplers import SamplerName, init_state, model_input, run_steps, sample, sampling_plan, step
from models.step_batch import StepBatch, StepSample

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())
NAMES: tuple[SamplerName, ...] = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler_a")
SHAPE = (1, 4, 8, 8)


def eps_rows(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
    """A nonlinear eps of x [N, C, H, W], t [N] and a per-row condition context [N, 1, 1]."""
    t4, c4 = t.view(-1, 1, 1, 1), context.view(-1, 1, 1, 1)
    return x * (0.5 + t4 / 1000) / (1 + x * x) + c4 * (1 - t4 / 2000)


class Denoiser:
    """Guided analytic eps, recording the number of rows of every call."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scales: Tensor) -> Tensor:
        assert cond.context is not None and uncond.context is not None
        self.rows.append(x.shape[0])
        e_c, e_u = eps_rows(x, t, cond.context), eps_rows(x, t, uncond.context)
        s = scales.view(-1, 1, 1, 1)
        return torch.where(s == 1, e_c, e_u + s * (e_c - e_u))


def make(key: str, name: SamplerName, steps: int, seed: int, scale: float = 3.0, eta: float = 0.0) -> StepSample:
    """A sample whose condition is its seed / 10 (so `solo` can draw its noise again)."""
    generators = generators_from_seeds([seed])
    x = randn_per_item(SHAPE, generators)
    state = init_state(sampling_plan(name, SCHEDULE, steps), x, generators=generators, eta=eta)
    cond = Conditioning(context=torch.full((1, 1, 1), seed / 10))
    return StepSample(key, state, cond, Conditioning(context=torch.zeros(1, 1, 1)), scale)


def solo(s: StepSample) -> Tensor:
    """The sample run alone with the sampler loop (`sample`), from a fresh generator of the same seed."""
    denoise = Denoiser()
    scales = torch.tensor([s.guidance_scale])

    def eps(x: Tensor, t: Tensor) -> Tensor:
        return denoise(x, t, s.cond, s.uncond, scales)

    assert s.cond.context is not None
    generators = generators_from_seeds([round(float(s.cond.context.flatten()[0]) * 10)])
    x = randn_per_item(SHAPE, generators)
    return sample(s.state.plan.name, eps, x, s.state.plan, generators=generators, eta=s.state.eta)


def run_with_arrivals(batch: StepBatch, arrivals: dict[int, list[StepSample]]) -> dict[str, Tensor]:
    """Step until empty, admitting `arrivals[k]` before iteration k; the final latents by key."""
    final: dict[str, Tensor] = {}
    iteration = 0
    while len(batch) or any(k >= iteration for k in arrivals):
        for s in arrivals.get(iteration, []):
            batch.admit(s)
        final |= {str(s.key): s.latent for s in batch.step() if s.state.done}
        iteration += 1
    return final


def test_samples_joining_and_leaving_at_step_boundaries_equal_their_solo_runs() -> None:
    arrivals = {
        0: [make("a", "dpmpp_2m", 5, 1), make("b", "plms", 3, 2, scale=1.0)],
        1: [make("c", "euler_a", 8, 3), make("d", "ddim", 1, 4, eta=1.0)],
        3: [make("e", "ddpm", 4, 5, scale=7.5), make("f", "plms", 1, 6)],
        9: [make("g", "ddim", 2, 7)],  # joins a batch that had emptied
    }
    denoise = Denoiser()
    final = run_with_arrivals(StepBatch(denoise, max_items=8), arrivals)
    for s in (s for group in arrivals.values() for s in group):
        assert torch.equal(final[str(s.key)], solo(s)), s.key
    # model calls (plms: steps + 1 when steps > 1): a 5 and b 4 from call 0; c 8 and d 1 from call 1;
    # e 4 and f 1 from call 3; g 2 from call 9, after c left at call 8
    assert denoise.rows == [2, 4, 3, 5, 3, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("name", NAMES)
def test_a_sample_joining_mid_run_equals_its_solo_run(name: SamplerName) -> None:
    early = [make(f"early{i}", n, 6, 10 + i) for i, n in enumerate(NAMES)]
    late = make("late", name, 4, 99, eta=1.0 if name == "ddim" else 0.0)
    final = run_with_arrivals(StepBatch(Denoiser(), max_items=8), {0: early, 2: [late]})
    assert torch.equal(final["late"], solo(late))
    assert all(torch.equal(final[str(s.key)], solo(s)) for s in early)


def test_cancel_frees_the_slot_at_the_next_step() -> None:
    denoise = Denoiser()
    batch = StepBatch(denoise, max_items=2)
    keep, drop = make("keep", "euler_a", 5, 1), make("drop", "dpmpp_2m", 5, 2)
    batch.admit(keep)
    batch.admit(drop)
    batch.step()
    assert batch.refusal(make("new", "ddim", 3, 3)) == "the batch is full (2 samples)"
    assert batch.cancel("drop") and not batch.cancel("drop")
    newcomer = make("new", "ddim", 3, 3)
    batch.admit(newcomer)
    final = run_with_arrivals(batch, {})
    assert denoise.rows == [2, 2, 2, 2, 1]
    assert set(final) == {"keep", "new"}
    assert torch.equal(final["keep"], solo(keep)) and torch.equal(final["new"], solo(newcomer))


def test_only_completed_steps_are_reported() -> None:
    """plms' warm-up call completes no step; a finished sample is reported once, then gone."""
    batch = StepBatch(Denoiser(), max_items=4)
    batch.admit(make("p", "plms", 2, 1))
    batch.admit(make("d", "ddim", 1, 2))
    first = batch.step()
    assert [(s.key, s.state.i, s.state.done) for s in first] == [("d", 1, True)]
    assert [s.key for s in batch] == ["p"]
    assert [(s.key, s.state.i) for s in batch.step()] == [("p", 1)]
    assert [(s.key, s.state.done) for s in batch.step()] == [("p", True)]
    assert len(batch) == 0 and batch.step() == []


def test_refusals_name_the_reason() -> None:
    batch = StepBatch(Denoiser(), max_items=3)
    batch.admit(make("a", "ddim", 3, 1))
    assert "already running" in str(batch.refusal(make("a", "ddim", 3, 1)))
    other = make("big", "ddim", 3, 2)
    bigger = replace(other, state=replace(other.state, x=torch.zeros(1, 4, 16, 8)))
    assert "does not fit this batch" in str(batch.refusal(bigger))
    no_context = replace(make("c", "ddim", 3, 3), cond=Conditioning(), uncond=Conditioning())
    assert "does not fit this batch" in str(batch.refusal(no_context))
    finished = make("done", "ddim", 1, 4)
    finished = replace(finished, state=step(finished.state, torch.zeros(SHAPE)))
    assert "no step left" in str(batch.refusal(finished))
    with pytest.raises(ValueError, match="does not fit"):
        batch.admit(bigger)
    with pytest.raises(ValueError, match="one image"):
        StepSample("two", init_state(sampling_plan("ddim", SCHEDULE, 3), torch.zeros(2, 4, 8, 8)),
                   Conditioning(), Conditioning())


@pytest.mark.parametrize("name", NAMES)
def test_step_form_state_history(name: SamplerName) -> None:
    """The state carries what a multistep method needs, and a denoised estimate from the first step on."""
    s = make("x", name, 5, 1).state
    calls = 0
    while not s.done:
        x, t = model_input(s)
        s = step(s, eps_rows(x, t, torch.zeros(1, 1, 1)))
        calls += 1
        assert s.denoised is not None and s.denoised.shape == SHAPE
    assert calls == (6 if name == "plms" else 5)
    if name == "plms":
        assert len(s.ets) == 4 and s.warmup_eps is None
    if name == "dpmpp_2m":
        assert s.x0_prev is not None
    with pytest.raises(ValueError, match="run is over"):
        step(s, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="run is over"):
        model_input(s)


def test_run_steps_is_the_sampler_loop() -> None:
    s = make("x", "dpmpp_2m", 4, 3, scale=1.0)
    assert torch.equal(run_steps(lambda x, t: eps_rows(x, t, s.cond.context), s.state), solo(s))  # type: ignore[arg-type]


def test_a_step_in_chunks_of_rows_equals_one_call() -> None:
    """`step(max_rows=k)`: the running samples in consecutive calls of at most k rows (the worker's out-of-memory
    split), each sample's final latent as in one call."""
    samples = [make(f"s{i}", name, 4, 20 + i) for i, name in enumerate(NAMES)]
    denoise = Denoiser()
    batch = StepBatch(denoise, max_items=8)
    for s in samples:
        batch.admit(s)
    final: dict[str, Tensor] = {}
    while len(batch):
        final |= {str(s.key): s.latent for s in batch.step(max_rows=2) if s.state.done}
    assert all(torch.equal(final[str(s.key)], solo(s)) for s in samples)
    assert denoise.rows[:3] == [2, 2, 1] and max(denoise.rows) == 2
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        batch.step(max_rows=0)


def test_a_failed_step_leaves_every_sample_as_it_was() -> None:
    """A fault in the second chunk's denoiser call, or in a sampler update after an ancestral sample drew its noise,
    changes nothing: the step is retried and every image is its solo run's (generators rewound included)."""
    faults = {"call": 1, "update": 1}

    class Flaky(Denoiser):
        def __call__(self, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scales: Tensor) -> Tensor:
            if len(self.rows) == 1 and faults["call"]:  # the second call of the first step
                faults["call"] = 0
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return super().__call__(x, t, cond, uncond, scales)

    def fails_once(i: int, x: Tensor) -> None:
        if i == 1 and faults["update"]:
            faults["update"] = 0
            raise RuntimeError("a fault in the update")

    samples = [make("a", "euler_a", 4, 31), make("b", "ddpm", 4, 32)]
    samples.append(replace(make("c", "dpmpp_2m", 4, 33), after_step=fails_once))  # after a and b drew noise
    batch = StepBatch(Flaky(), max_items=8)
    for s in samples:
        batch.admit(s)
    final: dict[str, Tensor] = {}
    failures = 0
    while len(batch):
        before = {s.key: (s.state.i, s.state.x.clone()) for s in batch}
        try:
            final |= {str(s.key): s.latent for s in batch.step(max_rows=2) if s.state.done}
        except (torch.cuda.OutOfMemoryError, RuntimeError):
            failures += 1
            assert all(s.state.i == before[s.key][0] and torch.equal(s.state.x, before[s.key][1]) for s in batch)
    assert failures == 2
    assert all(torch.equal(final[str(s.key)], solo(replace(s, after_step=None))) for s in samples)
