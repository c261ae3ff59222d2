"""A worker with `LDM_BATCHING=continuous` as a real process on a real Redis (`random:tiny-sd` at 64x64), beside a
static one on its own key prefix that makes the reference PNGs.

Jobs with other step counts and samplers, submitted while a long job runs, join its batch at a step boundary and
leave it when done, and their PNGs (and the long job's) are byte for byte what the static worker makes; a cancelled
job leaves mid-run while the others go on; `preview_every` puts a PNG preview in the progress events seen over SSE.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
from PIL import Image

from service.queue import JobStatus
from service.schemas import GenerationRequest
from tests.helpers import wait_until
from tests.integration.test_rest import serving, sse
from tests.integration.test_worker import MODEL, Cluster, WorkerProcess, cluster, metric, request

pytestmark = pytest.mark.timeout(240)
JOINED = f'ldm_samples_joined_mid_run_total{{model="{MODEL}"}}'


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[tuple[Cluster, WorkerProcess, Cluster]]:
    """A continuous worker (its cluster and process) and a static one (its cluster)."""
    with cluster(redis_url, tmp_path_factory.mktemp("continuous"), batching="continuous") as cont, \
            cluster(redis_url, tmp_path_factory.mktemp("static"), batching="static") as static:
        static.spawn()
        yield cont, cont.spawn(), static


def static_pngs(static: Cluster, requests: list[GenerationRequest]) -> list[list[bytes | None]]:
    jobs = [static.queue.submit(r) for r in requests]
    done = [static.wait(j.id, timeout_s=120) for j in jobs]
    assert all(d.status == JobStatus.succeeded for d in done)
    return [[static.queue.result(j.id, i) for i in range(j.request.n)] for j in jobs]


def test_jobs_join_a_running_batch_mid_run_and_make_the_static_pngs(
        workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    cont, worker, static = workers
    before = metric(worker.scrape(), JOINED)
    long = request(steps=150, seed=3)
    joiners = [request(prompt="a blue square", seed=7, steps=3, sampler="ddim"),
               request(prompt="a green cat", seed=8, steps=5, sampler="euler_a", guidance_scale=2.0, n=2),
               request(seed=9, steps=4, sampler="plms")]
    blocker = cont.queue.submit(long)
    wait_until(lambda: cont.job(blocker.id).step >= 2, 60, "the long job to run")
    jobs = [cont.queue.submit(r) for r in joiners]
    finished = [cont.wait(j.id) for j in jobs]
    assert all(j.status == JobStatus.succeeded for j in finished), [j.error for j in finished]
    ran_beside = cont.job(blocker.id)
    assert ran_beside.status == JobStatus.running and ran_beside.step < 150  # they joined and left while it ran
    assert cont.wait(blocker.id, timeout_s=120).status == JobStatus.succeeded
    assert metric(worker.scrape(), JOINED) - before == sum(r.n for r in joiners)
    got = [[cont.queue.result(j.id, i) for i in range(j.request.n)] for j in (blocker, *jobs)]
    assert all(p is not None for pngs in got for p in pngs)
    assert got == static_pngs(static, [long, *joiners])


def test_a_cancelled_job_leaves_mid_run_and_the_others_go_on(
        workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    cont, _, static = workers
    stays = request(steps=60, seed=6, sampler="ddim")
    doomed = cont.queue.submit(request(steps=400, seed=5))
    wait_until(lambda: cont.job(doomed.id).step >= 1, 60, "the doomed job to run")
    other = cont.queue.submit(stays)
    wait_until(lambda: cont.job(other.id).step >= 1, 60, "the other job to join")
    assert cont.queue.cancel(doomed.id) == JobStatus.running
    cancelled = cont.wait(doomed.id, timeout_s=30)
    assert cancelled.status == JobStatus.cancelled and cancelled.step < 400 and cancelled.results == 0
    assert cont.job(other.id).status == JobStatus.running  # it left while the other ran on
    assert cont.wait(other.id, timeout_s=60).status == JobStatus.succeeded
    assert [[cont.queue.result(other.id, 0)]] == static_pngs(static, [stays])


def test_previews_every_k_steps_arrive_over_sse_as_pngs(workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    cont, worker, _ = workers
    job = cont.queue.submit(request(steps=12, preview_every=4))
    assert cont.wait(job.id).status == JobStatus.succeeded
    with serving(cont.settings) as api:
        frames = sse(api.client, f"/v1/jobs/{job.id}/events")
    progress = [json.loads(f.data) for f in frames if f.event == "progress" and f.data]
    assert [p["step"] for p in progress] == list(range(1, 13))
    with_preview = {p["step"]: p["preview"] for p in progress if p.get("preview")}
    assert sorted(with_preview) == [4, 8]  # every 4 steps, none for the final image
    for data in with_preview.values():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and max(image.size) <= 256
    assert metric(worker.scrape(), f'ldm_preview_seconds_count{{model="{MODEL}"}}') >= 2


def test_a_static_worker_sends_previews_too_and_the_same_image(
        workers: tuple[Cluster, WorkerProcess, Cluster]) -> None:
    """`LDM_BATCHING=static` honours `preview_every` as continuous mode does (every k steps, none for the final
    image), and watching the x0 estimates leaves the image byte for byte as it is without previews."""
    _, _, static = workers
    job = static.queue.submit(request(steps=6, preview_every=2, seed=5))
    plain = static.queue.submit(request(steps=6, seed=5))
    assert static.wait(job.id, timeout_s=120).status == JobStatus.succeeded
    assert static.wait(plain.id, timeout_s=120).status == JobStatus.succeeded
    assert static.queue.result(job.id, 0) == static.queue.result(plain.id, 0)
    with serving(static.settings) as api:
        frames = sse(api.client, f"/v1/jobs/{job.id}/events")
        plain_frames = sse(api.client, f"/v1/jobs/{plain.id}/events")
    progress = [json.loads(f.data) for f in frames if f.event == "progress" and f.data]
    assert [p["step"] for p in progress] == list(range(1, 7))
    with_preview = {p["step"]: p["preview"] for p in progress if p.get("preview")}
    assert sorted(with_preview) == [2, 4]
    for data in with_preview.values():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and max(image.size) <= 256 and image.size[0] == image.size[1]
    assert not any(json.loads(f.data).get("preview") for f in plain_frames if f.event == "progress" and f.data)
    scraped = static.workers[0].scrape()
    assert metric(scraped, f'ldm_preview_seconds_count{{model="{MODEL}"}}') >= 2
