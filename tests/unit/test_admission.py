"""The continuous worker's admission policy as pure functions (service/worker/admission.py): the order waiting jobs
take free slots in (arrival, or least work first with aging), the step cost model fitted to measured step times,
and the capacity a step cost budget allows."""

import pytest

from service.config import Settings
from service.worker.admission import SMOOTHING, StepCosts, Waiting, admission_order, step_capacity


def costs(**seconds: float) -> StepCosts:
    """Step costs measured once per size (`s1=0.15` is a step of 1 sample taking 0.15 s)."""
    measured = StepCosts()
    for size, value in seconds.items():
        measured.observe(int(size[1:]), value)
    return measured


def test_fifo_keeps_arrival_order() -> None:
    waiting = [Waiting(work=50, waited_s=1), Waiting(work=10, waited_s=0.5), Waiting(work=20, waited_s=0.1)]
    assert admission_order(waiting, "fifo", 30) == [0, 1, 2]


def test_shortest_takes_the_least_work_first_ties_in_arrival_order() -> None:
    waiting = [Waiting(work=50, waited_s=3), Waiting(work=20, waited_s=2), Waiting(work=10, waited_s=1),
               Waiting(work=20, waited_s=0.5)]
    assert admission_order(waiting, "shortest", 30) == [2, 1, 3, 0]


def test_shortest_ages_so_that_long_work_cannot_starve() -> None:
    """A job waiting the aging period goes before every job that has not, whatever its work; aged jobs oldest first."""
    waiting = [Waiting(work=500, waited_s=31), Waiting(work=10, waited_s=5), Waiting(work=400, waited_s=45),
               Waiting(work=20, waited_s=29.9)]
    assert admission_order(waiting, "shortest", 30) == [2, 0, 1, 3]
    with pytest.raises(ValueError, match="aging_s must be positive, got 0"):
        admission_order(waiting, "shortest", 0)


def test_until_two_sizes_are_measured_a_step_of_k_costs_k() -> None:
    assert [StepCosts().relative(k) for k in (1, 4)] == [1.0, 4.0]
    assert costs(s4=0.4).relative(8) == 8.0 and costs(s4=0.4).model() is None


def test_the_cost_model_is_the_affine_fit_of_the_measured_sizes() -> None:
    a, b = 0.09, 0.063  # tiny-shapes on this CPU: 0.15 s for one sample, 0.6 s for eight
    measured = costs(s1=a + b, s2=a + 2 * b, s4=a + 4 * b, s8=a + 8 * b)
    fitted = measured.model()
    assert fitted is not None and fitted == pytest.approx((a, b))
    assert measured.relative(8) == pytest.approx((a + 8 * b) / (a + b))


def test_a_fit_that_would_cost_less_than_nothing_goes_through_the_origin_and_never_falls_with_size() -> None:
    proportional = costs(s2=0.2, s4=0.5)  # the line through them crosses zero below 1 sample
    fitted = proportional.model()
    assert fitted is not None and fitted[0] == 0 and fitted[1] == pytest.approx((2 * 0.2 + 4 * 0.5) / (4 + 16))
    noisy = costs(s1=0.3, s2=0.2)  # a loaded machine made the bigger step faster: flat, not falling
    assert noisy.model() == (pytest.approx(0.25), 0.0) and noisy.relative(8) == 1.0


def test_measurements_are_moving_averages() -> None:
    measured = costs(s2=1.0)
    measured.observe(2, 2.0)
    measured.observe(0, 5.0)  # no step: ignored
    assert measured.seconds == {2: pytest.approx(1.0 + SMOOTHING * 1.0)}


def test_step_capacity_under_a_budget() -> None:
    a, b = 0.09, 0.063
    cpu = costs(s1=a + b, s8=a + 8 * b)
    assert step_capacity(cpu, 0, 8) == 8  # no budget
    assert step_capacity(StepCosts(), 3, 8) == 3  # nothing measured: k samples cost k
    assert step_capacity(cpu, 3, 8) == 5  # (a + 5b) / (a + b) = 2.6, 6 samples: 3.1
    assert step_capacity(cpu, 1, 8) == 1 and step_capacity(cpu, 100, 8) == 8
    flat = costs(s1=0.02, s8=0.02)  # an accelerator below its saturation: joining is free
    assert step_capacity(flat, 1, 8) == 8


def test_settings_refuse_a_budget_below_one_step() -> None:
    with pytest.raises(ValueError, match="step_cost_budget must be 0 .no budget. or at least 1"):
        Settings(step_cost_budget=0.5)
    with pytest.raises(ValueError, match="admission_order"):
        Settings(admission_order="random")  # type: ignore[arg-type]
    assert Settings(step_cost_budget=2.5, admission_order="shortest").step_cost_budget == 2.5
