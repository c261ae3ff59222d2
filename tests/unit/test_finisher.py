"""The finisher (service/worker/finisher.py) on its own: jobs settle in order on one thread while the caller goes
on, the image limit makes `hand` wait, what settling raises comes back at `collect` once, and `overlap=False`
settles before `hand` returns."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from service.queue import QueueUnavailable
from service.worker.finisher import Finisher


def gated(log: list[str], name: str, gate: threading.Event | None = None) -> Callable[[], None]:
    def settle() -> None:
        if gate is not None:
            assert gate.wait(10)
        log.append(f"{name}@{threading.current_thread().name}")

    return settle


def test_jobs_settle_in_order_on_the_finishers_thread_while_the_caller_goes_on() -> None:
    gate, log = threading.Event(), list[str]()
    blocked: list[float] = []
    finisher = Finisher(limit=8, on_blocked=blocked.append)
    finisher.hand(gated(log, "a", gate), 2)
    finisher.hand(gated(log, "b"), 2)
    assert log == [] and len(finisher) == 2  # handed back at once: "a" is still waiting for its PNGs
    finisher.collect()
    assert len(finisher) == 2 and not blocked  # nothing settled yet, and collecting does not wait
    gate.set()
    finisher.drain()
    assert [entry.split("@")[0] for entry in log] == ["a", "b"]
    assert all(entry.split("@")[1].startswith("ldm-finish") for entry in log)
    assert len(finisher) == 0 and len(blocked) == 1  # the drain waited
    finisher.close()


def test_beyond_the_image_limit_hand_waits_for_the_oldest_jobs() -> None:
    gate, log = threading.Event(), list[str]()
    blocked: list[float] = []
    finisher = Finisher(limit=4, on_blocked=blocked.append)
    finisher.hand(gated(log, "a", gate), 3)
    finisher.hand(gated(log, "b"), 1)  # 4 images in hand: within the limit
    assert len(finisher) == 2 and not blocked
    threading.Timer(0.2, gate.set).start()
    finisher.hand(gated(log, "c"), 2)  # 6 > 4: waits until "a" has settled (then 3 are in hand)
    assert log and log[0].split("@")[0] == "a"
    assert len(blocked) == 1 and blocked[0] >= 0.1
    finisher.drain()
    assert [entry.split("@")[0] for entry in log] == ["a", "b", "c"]
    finisher.close()


def test_a_job_larger_than_the_limit_is_taken_when_nothing_else_is_in_hand() -> None:
    log: list[str] = []
    finisher = Finisher(limit=2)
    finisher.hand(gated(log, "big"), 9)
    finisher.drain()
    assert [entry.split("@")[0] for entry in log] == ["big"]
    finisher.close()


def test_what_settling_raises_comes_back_at_collect_once_and_the_next_jobs_still_settle() -> None:
    log: list[str] = []
    finisher = Finisher(limit=8)

    def down() -> None:
        raise QueueUnavailable("Redis is down")

    finisher.hand(down, 1)
    finisher.hand(gated(log, "after"), 1)
    with pytest.raises(QueueUnavailable, match="Redis is down"):
        finisher.drain()
    finisher.drain()  # raised once: the failed job has left the line
    assert [entry.split("@")[0] for entry in log] == ["after"] and len(finisher) == 0
    finisher.hand(down, 1)
    finisher.discard()  # after a reset: waited for, its error dropped
    assert len(finisher) == 0
    finisher.close()


def test_without_overlap_a_job_is_settled_when_hand_returns() -> None:
    log: list[str] = []
    blocked: list[float] = []
    finisher = Finisher(limit=8, overlap=False, on_blocked=blocked.append)
    finisher.hand(gated(log, "a"), 1)
    assert [entry.split("@")[0] for entry in log] == ["a"] and len(finisher) == 0 and len(blocked) == 1
    finisher.close()
