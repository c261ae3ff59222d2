"""`ldm serve` as a user runs it: one command brings up Redis, REST, gRPC and a worker; a killed worker
comes back; Ctrl-C stops everything and leaves no process behind."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api._proto.ldm.v1 import ldm_pb2 as pb
from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc
from service.embedded import free_port
from tests import helpers

LDM = Path(sys.executable).with_name("ldm")


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), to check nothing outlives `ldm serve`."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
                frontier.append(int(entry.name))
    return found


def worker_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "ldm worker":
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def wait_ready(base: str, timeout_s: float = 90) -> dict:
    """The readiness answer of the API at `base` (tests.helpers.wait_ready over HTTP)."""
    return helpers.wait_ready(lambda path: httpx.get(f"{base}{path}", timeout=2), timeout_s).json()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    tmp = tmp_path_factory.mktemp("serve")
    rest, grpc_port = free_port(), free_port()
    env = {**os.environ, "LDM_DATA_DIR": str(tmp / "data"), "LDM_REST_PORT": str(rest),
           "LDM_GRPC_PORT": str(grpc_port), "OMP_NUM_THREADS": "1"}
    env.pop("LDM_REDIS_URL", None)
    proc = subprocess.Popen([str(LDM), "serve", "--model", "random:tiny-sd"], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, f"http://127.0.0.1:{rest}", grpc_port
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)


def test_one_command_serves_rest_and_grpc_and_restarts_a_dead_worker(
        served: tuple[subprocess.Popen[str], str, int]) -> None:
    proc, base, grpc_port = served
    ready = wait_ready(base)
    assert ready["model"] == "random:tiny-sd"
    r = httpx.post(f"{base}/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "steps": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    box = httpx.get(f"{base}/metrics", timeout=10).text  # one scrape target: the API's and its workers' metrics
    for family in ("ldm_http_requests_total", "ldm_queue_depth", "ldm_batch_size", "ldm_sampler_step_seconds",
                   "ldm_time_to_first_step_seconds", "ldm_queue_position_at_claim"):
        assert f"# TYPE {family} " in box, family
    assert 'ldm_worker_up{worker_index="0"} 1.0' in box
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        generated = pb_grpc.DiffusionStub(channel).Generate(pb.GenerateRequest(
            parameters=pb.GenerationParameters(prompt="a red circle", seed=3, steps=2)), timeout=60)
        assert generated.images[0].png == r.content  # same request, same seed: same bytes over REST and gRPC

    mine = [p for p in worker_pids() if p in children(proc.pid)]
    assert len(mine) == 1
    os.kill(mine[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = [p for p in worker_pids() if p in children(proc.pid)]
        if now and now[0] != mine[0]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the supervisor did not restart the killed worker")
    again = httpx.post(f"{base}/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "steps": 2}, timeout=90)
    assert again.status_code == 200 and again.content == r.content  # same seed, same bytes, new worker

    descendants = children(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "ldm-serve is up" in out and "curl" in out
    time.sleep(0.5)
    assert not [p for p in descendants if Path(f"/proc/{p}").exists()], "processes outlived ldm serve"
