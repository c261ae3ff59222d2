"""Faults, each with real processes: workers killed mid-batch, Redis killed or paused, the API restarted under a
streaming client, a job that crashes every worker that runs it.

What the service promises (docs/operations.md, "Fault tolerance and load"), and how each test holds it to that:
- at-least-once execution: a job a worker took is run again by another when its worker dies (kill -9 x10, poison);
- exactly-once results to the client: a job's results are stored and reported once, however often it ran
  (every job has one terminal event, one `job_succeeded` log line across all workers, its n result keys);
- an accepted job survives a crash of Redis (SIGKILL, then restart on the same data folder);
- an SSE client resumes across an API restart with Last-Event-ID, without gaps or duplicates; a synchronous call
  waiting through a graceful API stop gets a 503 at once, and its job goes on (a resend with its key gets it; an
  event stream on it ends at once too, and resumes from its Last-Event-ID on the new API);
- a poison job fails into the dead-letter stream after max_attempts, taking down no other job (quarantine);
- a Redis outage is a quick 503 / UNAVAILABLE, not a hang and not a 500, and everything recovers after it.

The jobs are tiny (random:tiny-sd at 64x64, a few steps) and the visibility timeout short (1.5 s), so that the
whole file runs in about a minute and a half on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from service.api._proto.ldm.v1 import ldm_pb2 as pb
from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc
from service.queue import JobStatus
from tests.helpers import wait_ready, wait_until
from tests.reliability.procs import MODEL, POISON, Respawner, Stack, request

pytestmark = pytest.mark.timeout(180)


def batch_under_way(stack: Stack, job_ids: list[str]) -> tuple[str, list[str]] | None:
    """A live worker running two or more of `job_ids` past their first step: (its name, those jobs)."""
    live = {p.name for p in stack.workers() if p.alive}
    running: dict[str, list[str]] = {}
    for job_id in job_ids:
        job = stack.job(job_id)
        if job.status == JobStatus.running and job.step >= 1 and job.worker in live:
            running.setdefault(job.worker, []).append(job_id)
    return next(((w, ids) for w, ids in running.items() if len(ids) >= 2), None)


@pytest.mark.slow  # a soak: ten kills; one kill mid-batch is tests/integration/test_worker.py (in make test)
def test_kill_9_of_a_worker_mid_batch_ten_times_loses_no_job_and_answers_none_twice(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    pending = [stack.start_worker(wait=False) for _ in range(2)]
    for proc in pending:
        stack.wait_registered(proc)
    jobs: list[str] = []
    kills: list[tuple[str, list[str]]] = []  # (worker, the jobs it was running)
    for round_ in range(10):
        batch = [stack.queue.submit(request(steps=8, seed=100 * round_ + i, n=1 + (i == 0))).id for i in range(4)]
        jobs += batch

        deadline = time.monotonic() + 60
        while (under_way := batch_under_way(stack, batch)) is None:
            assert time.monotonic() < deadline, f"no batch of two or more jobs under way (round {round_})"
            time.sleep(0.03)
        kills.append(under_way)
        victim = next(p for p in stack.workers() if p.name == kills[-1][0])
        victim.kill()
        stack.start_worker(wait=False)  # its replacement, as a supervisor would start one
    finished = stack.wait_jobs(jobs, timeout_s=120)

    assert len(kills) == 10 and all(len(ids) >= 2 for _, ids in kills)
    logged = stack.succeeded_log_lines()
    for done in finished:
        assert done.status == JobStatus.succeeded, (done.id, done.status, done.error)
        assert done.results == done.request.n and len(stack.stored_results(done.id)) == done.request.n
        types = [e["type"] for e in stack.events(done.id)]
        assert types.count("succeeded") == 1 and not {"failed", "cancelled"} & set(types), types
        assert logged.get(done.id) == 1, (done.id, logged.get(done.id))  # stored once, by one worker
    hit = {job_id for _, ids in kills for job_id in ids}
    for job_id in hit:  # each job that was running in a killed worker ran again elsewhere
        done = stack.job(job_id)
        assert done.attempts >= 2 and "requeued" in [e["type"] for e in stack.events(job_id)]
        assert done.worker != next(w for w, ids in kills if job_id in ids)
    stats = stack.queue.stats(MODEL)
    assert stats.depth == 0 and stats.pending == 0  # every stream entry acknowledged
    assert stack.dead_letters() == []


def test_sigkill_of_redis_with_queued_and_running_jobs_loses_no_accepted_job(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    worker = stack.start_worker(wait=False)
    api = stack.start_api()
    stack.wait_registered(worker)
    accepted: list[str] = []
    answers: list[tuple[int, float]] = []  # (status, seconds) of every submission
    stop = threading.Event()

    def submit_forever() -> None:  # one client submitting as fast as it is answered, through the outage
        with httpx.Client(base_url=api.url, timeout=30) as client:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    r = client.post("/v1/jobs", json={"prompt": f"a red circle {len(answers)}", "steps": 4,
                                                      "seed": len(answers), "width": 64, "height": 64})
                except httpx.TransportError:
                    continue
                answers.append((r.status_code, time.monotonic() - began))
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                time.sleep(0.02)

    long_job = stack.queue.submit(request(steps=400)).id  # running when Redis dies
    submitter = threading.Thread(target=submit_forever, daemon=True)
    submitter.start()
    try:
        wait_until(lambda: stack.job(long_job).step >= 1 and len(accepted) >= 10, 60, "a running job and queued ones")
        os.kill(stack.redis.pid or 0, signal.SIGKILL)  # no shutdown, no final fsync: what a crash leaves
        at_kill = len(accepted)
        queued_at_kill = accepted[-5:]
        time.sleep(1.5)
        stack.redis.start()  # the same folder and port; the AOF is replayed
        wait_until(lambda: len(accepted) >= at_kill + 5, 60, "submissions accepted again after the restart")
    finally:
        stop.set()
        submitter.join(timeout=30)
    assert stack.job(long_job).status in (JobStatus.queued, JobStatus.running)  # it survived the crash too
    stack.queue.cancel(long_job)  # no need to wait for its 400 steps
    finished = stack.wait_jobs(accepted, timeout_s=120)

    with stack.client() as client:  # acknowledged = fsynced: the promise rests on this
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert {status for status, _ in answers} <= {202, 503}  # while Redis was down: 503, never a 500
    assert any(status == 503 for status, _ in answers) and max(seconds for _, seconds in answers) < 10  # no hang
    logged = stack.succeeded_log_lines()
    for done in finished:  # every accepted job, those accepted just before the crash included
        assert done.status == JobStatus.succeeded, (done.id, done.status, done.error)
        assert logged.get(done.id) == 1 and len(stack.stored_results(done.id)) == 1
    assert set(queued_at_kill) <= {d.id for d in finished}
    assert worker.alive and all(d.worker == worker.name for d in finished)  # the same worker, reconnected
    assert "event=redis_unavailable" in worker.log_text()
    assert stack.wait_jobs([long_job], 60)[0].status == JobStatus.cancelled


@dataclass
class Frame:
    id: str
    event: str
    data: dict[str, Any]


def resuming_event_client(base: str, job_id: str, timeout_s: float, on_frame: Callable[[Frame], None],
                          ) -> tuple[list[Frame], int]:
    """What an EventSource does: read the job's SSE stream; when the connection drops, reconnect (every 0.2 s)
    with Last-Event-ID = the last id received, until a terminal event. The frames and the connections made."""
    frames: list[Frame] = []
    connections, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": frames[-1].id} if frames else {}
        try:
            with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers, timeout=10) as resp:
                connections += 1
                assert resp.status_code == 200, resp.read()
                fields: dict[str, str] = {}
                for line in resp.iter_lines():
                    if line and not line.startswith(":"):
                        key, _, value = line.partition(":")
                        fields[key] = value.removeprefix(" ")
                    elif not line and "id" in fields:
                        frame = Frame(fields["id"], fields["event"], json.loads(fields["data"]))
                        frames.append(frame)
                        on_frame(frame)
                        if frame.data["type"] in ("succeeded", "failed", "cancelled"):
                            return frames, connections
                    if not line:
                        fields = {}
        except httpx.TransportError:  # the API went away mid-stream (or is not back yet)
            pass
        time.sleep(0.2)
    raise AssertionError(f"no terminal event within {timeout_s} s; got {[f.event for f in frames]}")


def test_api_restart_during_sse_streaming_the_client_resumes_without_gaps_or_duplicates(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    worker = stack.start_worker(wait=False)
    api = stack.start_api()
    stack.wait_registered(worker)
    job_id = httpx.post(f"{api.url}/v1/jobs", json={"prompt": "a slow job", "steps": 100, "width": 64,
                                                    "height": 64}, timeout=10).json()["id"]
    restarted: list[Any] = []

    def restart_after_third_progress(frame: Frame) -> None:
        if frame.event == "progress" and frame.data["step"] == 3 and not restarted:
            api.proc.kill()  # the stream is open: the client sees its connection drop
            restarted.append(threading.Thread(target=stack.start_api, kwargs={"port": api.port}, daemon=True))
            restarted[0].start()  # a new API process on the same address, as a restarted pod would be

    frames, connections = resuming_event_client(api.url, job_id, 120, restart_after_third_progress)
    restarted[0].join(timeout=60)

    stored = stack.events(job_id)  # what the job wrote, in order
    assert [f.id for f in frames] == [e["id"] for e in stored]  # every event, once, in order: no gap, no duplicate
    assert [f.event for f in frames] == ["queued", "started", *["progress"] * 100, "succeeded"]
    assert [f.data["step"] for f in frames if f.event == "progress"] == list(range(1, 101))
    assert connections >= 2 and not api.proc.alive  # the second stream came from the new process


def test_a_poison_job_is_dead_lettered_after_max_attempts_and_the_other_jobs_finish(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(max_attempts=3)
    # queued before any worker is up, so that the first worker takes the poison job in a batch with three others
    jobs = [stack.queue.submit(request(steps=6, seed=i)).id for i in range(3)]
    poison = stack.queue.submit(request(prompt=f"{POISON} pill", steps=6, seed=99)).id
    jobs += [stack.queue.submit(request(steps=6, seed=i)).id for i in range(3, 6)]
    with Respawner(stack, 2, poison=True) as workers:  # real workers that crash (SIGKILL) on a POISON prompt
        finished = stack.wait_jobs([*jobs, poison], timeout_s=150)

    dead = stack.job(poison)
    assert dead.status == JobStatus.failed and dead.attempts == 3, (dead.status, dead.attempts)
    assert dead.error == "gave up after 3 attempts: the workers running it stopped responding"
    [letter] = stack.dead_letters()
    assert letter[b"job"].decode() == poison and letter[b"attempts"] == b"3"
    assert workers.deaths == 3  # each attempt killed the worker running it; nothing else died
    started = [e["at"] for e in stack.events(poison) if e["type"] == "started"]
    assert len(started) == 3
    logged = stack.succeeded_log_lines()
    batch_mates = 0
    for done in finished[:-1]:  # the others all finished, each once, within their attempts
        assert done.status == JobStatus.succeeded and logged.get(done.id) == 1, (done.id, done.status, done.error)
        first_start = next(e["at"] for e in stack.events(done.id) if e["type"] == "started")
        if first_start == started[0]:  # it shared the poison job's first batch and died with it once
            batch_mates += 1
            assert done.attempts == 2  # then ran alone, in quarantine, and succeeded
    assert batch_mates == 3


def test_a_redis_outage_of_a_few_seconds_is_503_not_a_hang_and_everything_recovers(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    worker = stack.start_worker(wait=False)
    api = stack.start_api()
    stack.wait_registered(worker)
    client = httpx.Client(base_url=api.url, timeout=30)
    channel = grpc.insecure_channel(f"127.0.0.1:{api.grpc_port}")
    stub = pb_grpc.DiffusionStub(channel)
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}
    try:
        before = client.post("/v1/jobs", json=body).json()["id"]
        assert stack.wait_jobs([before], 30)[0].status == JobStatus.succeeded
        streaming = client.post("/v1/jobs", json={**body, "steps": 400}).json()["id"]
        wait_until(lambda: stack.job(streaming).step >= 1, 30, "the long job to run")
        stream_end: list[tuple[str, float]] = []

        def follow() -> None:  # an SSE client following the long job through the outage
            last = ""
            with httpx.stream("GET", f"{api.url}/v1/jobs/{streaming}/events", timeout=30) as resp:
                for line in resp.iter_lines():
                    last = line if line.startswith("event:") else last
            stream_end.append((last, time.monotonic()))

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(0.3)

        calls: dict[str, Callable[[], Any]] = {
            "submit": lambda: client.post("/v1/jobs", json=body),
            "status": lambda: client.get(f"/v1/jobs/{before}"),
            "readyz": lambda: client.get("/readyz"),
            "healthz": lambda: client.get("/healthz"),
            "grpc": lambda: _grpc_code(lambda: stub.GetJob(pb.GetJobRequest(job_id=before), timeout=20)),
        }
        os.kill(stack.redis.pid or 0, signal.SIGSTOP)  # Redis hangs: connections open, no answer (the hard case)
        stopped = time.monotonic()
        try:
            with ThreadPoolExecutor(len(calls)) as pool:
                futures = {name: pool.submit(_timed, call) for name, call in calls.items()}
                during = {name: f.result() for name, f in futures.items()}
            time.sleep(max(0.0, 4.0 - (time.monotonic() - stopped)))  # an outage of 4 s at least
        finally:
            os.kill(stack.redis.pid or 0, signal.SIGCONT)
        resumed = time.monotonic()

        bound = (stack.settings.redis_retries + 1) * stack.settings.redis_timeout_s + 2.0  # retries, then answer
        for name in ("submit", "status", "readyz"):
            resp, seconds = during[name]
            assert resp.status_code == 503 and seconds < bound, (name, resp.status_code, seconds, resp.text)
        assert during["submit"][0].headers["retry-after"] == "1"
        assert during["healthz"][0].status_code == 200 and during["healthz"][1] < 1.0  # liveness does not touch Redis
        assert during["grpc"][0] == grpc.StatusCode.UNAVAILABLE and during["grpc"][1] < bound
        follower.join(timeout=bound + 5)
        assert stream_end and stream_end[0][0] == "event: error"  # the stream said so and ended: no hang
        assert stream_end[0][1] - stopped < bound + 5

        stack.queue.cancel(streaming)
        wait_ready(client.get, 20)  # after the outage
        after = client.post("/v1/jobs", json=body)
        assert after.status_code == 202
        assert stack.wait_jobs([after.json()["id"]], 30)[0].status == JobStatus.succeeded  # the worker reconnected
        assert time.monotonic() - resumed < 30 and worker.alive
        assert stub.GetJob(pb.GetJobRequest(job_id=before), timeout=10).status == pb.JOB_STATUS_SUCCEEDED
    finally:
        channel.close()
        client.close()


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    began = time.monotonic()
    result = call()
    return result, time.monotonic() - began


def _grpc_code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_graceful_api_restart_answers_a_waiting_synchronous_call_503_and_its_job_goes_on(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    worker = stack.start_worker(wait=False)
    api = stack.start_api()
    stack.wait_registered(worker)
    body, key = {"prompt": "a slow job", "steps": 80, "width": 64, "height": 64}, {"Idempotency-Key": "restart-1"}
    answers: list[tuple[httpx.Response, float]] = []

    def call() -> None:  # a synchronous client, waiting for its image while the API is restarted
        response = httpx.post(f"{api.url}/v1/txt2img", json=body, headers=key, timeout=60)
        answers.append((response, time.monotonic()))

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    with stack.client() as client:
        running_ids: list[str] = []

        def running() -> bool:
            running_ids[:] = [k.decode().rsplit(":", 1)[1] for k in client.scan_iter(f"{stack.prefix}:job:*")
                              if client.hget(k, "status") == b"running"]
            return bool(running_ids)

        wait_until(running, 30, "the job to run")
    followed: list[tuple[list[tuple[str, str | None]], float]] = []  # a progress follower on the same job (SSE)
    follower = threading.Thread(target=lambda: followed.append(_sse(f"{api.url}/v1/jobs/{running_ids[0]}/events")),
                                daemon=True)
    follower.start()
    time.sleep(1.0)  # let it connect and see some progress
    api.proc.popen.send_signal(signal.SIGTERM)  # a rolling update: the old API drains and exits
    stopped = time.monotonic()
    caller.join(timeout=30)
    follower.join(timeout=30)
    [(response, answered)] = answers
    assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
    job_id = response.json()["job_id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}" and "shutting down" in response.json()["detail"]
    assert answered - stopped < 3.0  # at once, not when the 5 s grace runs out (that was a 500 before)
    # the event stream ends as promptly, saying why, with no terminal event: the client is to reconnect
    [(frames, ended)] = followed
    assert ended - stopped < 3.0 and frames[-1] == ("shutting_down", None), frames[-3:]
    assert [kind for kind, _ in frames[:-1]] and all(kind in ("started", "progress") for kind, _ in frames[1:-1])
    assert api.proc.popen.wait(timeout=30) == 0
    assert stack.job(job_id).status in (JobStatus.running, JobStatus.succeeded)  # the job went on

    stack.start_api(port=api.port)  # the new API; the client resends with its key and gets its image
    last_seen = [event_id for _, event_id in frames if event_id][-1]
    resumed, _ = _sse(f"{api.url}/v1/jobs/{job_id}/events", last_event_id=last_seen)  # the follower reconnects
    again = httpx.post(f"{api.url}/v1/txt2img", json=body, headers=key, timeout=60)
    assert again.status_code == 200 and again.content.startswith(b"\x89PNG")
    assert again.headers["x-job-id"] == job_id and stack.job(job_id).attempts == 1  # the same run, not a new one
    assert resumed[-1][0] == "succeeded" and all(event_id != last_seen for _, event_id in resumed)  # no repeats


def _sse(url: str, last_event_id: str | None = None) -> tuple[list[tuple[str, str | None]], float]:
    """(event type, id) of each frame of an SSE stream until the server ends it, and when it ended."""
    frames: list[tuple[str, str | None]] = []
    kind, event_id = "", None
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with httpx.stream("GET", url, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("id: "):
                event_id = line[len("id: "):]
            elif line == "" and kind:
                frames.append((kind, event_id))
                kind, event_id = "", None
    return frames, time.monotonic()
