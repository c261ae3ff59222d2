"""Helpers of the security tests (test_auth, test_quotas, test_limits, test_secrets_in_logs): API keys, an API
under uvicorn with keys, a gRPC server and a stub, and a look at what a test's Redis prefix holds.

Everything is real: uvicorn on a free port (tests/integration/test_rest.py's `serving`), grpc.aio on a free port,
the session's Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import redis

from service.api import proto_build
from service.auth import hash_key, new_key
from service.config import Settings

proto_build.ensure()

from service.api._proto.ldm.v1 import ldm_pb2 as pb  # noqa: E402
from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc  # noqa: E402
from service.api.grpc import bound_port, create_grpc_server, stop_grpc  # noqa: E402
from service.metrics import ApiMetrics  # noqa: E402

TXT = {"prompt": "a red circle on the left", "width": 64, "height": 64, "steps": 2, "seed": 7}


@dataclass(frozen=True)
class Keys:
    """Fresh keys of one test: two active, one revoked, one never configured; and the settings that say so."""

    alice: str
    bob: str
    revoked: str
    stranger: str

    @classmethod
    def fresh(cls) -> Keys:
        return cls(new_key(), new_key(), new_key(), new_key())

    def settings(self) -> dict[str, object]:
        return {"api_key_hashes": (hash_key(self.alice), hash_key(self.bob)),
                "revoked_key_hashes": (hash_key(self.revoked),)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def params(**fields: object) -> pb.GenerationParameters:
    return pb.GenerationParameters(**{"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 7,
                                      **fields})


@dataclass
class Grpc:
    stub: pb_grpc.DiffusionStub
    channel: grpc.aio.Channel
    metrics: ApiMetrics


@contextlib.asynccontextmanager
async def grpc_serving(settings: Settings) -> AsyncIterator[Grpc]:
    """A gRPC server on a free port (its own queue) and a channel to it; stopped on exit."""
    metrics = ApiMetrics()
    server = create_grpc_server(settings.model_copy(update={"grpc_port": 0}), metrics=metrics)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound_port(server)}")
    try:
        yield Grpc(pb_grpc.DiffusionStub(channel), channel, metrics)
    finally:
        await channel.close()
        await stop_grpc(server, 0)


def redis_keys(settings: Settings) -> list[str]:
    """Every key under the settings' prefix."""
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        return sorted(k.decode() for k in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000))
    finally:
        client.close()


def queued(settings: Settings, model: str) -> int:
    """Entries on the model's job stream (jobs accepted and not finished)."""
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        return int(client.xlen(f"{settings.key_prefix}:jobs:{model}"))
    finally:
        client.close()


def metric(client: httpx.Client, line_start: str, headers: dict[str, str] | None = None) -> float:
    """The value of the first /metrics sample line starting with `line_start`; 0 when absent."""
    for line in client.get("/metrics", headers=headers).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
