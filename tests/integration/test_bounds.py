"""What one caller can make an API process hold: message sizes (gRPC), concurrent calls, progress streams and waiting
calls (per key and per process), Redis connections. Against a real grpc.aio server (in a process of its own where
its memory is measured), real uvicorn, the test Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.auth import KEY_ID_CHARS, hash_key, new_key
from service.config import Settings
from service.queue import JobQueue, QueueUnavailable
from service.schemas import GenerationRequest
from tests.integration.secure import TXT, Keys, bearer, grpc_auth, grpc_serving, params, pb, pb_grpc, queued
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(90)
MODEL = "tiny-shapes"  # the default model: submissions need no live worker to be accepted
ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
UNKNOWN = "f" * 32

#: a gRPC server alone in its process, on the settings of its LDM_* environment; prints its port, stops on SIGTERM
SERVER = """
import asyncio, signal
from service.config import load_settings
from service.api.grpc import bound_port, create_grpc_server, stop_grpc

async def main():
    server = create_grpc_server(load_settings())
    await server.start()
    print(bound_port(server), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await stop_grpc(server, 0)

asyncio.run(main())
"""


def memory_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak resident size) of process `pid`, in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextlib.contextmanager
def grpc_process(settings: Settings) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`SERVER` in a child process on `settings` (through LDM_* variables); (the process, its port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env |= {"LDM_REDIS_URL": str(settings.redis_url), "LDM_KEY_PREFIX": settings.key_prefix, "LDM_GRPC_PORT": "0",
            "LDM_API_KEY_HASHES": ",".join(settings.api_key_hashes),
            "LDM_MAX_IMAGE_BYTES": str(settings.max_image_bytes), "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-c", SERVER], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            yield proc, int(proc.stdout.readline())
        finally:
            proc.terminate()
            proc.wait(20)


async def grpc_error(call: object, *, stream: bool = False) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if stream:
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    return caught.value


# ------------------------------------------------------------------------------------------------ gRPC sizes

@pytest.mark.anyio
async def test_an_unauthenticated_60_mib_message_is_refused_without_the_server_holding_it(
        make_settings: Callable[..., Settings]) -> None:
    """A 60 MiB Inpaint without a key (or with an unknown one) is answered UNAUTHENTICATED and the server process's
    peak resident memory (VmHWM, /proc) grows by far less than the message; the same message with a key, on a
    server whose Inpaint limit admits it, is received and parsed, and its peak grows by at least the message size
    (so the measure can see a message that was received)."""
    alice = new_key()
    settings = make_settings(api_key_hashes=(hash_key(alice),), max_image_bytes=32 * MiB)  # Inpaint: 64 MiB + 64 KiB
    big = pb.InpaintRequest(parameters=params(), image=b"\0" * (30 * MiB), mask=b"\0" * (30 * MiB))
    size = big.ByteSize()
    assert size >= 60 * MiB
    with grpc_process(settings) as (proc, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_send_message_length", 100 * MiB)]) as channel:
            stub = pb_grpc.DiffusionStub(channel)
            for metadata in ((), grpc_auth(alice)):  # warm both paths up: the refusal and a served call
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.GetJob(pb.GetJobRequest(job_id=UNKNOWN), metadata=metadata, timeout=10)
            peak, rss = memory_kib(proc.pid, "VmHWM"), memory_kib(proc.pid, "VmRSS")
            for metadata in ((), grpc_auth(new_key())):
                err = await grpc_error(stub.Inpaint(big, metadata=metadata, timeout=30))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
            refused_growth = (memory_kib(proc.pid, "VmHWM") - peak) * 1024
            rss_growth = (memory_kib(proc.pid, "VmRSS") - rss) * 1024
            assert refused_growth < size / 4, f"peak grew by {refused_growth / MiB:.1f} MiB"
            assert rss_growth < size / 4

            peak = memory_kib(proc.pid, "VmHWM")
            err = await grpc_error(stub.Inpaint(big, metadata=grpc_auth(alice), timeout=30))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # received, parsed: zeros are no image
            received_growth = (memory_kib(proc.pid, "VmHWM") - peak) * 1024
            assert received_growth >= size, f"peak grew by {received_growth / MiB:.1f} MiB only"
    print(f"\n60 MiB Inpaint: refused without a key: peak RSS +{refused_growth / MiB:.1f} MiB; "
          f"received with a key: +{received_growth / MiB:.1f} MiB")


@pytest.mark.anyio
async def test_each_method_receives_only_what_it_needs(make_settings: Callable[..., Settings]) -> None:
    """With a key: a Generate over `grpc_max_request_bytes` is RESOURCE_EXHAUSTED unparsed (its message says the
    limit) though an Inpaint of the same size is within its own (one image + mask more) and reaches validation;
    nothing is queued by either."""
    keys = Keys.fresh()
    settings = make_settings(**keys.settings(), grpc_max_request_bytes=16 * 2**10, max_image_bytes=256 * 2**10)
    async with grpc_serving(settings) as env:
        padded = params(prompt="x" * (20 * 2**10))  # over 16 KiB; the prompt limit is never reached: not parsed
        err = await grpc_error(env.stub.Generate(pb.GenerateRequest(parameters=padded),
                                                 metadata=grpc_auth(keys.alice), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Generate" in err.details() and str(16 * 2**10) in err.details(), err.details()
        inpaint = pb.InpaintRequest(parameters=params(), image=b"\0" * (20 * 2**10), mask=b"\0")
        err = await grpc_error(env.stub.Inpaint(inpaint, metadata=grpc_auth(keys.alice), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()  # parsed, and its image refused
        over = pb.InpaintRequest(parameters=params(), image=b"\0" * (600 * 2**10), mask=b"\0")  # > 16 K + 2 x 256 K
        err = await grpc_error(env.stub.Inpaint(over, metadata=grpc_auth(keys.alice), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert queued(settings, MODEL) == 0


@pytest.mark.anyio
async def test_grpc_runs_at_most_its_maximum_of_concurrent_calls(make_settings: Callable[..., Settings]) -> None:
    """Calls that no cap of ours counts (health Watch streams: open to anyone) are bounded by
    `grpc_max_concurrent_rpcs`: past it, grpc itself answers RESOURCE_EXHAUSTED."""
    settings = make_settings(grpc_max_concurrent_rpcs=4, max_event_streams=1, max_waiting_calls=1,
                             redis_max_connections=10)
    async with grpc_serving(settings) as env:
        health = health_pb2_grpc.HealthStub(env.channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20) for _ in range(4)]
        for watch in watches:
            await watch.read()  # each is running on the server now
        err = await grpc_error(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for watch in watches:
            watch.cancel()
        await asyncio.sleep(0.3)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status


def test_settings_that_would_let_streams_starve_the_redis_pool_are_refused(
        make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="redis_max_connections"):
        make_settings(max_event_streams=100, max_waiting_calls=30, redis_max_connections=128)
    with pytest.raises(ValueError, match="grpc_max_concurrent_rpcs"):
        make_settings(grpc_max_concurrent_rpcs=100)


# ------------------------------------------------------------------------------------------------ streams and calls

def redis_clients(settings: Settings) -> int:
    """Connections to the test Redis named after this test's key prefix (the API's pool names its connections so)."""
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        return sum(1 for c in client.client_list() if c.get("name") == settings.key_prefix)
    finally:
        client.close()


def three_keys(keys: Keys) -> dict[str, object]:
    """alice, bob and stranger configured (a third tenant); revoked stays revoked."""
    return {**keys.settings(), "api_key_hashes": tuple(hash_key(k) for k in (keys.alice, keys.bob, keys.stranger))}


def submit(api: Api, key: str) -> str:
    resp = api.client.post("/v1/jobs", json=TXT, headers=bearer(key))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def started(resp: httpx.Response, kept: list[Iterator[str]]) -> bool:
    """Whether the stream's first line came (`retry:`); its line iterator is kept in `kept`, for a dropped one would
    close the response (the client would leave)."""
    lines = resp.iter_lines()
    kept.append(lines)
    return next(lines).startswith("retry:")


def test_a_key_opening_ten_times_its_stream_cap_gets_429_past_it_and_others_keep_working(
        make_settings: Callable[..., Settings]) -> None:
    """SSE: a key's 30 streams on its own job (cap 3) are 3 streams and 27 answers 429 `too_many_streams` with
    Retry-After, each refused before Redis is asked anything; another key streams, reads and submits meanwhile;
    once the process holds its cap (6), a third key is refused `server_busy`; closed streams give their places back.
    Redis never sees more of the API's connections than its pool allows, nor one per attempt."""
    keys = Keys.fresh()
    settings = make_settings(**three_keys(keys), key_max_event_streams=3, max_event_streams=6, max_waiting_calls=4,
                             redis_max_connections=18, sse_keepalive_s=1.0)
    with serving(settings) as api, contextlib.ExitStack() as streams:
        mine, theirs = submit(api, keys.alice), submit(api, keys.bob)
        statuses, most_clients, kept = [], 0, []
        for _ in range(30):
            resp = streams.enter_context(api.client.stream("GET", f"/v1/jobs/{mine}/events",
                                                           headers=bearer(keys.alice)))
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                assert started(resp, kept)
            else:
                resp.read()
                assert resp.status_code == 429
                assert resp.headers["Retry-After"] == str(settings.queue_retry_after_s)
                assert "key_max_event_streams" in resp.json()["detail"]
            most_clients = max(most_clients, redis_clients(settings))
        assert statuses.count(200) == 3 and statuses.count(429) == 27

        with contextlib.ExitStack() as others:  # bob: streams, reads, submits, while alice is at her cap
            for _ in range(3):
                resp = others.enter_context(api.client.stream("GET", f"/v1/jobs/{theirs}/events",
                                                              headers=bearer(keys.bob)))
                assert resp.status_code == 200 and started(resp, kept)
            assert api.client.get(f"/v1/jobs/{theirs}", headers=bearer(keys.bob)).status_code == 200
            submit(api, keys.bob)
            third = submit(api, keys.stranger)
            refused = api.client.get(f"/v1/jobs/{third}/events", headers=bearer(keys.stranger))
            assert refused.status_code == 429 and "max_event_streams" in refused.json()["detail"]
            most_clients = max(most_clients, redis_clients(settings))
        sample = api.client.get("/metrics").text
        assert 'ldm_quota_rejections_total{front_end="rest",quota="streams"} 27.0' in sample
        assert 'ldm_quota_rejections_total{front_end="rest",quota="server_streams"} 1.0' in sample

        streams.close()  # alice's streams end: their places come back
        deadline = time.monotonic() + 10
        while True:
            with api.client.stream("GET", f"/v1/jobs/{third}/events", headers=bearer(keys.stranger)) as resp:
                if resp.status_code == 200:
                    break
            assert time.monotonic() < deadline, "closed streams kept their places"
            time.sleep(0.1)
    assert most_clients <= settings.redis_max_connections
    print(f"\n30 streams of one key (cap 3): {statuses.count(429)} refused; most Redis connections of the API: "
          f"{most_clients} (pool {settings.redis_max_connections})")


