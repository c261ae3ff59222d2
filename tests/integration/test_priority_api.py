"""Priorities through the front ends (real uvicorn, real grpc.aio, the test Redis): a key's `max_priority` from the
key file, 403 / PERMISSION_DENIED above it naming the limit, every priority without authentication; queue position
and ETA on a queued job's status and its `position` events (SSE and gRPC WatchJob), falling as the jobs ahead
finish."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from service.auth import hash_key, new_key, parse_key_file
from service.config import Settings
from service.queue import JobQueue, WorkerInfo
from tests.integration.secure import TXT, bearer, grpc_auth, grpc_serving, params, pb
from tests.integration.test_rest import Api, Frame, serving, sse
from tests.integration.test_tenancy import MODEL, finish_next

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """Three keys: plain (normal at most), `max_priority=high` and `max_priority=low`."""
    found = {"plain": new_key(), "high": new_key(), "low": new_key()}
    (tmp_path / "api-keys").write_text(f"{hash_key(found['plain'])} plain\n"
                                       f"{hash_key(found['high'])} interactive max_priority=high\n"
                                       f"{hash_key(found['low'])} batch export max_priority=low\n")
    return found


@pytest.fixture
def app(make_settings: Callable[..., Settings], keys: dict[str, str], tmp_path: Path) -> Iterator[Api]:
    with serving(make_settings(api_key_file=tmp_path / "api-keys")) as api:
        yield api


def test_key_file_max_priority_is_parsed_and_a_bad_one_refused() -> None:
    digest = "a" * 64
    ring = parse_key_file(f"{digest} ops role=admin max_priority=HIGH\n", "f")
    assert ring.max_priority == {bytes.fromhex(digest): "high"} and ring.active[bytes.fromhex(digest)] == "ops"
    for bad in ("max_priority=urgent", "max_priority=high max_priority=low"):
        with pytest.raises(ValueError, match="line 1: max_priority must be one of high, normal, low"):
            parse_key_file(f"{digest} {bad}\n", "f")


def test_a_request_above_its_keys_max_priority_is_refused_naming_the_limit(app: Api, keys: dict[str, str]) -> None:
    c = app.client
    refused = c.post("/v1/jobs", json={**TXT, "priority": "high"}, headers=bearer(keys["plain"]))
    assert refused.status_code == 403 and refused.json()["detail"].startswith(
        "priority 'high' is above this API key's max_priority 'normal'")
    assert c.post("/v1/jobs", json={**TXT, "priority": "normal"}, headers=bearer(keys["low"])).status_code == 403
    openai = c.post("/v1/images/generations", json={"prompt": "a red circle", "priority": "high", "size": "64x64"},
                    headers=bearer(keys["plain"]))
    assert openai.status_code == 403 and openai.json()["error"]["code"] == "priority_not_allowed"
    for key, priority in (("plain", "normal"), ("plain", "low"), ("low", "low"), ("high", "high")):
        accepted = c.post("/v1/jobs", json={**TXT, "priority": priority}, headers=bearer(keys[key]))
        assert accepted.status_code == 202 and accepted.json()["request"]["priority"] == priority
    unknown = c.post("/v1/jobs", json={**TXT, "priority": "urgent"}, headers=bearer(keys["high"]))
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "priority"]


def test_without_authentication_every_priority_is_allowed(make_settings: Callable[..., Settings]) -> None:
    with serving(make_settings()) as api:
        for priority in ("high", "normal", "low"):
            assert api.client.post("/v1/jobs", json={**TXT, "priority": priority}).status_code == 202


def test_a_queued_jobs_position_and_eta_fall_as_the_jobs_ahead_finish(app: Api, keys: dict[str, str]) -> None:
    c, auth = app.client, bearer(keys["high"])
    ahead = [c.post("/v1/jobs", json={**TXT, "steps": 4}, headers=auth).json()["id"] for _ in range(2)]
    mine = c.post("/v1/jobs", json={**TXT, "steps": 4}, headers=auth).json()["id"]
    jumped = c.post("/v1/jobs", json={**TXT, "steps": 4, "priority": "high"}, headers=auth).json()["id"]
    view = c.get(f"/v1/jobs/{mine}", headers=auth).json()
    assert (view["queue_position"], view["eta_s"]) == (3, None)  # the high job is ahead too; no rate measured yet
    assert c.get(f"/v1/jobs/{jumped}", headers=auth).json()["queue_position"] == 0

    async def beat() -> None:  # a worker that measured 8 sample-steps per second
        async with JobQueue(app.settings) as q:
            await q.heartbeat(WorkerInfo(id="w", models=[MODEL], step_rate=8.0, steps_in_hand=0))

    asyncio.run(beat())
    assert c.get(f"/v1/jobs/{mine}", headers=auth).json()["eta_s"] == (3 * 4 + 4) / 8.0

    positions: list[int] = []
    seen_first = threading.Event()

    def follow() -> None:
        def stop(frame: Frame) -> bool:
            if frame.event == "position":
                positions.append(json.loads(frame.data or "{}")["queue_position"])
                seen_first.set()
            return bool(positions) and positions[-1] == 0
        sse(c, f"/v1/jobs/{mine}/events", headers=auth, stop=stop)

    watcher = threading.Thread(target=follow)
    watcher.start()
    assert seen_first.wait(10)
    assert finish_next(app.settings) == jumped  # high first
    for job_id in ahead:
        assert finish_next(app.settings) == job_id
    watcher.join(20)
    assert not watcher.is_alive()
    assert positions[0] == 3 and positions[-1] == 0 and positions == sorted(positions, reverse=True)
    assert c.get(f"/v1/jobs/{mine}", headers=auth).json()["queue_position"] == 0


@pytest.mark.anyio
async def test_grpc_priority_permission_and_position(make_settings: Callable[..., Settings], keys: dict[str, str],
                                                     tmp_path: Path) -> None:
    settings = make_settings(api_key_file=tmp_path / "api-keys")
    async with grpc_serving(settings) as env:
        s = env.stub
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Generate(pb.GenerateRequest(parameters=params(priority="high")), metadata=grpc_auth(keys["plain"]),
                             timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "max_priority 'normal'" in (err.value.details() or "")
        ids = []
        for priority in ("normal", "high"):  # an idempotency key keeps the job when the call ends
            call = s.GenerateStream(pb.GenerateRequest(parameters=params(priority=priority),
                                                       idempotency_key=f"p-{priority}"),
                                    metadata=grpc_auth(keys["high"]), timeout=5)
            ids.append(dict(await call.initial_metadata())["ldm-job-id"])
            first = await call.read()
            assert first.progress.type == pb.EVENT_TYPE_QUEUED
            call.cancel()
        normal, high = [await s.GetJob(pb.GetJobRequest(job_id=str(i)), metadata=grpc_auth(keys["high"]), timeout=5)
                        for i in ids]
        assert high.parameters.priority == "high" and high.queue_position == 0
        assert normal.parameters.priority == "normal" and normal.queue_position == 1


@pytest.mark.anyio
async def test_grpc_watch_job_sends_position_events_falling_as_the_jobs_ahead_finish(
        make_settings: Callable[..., Settings], keys: dict[str, str], tmp_path: Path) -> None:
    """The SSE test above over real gRPC: WatchJob on a queued job streams EVENT_TYPE_POSITION messages with
    `queue_position` and `eta_s`, one each time a job ahead finishes, down to 0."""
    settings = make_settings(api_key_file=tmp_path / "api-keys")
    auth = grpc_auth(keys["high"])
    async with grpc_serving(settings) as env:
        s = env.stub
        ids = []
        for i, priority in enumerate(("normal", "normal", "normal", "high")):  # two ahead, mine, one jumping it
            call = s.GenerateStream(pb.GenerateRequest(parameters=params(steps=4, priority=priority),
                                                       idempotency_key=f"w-{i}"), metadata=auth, timeout=5)
            ids.append(dict(await call.initial_metadata())["ldm-job-id"])
            call.cancel()  # the idempotency key keeps the job queued
        ahead, mine, jumped = [str(i) for i in ids[:2]], str(ids[2]), str(ids[3])
        async with JobQueue(settings) as q:  # a worker that measured 8 sample-steps per second
            await q.heartbeat(WorkerInfo(id="w", models=[MODEL], step_rate=8.0, steps_in_hand=0))

        watch = s.WatchJob(pb.WatchJobRequest(job_id=mine), metadata=auth, timeout=30)

        async def next_position() -> pb.Progress:
            while True:
                message = await watch.read()
                assert message is not grpc.aio.EOF, "the watch ended before a position event"
                if message.type == pb.EVENT_TYPE_POSITION:
                    return message

        first = await next_position()
        assert first.status == pb.JOB_STATUS_QUEUED and first.queue_position == 3
        assert first.HasField("eta_s") and first.eta_s == (3 * 4 + 4) / 8.0
        positions = [first.queue_position]
        for job_id in (jumped, *ahead):  # high first, then the older normal jobs
            assert await asyncio.to_thread(finish_next, settings) == job_id
            positions.append((await next_position()).queue_position)
        watch.cancel()
        assert positions == [3, 2, 1, 0]
        job = await s.GetJob(pb.GetJobRequest(job_id=mine), metadata=auth, timeout=5)
        assert job.status == pb.JOB_STATUS_QUEUED and job.queue_position == 0 and job.eta_s == 4 / 8.0
