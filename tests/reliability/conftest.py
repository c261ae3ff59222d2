"""Fixtures of the fault, fuzz and load tests: a stack of real processes on a private Redis, torn down after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.procs import Stack


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start a Stack (a private redis-server with `appendfsync always`) with settings overrides; every process
    it started is killed afterwards."""
    stacks: list[Stack] = []

    def make(**overrides: Any) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", overrides)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()
