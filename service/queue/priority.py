"""Which of a model's priority streams a worker reads first: a pure function (no Redis), unit-tested on its own.

Each priority has its own stream (service/queue/keys.py), each first in, first out, so only each stream's oldest
waiting job competes. A job's effective level is its priority's (low 0, normal 1, high 2) plus one per `aging_s` it
has waited, at most high's: the streams are read by effective level, then by the age of their oldest job (older
first). So high goes before normal before low, yet a low job that has waited `2 * aging_s` ranks with high jobs and
is taken before every job submitted after it: it cannot starve behind a steady stream of high work. A job's wait
for its turn is bounded by `2 * aging_s` plus the time to run the work submitted before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.schemas import Priority

LEVEL: dict[Priority, int] = {"low": 0, "normal": 1, "high": 2}
TOP = max(LEVEL.values())


def effective_level(priority: Priority, waited_s: float, aging_s: float) -> int:
    """The level a job of `priority` that has waited `waited_s` competes at."""
    return min(TOP, LEVEL[priority] + int(max(0.0, waited_s) // aging_s))


def read_order(heads: Sequence[tuple[Priority, float | None]], aging_s: float) -> list[Priority]:
    """The priorities whose streams hold waiting jobs, in the order to read them. `heads`: (priority, how long the
    stream's oldest waiting job has waited, in seconds; None = no job waiting)."""
    waiting: list[tuple[Priority, float]] = [(p, w) for p, w in heads if w is not None]
    waiting.sort(key=lambda pw: (-effective_level(pw[0], pw[1], aging_s), -pw[1]))
    return [p for p, _ in waiting]
