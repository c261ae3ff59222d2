"""The claim order of a model's priority streams (service/queue/priority.py): a pure function."""

from __future__ import annotations

from service.queue.priority import effective_level, read_order


def test_high_before_normal_before_low_when_none_has_aged() -> None:
    assert read_order([("high", 1.0), ("normal", 5.0), ("low", 9.0)], aging_s=30) == ["high", "normal", "low"]
    assert read_order([("high", None), ("normal", None), ("low", 0.0)], aging_s=30) == ["low"]
    assert read_order([("high", None), ("normal", None), ("low", None)], aging_s=30) == []


def test_aging_raises_a_level_per_period_up_to_high_then_age_decides() -> None:
    assert [effective_level("low", w, 10) for w in (0, 9.9, 10, 19.9, 20, 500)] == [0, 0, 1, 1, 2, 2]
    assert effective_level("high", 500, 10) == 2
    # a normal job aged one period ranks with high ones, by age; the low one needs two
    assert read_order([("high", 1.0), ("normal", 12.0), ("low", 15.0)], aging_s=10) == ["normal", "high", "low"]
    assert read_order([("high", 1.0), ("normal", 8.0), ("low", 15.0)], aging_s=10) == ["high", "low", "normal"]
    assert read_order([("high", 1.0), ("normal", 12.0), ("low", 21.0)], aging_s=10) == ["low", "normal", "high"]
    assert read_order([("high", 25.0), ("normal", 12.0), ("low", 21.0)], aging_s=10) == ["high", "low", "normal"]
