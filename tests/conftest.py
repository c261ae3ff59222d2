"""Fixtures for every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import torch_threads


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of toy-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    see `torch_threads`."""
    with torch_threads(1):
        yield