def test_waiting_calls_are_capped_per_key_and_per_process_before_anything_is_queued(
        make_settings: Callable[..., Settings]) -> None:
    """Synchronous calls waiting for their image (no worker here: they wait until their timeout): a key's third
    call at a cap of 2 answers 429 `too_many_waiting_calls` at once, queueing nothing; another key's call is
    accepted; at the process's cap (3) a third key's call answers 429 `server_busy`."""
    keys = Keys.fresh()
    settings = make_settings(**three_keys(keys), key_max_waiting_calls=2, max_waiting_calls=3)
    with serving(settings) as api, ThreadPoolExecutor(max_workers=8) as pool:
        def call(key: str) -> httpx.Response:
            return api.client.post("/v1/txt2img", params={"timeout": 4}, json=TXT, headers=bearer(key))

        alice = [pool.submit(call, keys.alice) for _ in range(5)]
        refused = [f.result() for f in _first_done(alice, 3, within_s=3)]
        assert [r.status_code for r in refused] == [429] * 3
        assert {r.json()["detail"].split("(")[1].split(")")[0] for r in refused} == {"key_max_waiting_calls"}
        bob = pool.submit(call, keys.bob)
        time.sleep(0.5)
        assert not bob.done()  # accepted: waiting for its image
        stranger = call(keys.stranger)
        assert stranger.status_code == 429 and "max_waiting_calls" in stranger.json()["detail"]
        assert queued(settings, MODEL) == 3  # alice's two and bob's one: refused calls queued nothing
        assert sorted(f.result().status_code for f in alice) == [429, 429, 429, 504, 504]
        assert bob.result().status_code == 504


