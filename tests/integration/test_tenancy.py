"""Tenancy: a job belongs to the API key that submitted it, over REST and gRPC, against a real uvicorn, a real
grpc.aio server and the test Redis.

The contract (docs/operations.md): every read, image download, event stream and cancel of another key's job
answers exactly as an unknown id does (same status, same body but for the id the caller sent), so a leaked job id
neither opens the job nor confirms it exists; a key with `role=admin` in the key file sees and cancels every job;
idempotency keys are per API key, and a conflict names no job.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from PIL import Image

from service.auth import KEY_ID_CHARS, hash_key, new_key, parse_key_file
from service.config import Settings
from service.queue import JobQueue, SyncJobQueue
from tests.integration.secure import TXT, bearer, grpc_auth, grpc_serving, params, pb
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(60)
MODEL = "tiny-shapes"  # the default model: submissions need no live worker to be accepted
UNKNOWN = "f" * 32
JOB_ID = re.compile(r"[0-9a-f]{32}")


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Tenants:
    """Three keys in a key file: two tenants and an operator with the admin role."""

    alice: str
    bob: str
    admin: str

    @classmethod
    def fresh(cls) -> Tenants:
        return cls(new_key(), new_key(), new_key())

    def key_file(self, tmp_path: Path) -> Path:
        path = tmp_path / "api-keys"
        path.write_text(f"{hash_key(self.alice)} alice\n{hash_key(self.bob)} team bob\n"
                        f"{hash_key(self.admin)} ops role=admin  # operators\n")
        return path


@pytest.fixture
def tenants() -> Tenants:
    return Tenants.fresh()


@pytest.fixture
def app(make_settings: Callable[..., Settings], tenants: Tenants, tmp_path: Path) -> Iterator[Api]:
    with serving(make_settings(api_key_file=tenants.key_file(tmp_path))) as api:
        yield api


def finish_next(settings: Settings) -> str:
    """Play a worker: claim the oldest queued job and finish it with one PNG; its id."""
    with SyncJobQueue(settings) as q:
        claims = q.start(q.claim(MODEL, "test-worker", count=1, block_ms=100))
        assert len(claims) == 1
        assert q.finish(claims[0], [png()])
        return claims[0].job.id


def same_as_unknown(resp: httpx.Response, unknown: httpx.Response, job_id: str) -> None:
    """`resp` (on `job_id`) is the answer to an unknown id (`UNKNOWN`): status, type and body but for the id."""
    assert resp.status_code == unknown.status_code == 404, resp.text
    assert resp.headers["content-type"] == unknown.headers["content-type"]
    assert resp.text.replace(job_id, "<id>") == unknown.text.replace(UNKNOWN, "<id>")


# ------------------------------------------------------------------------------------------------ the key file

def test_the_key_file_gives_roles_and_refuses_unknown_ones() -> None:
    ring = parse_key_file(f"{hash_key('a')} alice\n{hash_key('o')} the ops team role=admin\n", "keys")
    alice, ops = ring.check("a"), ring.check("o")
    assert (alice.label, alice.admin, ops.label, ops.admin) == ("alice", False, "the ops team", True)
    assert alice.key_id == hash_key("a")[:KEY_ID_CHARS]
    assert alice.sees(alice.key_id) and not alice.sees(ops.key_id) and not alice.sees("")
    assert ops.sees(alice.key_id) and ops.sees("")
    with pytest.raises(ValueError, match="line 1: unknown role"):
        parse_key_file(f"{hash_key('a')} alice role=root\n", "keys")


# ------------------------------------------------------------------------------------------------ REST

def test_another_keys_job_answers_as_an_unknown_one_on_every_path(app: Api, tenants: Tenants) -> None:
    c, alice, bob, admin = app.client, bearer(tenants.alice), bearer(tenants.bob), bearer(tenants.admin)
    done = c.post("/v1/jobs", json=TXT, headers=alice).json()["id"]
    assert finish_next(app.settings) == done
    waiting = c.post("/v1/jobs", json=TXT, headers=alice).json()["id"]
    paths = ["", "/images/0", "/events"]
    for job_id in (done, waiting):
        for path in paths:
            unknown = c.get(f"/v1/jobs/{UNKNOWN}{path}", headers=bob)
            same_as_unknown(c.get(f"/v1/jobs/{job_id}{path}", headers=bob), unknown, job_id)
        same_as_unknown(c.delete(f"/v1/jobs/{job_id}", headers=bob), c.delete(f"/v1/jobs/{UNKNOWN}", headers=bob),
                        job_id)
    assert c.get(f"/v1/jobs/{waiting}", headers=alice).json()["status"] == "queued"  # bob's cancel did nothing

    view = c.get(f"/v1/jobs/{done}", headers=alice).json()
    assert view["status"] == "succeeded" and "worker" not in view and "owner" not in view
    assert "test-worker" not in c.get(f"/v1/jobs/{done}/events", headers=alice).text
    for who in (alice, admin):  # the owner and the admin key see it all
        assert c.get(f"/v1/jobs/{done}", headers=who).json() == view
        assert c.get(f"/v1/jobs/{done}/images/0", headers=who).content == png()
        assert "event: succeeded" in c.get(f"/v1/jobs/{done}/events", headers=who).text
    assert c.get(f"/v1/jobs/{waiting}/images/0", headers=admin).status_code == 409  # not ready: seen, not hidden
    cancelled = c.delete(f"/v1/jobs/{waiting}", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_three_keys_each_see_their_own_jobs_and_the_admin_all(app: Api, tenants: Tenants) -> None:
    c = app.client
    keys = {"alice": tenants.alice, "bob": tenants.bob, "admin": tenants.admin}
    jobs = {name: c.post("/v1/jobs", json=TXT, headers=bearer(key)).json()["id"] for name, key in keys.items()}
    for name, key in keys.items():
        visible = {owner for owner, job_id in jobs.items()
                   if c.get(f"/v1/jobs/{job_id}", headers=bearer(key)).status_code == 200}
        assert visible == (set(jobs) if name == "admin" else {name})


def test_idempotency_keys_do_not_cross_api_keys_and_a_conflict_names_no_job(app: Api, tenants: Tenants) -> None:
    c, alice, bob = app.client, bearer(tenants.alice), bearer(tenants.bob)
    first = c.post("/v1/jobs", json=TXT, headers={**alice, "Idempotency-Key": "order-1"}).json()["id"]
    theirs = c.post("/v1/jobs", json=TXT, headers={**bob, "Idempotency-Key": "order-1"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first  # bob's own job, not alice's
    assert c.post("/v1/jobs", json=TXT, headers={**alice, "Idempotency-Key": "order-1"}).json()["id"] == first
    assert c.post("/v1/jobs", json=TXT, headers={**bob, "Idempotency-Key": "order-1"}).json()["id"] == \
        theirs.json()["id"]
    other = {**TXT, "seed": 8}
    for who in (alice, bob):
        conflict = c.post("/v1/jobs", json=other, headers={**who, "Idempotency-Key": "order-1"})
        assert conflict.status_code == 409 and "different request" in conflict.json()["detail"]
        assert not JOB_ID.search(conflict.text), conflict.text


# ------------------------------------------------------------------------------------------------ gRPC

async def grpc_submit(stub: Any, key: str, idempotency_key: str, **fields: object) -> str:
    """Submit over gRPC with an idempotency key and leave once the job id arrives; its id. The job stays queued (a
    call with an idempotency key leaves its job when the client goes; no worker here). GenerateStream, whose
    initial metadata reaches the client at once: grpc.aio's unary client receives it only with the call's end, so a
    short deadline could pass before the server had sent it on two busy cores (seen in CI)."""
    call = stub.GenerateStream(pb.GenerateRequest(parameters=params(**fields), idempotency_key=idempotency_key),
                               metadata=grpc_auth(key), timeout=30)
    job_id = str(dict(await call.initial_metadata())["ldm-job-id"])
    call.cancel()
    return job_id


async def grpc_error(call: Any, stream: bool = False) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await (call.read() if stream else call)
    return err.value


@pytest.mark.anyio
async def test_grpc_another_keys_job_is_not_found_and_the_admin_sees_it(
        make_settings: Callable[..., Settings], tenants: Tenants, tmp_path: Path) -> None:
    settings = make_settings(api_key_file=tenants.key_file(tmp_path))
    async with grpc_serving(settings) as env, JobQueue(settings) as q:
        s, bob, admin = env.stub, grpc_auth(tenants.bob), grpc_auth(tenants.admin)
        done = await grpc_submit(s, tenants.alice, "a-1")
        claims = await q.start(await q.claim(MODEL, "test-worker", count=1, block_ms=100))
        assert [c.job.id for c in claims] == [done] and await q.finish(claims[0], [png()])
        waiting = await grpc_submit(s, tenants.alice, "a-2")
        for job_id in (done, waiting):
            calls: list[Callable[[str], Any]] = [
                lambda i: grpc_error(s.GetJob(pb.GetJobRequest(job_id=i), metadata=bob, timeout=5)),
                lambda i: grpc_error(s.GetJob(pb.GetJobRequest(job_id=i, include_images=True), metadata=bob,
                                              timeout=5)),
                lambda i: grpc_error(s.WatchJob(pb.WatchJobRequest(job_id=i), metadata=bob, timeout=5), stream=True),
                lambda i: grpc_error(s.CancelJob(pb.CancelJobRequest(job_id=i), metadata=bob, timeout=5))]
            for call in calls:
                theirs, unknown = await call(job_id), await call(UNKNOWN)
                assert theirs.code() == unknown.code() == grpc.StatusCode.NOT_FOUND
                assert (theirs.details() or "").replace(job_id, "<id>") == (unknown.details() or "").replace(
                    UNKNOWN, "<id>")
        assert (await q.get(waiting)).status.value == "queued"  # type: ignore[union-attr]

        for key in (tenants.alice, tenants.admin):  # the owner and the admin key see it all
            job = await s.GetJob(pb.GetJobRequest(job_id=done, include_images=True), metadata=grpc_auth(key),
                                 timeout=5)
            assert job.status == pb.JOB_STATUS_SUCCEEDED and [i.png for i in job.images] == [png()]
            watch = s.WatchJob(pb.WatchJobRequest(job_id=done), metadata=grpc_auth(key), timeout=5)
            assert [e.type async for e in watch][-1] == pb.EVENT_TYPE_SUCCEEDED
        cancelled = await s.CancelJob(pb.CancelJobRequest(job_id=waiting), metadata=admin, timeout=5)
        assert cancelled.status == pb.JOB_STATUS_CANCELLED


@pytest.mark.anyio
async def test_grpc_idempotency_keys_do_not_cross_api_keys_and_a_conflict_names_no_job(
        make_settings: Callable[..., Settings], tenants: Tenants, tmp_path: Path) -> None:
    settings = make_settings(api_key_file=tenants.key_file(tmp_path))
    async with grpc_serving(settings) as env:
        s = env.stub
        first = await grpc_submit(s, tenants.alice, "shared")
        theirs = await grpc_submit(s, tenants.bob, "shared")
        assert theirs != first
        assert await grpc_submit(s, tenants.alice, "shared") == first
        assert await grpc_submit(s, tenants.bob, "shared") == theirs
        for key in (tenants.alice, tenants.bob):
            call = s.Generate(pb.GenerateRequest(parameters=params(seed=8), idempotency_key="shared"),
                              metadata=grpc_auth(key), timeout=5)
            err = await grpc_error(call)
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS and not JOB_ID.search(err.details() or "")


# ------------------------------------------------------------------------------------------------ no keys

def test_without_keys_every_caller_sees_every_job(make_settings: Callable[..., Settings]) -> None:
    with serving(make_settings()) as api:
        job_id = api.client.post("/v1/jobs", json=TXT).json()["id"]
        assert api.client.get(f"/v1/jobs/{job_id}", headers=bearer(new_key())).status_code == 200  # keys ignored
        assert api.client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


# ------------------------------------------------------------------------------------------------ gRPC: key first

@pytest.mark.anyio
async def test_grpc_refuses_an_unauthenticated_large_message_from_its_metadata(
        make_settings: Callable[..., Settings], tenants: Tenants, tmp_path: Path) -> None:
    """The key is checked when the method is looked up, before the message is read: a 48 MiB Inpaint without a
    key, on a server that receives at most 4 MiB, is answered UNAUTHENTICATED, where the same message with a key is
    RESOURCE_EXHAUSTED (received until the limit): the refused one was never received, let alone parsed. So is a
    server-streaming call; counted like any refusal."""
    settings = make_settings(api_key_file=tenants.key_file(tmp_path), grpc_max_message_bytes=4 << 20)
    async with grpc_serving(settings) as env:
        big = pb.InpaintRequest(parameters=params(), image=b"\0" * (48 << 20), mask=b"\0")
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               (grpc_auth(new_key()), grpc.StatusCode.UNAUTHENTICATED)):
            err = await grpc_error(env.stub.Inpaint(big, metadata=metadata, timeout=20))
            assert err.code() == code, err.details()
        err = await grpc_error(env.stub.WatchJob(pb.WatchJobRequest(job_id=UNKNOWN), timeout=5), stream=True)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = await grpc_error(env.stub.Inpaint(big, metadata=grpc_auth(tenants.alice), timeout=20))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # with the key, the message is read: too large
        sample = env.metrics.registry.get_sample_value
        assert sample("ldm_auth_failures_total", {"front_end": "grpc", "reason": "missing"}) == 2
        assert sample("ldm_grpc_requests_total", {"method": "Inpaint", "code": "UNAUTHENTICATED"}) == 2