def _first_done(futures: list[Future[httpx.Response]], count: int, within_s: float) -> list[Future[httpx.Response]]:
    """The first `count` futures to finish, within `within_s`."""
    deadline = time.monotonic() + within_s
    while sum(f.done() for f in futures) < count:
        assert time.monotonic() < deadline, "the refusals did not come at once"
        time.sleep(0.02)
    return [f for f in futures if f.done()][:count]


@pytest.mark.anyio
async def test_grpc_watch_and_waiting_calls_are_capped_per_key(make_settings: Callable[..., Settings]) -> None:
    """WatchJob past the key's cap of 2, and a generating call past its cap of 1 waiting call, are
    RESOURCE_EXHAUSTED with `retry-after`; another key watches meanwhile; a cancelled watch gives its place back."""
    keys = Keys.fresh()
    settings = make_settings(**keys.settings(), key_max_event_streams=2, key_max_waiting_calls=1)
    async with grpc_serving(settings) as env, JobQueue(settings) as queue:
        jobs = {}
        for key in (keys.alice, keys.bob):
            owner = hash_key(key)[:KEY_ID_CHARS]
            jobs[key] = (await queue.submit(GenerationRequest(prompt="a red circle"), owner=owner)).id

        def watch(key: str) -> grpc.aio.UnaryStreamCall:
            return env.stub.WatchJob(pb.WatchJobRequest(job_id=jobs[key]), metadata=grpc_auth(key), timeout=30)

        held = [watch(keys.alice), watch(keys.alice)]
        for call in held:
            assert (await call.read()).type == pb.EVENT_TYPE_QUEUED
        err = await grpc_error(watch(keys.alice), stream=True)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "key_max_event_streams" in err.details()
        assert ("retry-after", str(settings.queue_retry_after_s)) in tuple(err.trailing_metadata() or ())
        other = watch(keys.bob)
        assert (await other.read()).type == pb.EVENT_TYPE_QUEUED

        waiting = env.stub.Generate(pb.GenerateRequest(parameters=params()), metadata=grpc_auth(keys.alice),
                                    timeout=5)
        deadline = time.monotonic() + 5
        while queued(settings, MODEL) < 3:  # its job is queued: it waits for its images now
            assert time.monotonic() < deadline and not waiting.done()
            await asyncio.sleep(0.05)
        err = await grpc_error(env.stub.Generate(pb.GenerateRequest(parameters=params()),
                                                 metadata=grpc_auth(keys.alice), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "key_max_waiting_calls" in err.details()
        waiting.cancel()

        held[0].cancel()
        deadline = time.monotonic() + 10
        while True:
            again = watch(keys.alice)
            try:
                await again.read()
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                await asyncio.sleep(0.1)
        for call in (held[1], other, again):
            call.cancel()
    sample = env.metrics.registry.get_sample_value
    assert sample("ldm_quota_rejections_total", {"front_end": "grpc", "quota": "streams"}) >= 1
    assert sample("ldm_quota_rejections_total", {"front_end": "grpc", "quota": "waiting_calls"}) == 1


@pytest.mark.anyio
async def test_the_redis_pool_waits_for_a_free_connection_and_never_grows_past_its_size(
        make_settings: Callable[..., Settings]) -> None:
    """40 concurrent blocking reads on a pool of 10 all complete, through at most 10 connections (CLIENT LIST);
    with a wait shorter than a read, the calls that find no connection answer QueueUnavailable naming the
    setting (503 / UNAVAILABLE), without retrying."""
    settings = make_settings(redis_max_connections=10, max_event_streams=1, max_waiting_calls=1)
    async with JobQueue(settings) as queue:
        async def read(block_ms: int) -> object:
            return await queue.events(UNKNOWN, block_ms=block_ms)

        reads = asyncio.gather(*(read(200) for _ in range(40)))
        most = 0
        while not reads.done():
            most = max(most, redis_clients(settings))
            await asyncio.sleep(0.05)
        assert (await reads) == [[]] * 40
        assert 0 < most <= 10
    impatient = make_settings(redis_max_connections=10, max_event_streams=1, max_waiting_calls=1,
                              redis_pool_timeout_s=0.05)
    async with JobQueue(impatient) as queue:
        outcomes = await asyncio.gather(*(queue.events(UNKNOWN, block_ms=500) for _ in range(20)),
                                        return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 10 and all(isinstance(e, QueueUnavailable) for e in errors)
        assert "redis_max_connections" in str(errors[0])
