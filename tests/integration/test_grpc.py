"""The gRPC front end for real: a grpc.aio server on a free port, the test Redis, a client channel over the socket.

Two kinds of worker run the jobs:
- a real worker process (`python -m service.worker --model random:tiny-sd`, 64x64, 2 steps) for the end-to-end
  tests of Generate, GenerateStream and Inpaint: real images, their PNG parameters, same seed same bytes;
- `FakeWorker`, a consumer loop in the test that speaks the real queue protocol (claim, start, one progress call
  per step, finish with real PNG bytes, cancelled between steps, or failed with a chosen reason) without a
  model, for what the front end does with whatever a worker reports: slow steps to cancel in the middle of,
  failures of each kind, a worker that appears only after a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image, PngImagePlugin

from service.api import proto_build
from tests.helpers import drop_keys, stop_process, wait_until

proto_build.ensure()  # the stubs are a build output (`make install`); a fresh checkout gets them here

from service.api._proto.ldm.v1 import ldm_pb2 as pb  # noqa: E402
from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc  # noqa: E402
from service.api.grpc import (  # noqa: E402
    JOB_ID_METADATA,
    SERVICE_NAME,
    bound_port,
    create_grpc_server,
    serve_grpc,
    stop_grpc,
)
from service.api.grpc.convert import to_parameters, to_progress, to_request  # noqa: E402
from service.config import Settings  # noqa: E402
from service.embedded import free_port  # noqa: E402
from service.metrics import ApiMetrics  # noqa: E402
from service.queue import Claim, JobEvent, JobQueue, JobStatus, SyncJobQueue  # noqa: E402
from service.schemas import GenerationRequest, Task, admit  # noqa: E402

pytestmark = pytest.mark.timeout(60)
MODEL = "grpc-test-model"  # the fake worker's
REAL_MODEL = "random:tiny-sd"  # the real worker's
ROOT = Path(__file__).resolve().parents[2]
FAST: dict[str, Any] = {"redis_timeout_s": 2.0, "redis_connect_timeout_s": 0.5, "redis_retries": 2,
                        "redis_backoff_s": 0.05, "max_wait_ms": 20, "min_width": 32, "min_height": 32}
StatusCode = grpc.StatusCode


def params(**fields: Any) -> pb.GenerationParameters:
    return pb.GenerationParameters(**{"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 7,
                                      **fields})


def png_of(image: Image.Image, **text: object) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class FakeWorker:
    """A consumer loop on the real queue: every job gets a 'started', one 'progress' per step (with a preview PNG
    every `preview_every` steps before the last), then real PNGs (txt2img: a flat colour from the seed; inpaint: the
    input image with the mask's white area painted red)."""

    def __init__(self, settings: Settings, step_delay_s: float = 0.0, fail_with: str | None = None) -> None:
        self.settings, self.step_delay_s, self.fail_with = settings, step_delay_s, fail_with
        self.jobs_run: list[str] = []

    async def run(self) -> None:
        async with JobQueue(self.settings) as q:
            while True:
                for claim in await q.start(await q.claim(MODEL, "fake-worker", block_ms=50)):
                    await self._run(q, claim)

    async def _run(self, q: JobQueue, claim: Claim) -> None:
        request, total = claim.job.request, claim.job.request.steps
        for step in range(1, total + 1):
            await asyncio.sleep(self.step_delay_s)
            every = request.preview_every
            wants_preview = every > 0 and step % every == 0 and step < total
            preview = png_of(Image.new("RGB", (8, 8), (0, step, 0))) if wants_preview else None
            if claim.job.id in await q.progress([claim], step, total, previews={claim.job.id: preview} if preview
                                                 else None):
                await q.cancelled(claim)
                return
        if self.fail_with is not None:
            assert await q.fail(claim, self.fail_with)
            return
        pngs = [await self._png(q, claim, seed) for seed in request.seeds()]
        assert await q.finish(claim, pngs)
        self.jobs_run.append(claim.job.id)

    @staticmethod
    async def _png(q: JobQueue, claim: Claim, seed: int) -> bytes:
        request = claim.job.request
        if request.task == Task.inpaint:
            image_bytes, mask_bytes = await q.inputs(claim.job.id)
            assert image_bytes is not None and mask_bytes is not None
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
            image.paste((255, 0, 0), mask=Image.open(io.BytesIO(mask_bytes)).convert("L"))
        else:
            image = Image.new("RGB", (request.width or 64, request.height or 64), (seed % 256, 0, 0))
        return png_of(image, seed=seed, prompt=request.prompt)


@dataclass
class Env:
    settings: Settings
    queue: JobQueue
    channel: grpc.aio.Channel
    stub: pb_grpc.DiffusionStub
    worker: FakeWorker | None


StartServer = Callable[..., Awaitable[Env]]


@pytest.fixture
async def start_server(make_settings: Callable[..., Settings]) -> AsyncIterator[StartServer]:
    """start_server(worker=True, step_delay_s=0.0, fail_with=None, settings=None, **overrides) -> Env: a server
    (with a FakeWorker unless worker=False) on `settings` or on this test's settings with `overrides`; everything
    is stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, worker: bool = True, step_delay_s: float = 0.0, fail_with: str | None = None,
                        settings: Settings | None = None, metrics: ApiMetrics | None = None,
                        **overrides: Any) -> Env:
            settings = settings or make_settings(**{"grpc_port": 0, "default_model": MODEL, **overrides})
            queue = JobQueue(settings)
            stack.push_async_callback(queue.aclose)
            server = create_grpc_server(settings, queue, metrics=metrics)
            await server.start()
            stack.push_async_callback(stop_grpc, server, 0)
            limit = settings.grpc_max_message_bytes
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound_port(server)}", options=[
                ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
            stack.push_async_callback(channel.close)
            fake = FakeWorker(settings, step_delay_s, fail_with) if worker else None
            if fake is not None:
                task = asyncio.create_task(fake.run())
                stack.callback(task.cancel)
            return Env(settings, queue, channel, pb_grpc.DiffusionStub(channel), fake)

        yield start


@pytest.fixture(scope="module")
def real_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A real worker process serving random:tiny-sd (the default model) on its own key prefix; its settings."""
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=REAL_MODEL,
                        grpc_port=0, **FAST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update({f"LDM_{k.upper()}": str(v) for k, v in FAST.items()})
    env.update(LDM_REDIS_URL=redis_url, LDM_KEY_PREFIX=settings.key_prefix, LDM_WORKER_TORCH_THREADS="2")
    log = tmp_path_factory.mktemp("grpc-worker") / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "service.worker", "--model", REAL_MODEL], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    queue = SyncJobQueue(settings)
    try:
        # registered: model loaded, heartbeat written
        wait_until(lambda: bool(queue.workers(REAL_MODEL)), 50, "the worker to register", every_s=0.05, procs=[proc],
                   log=log.read_text)
        yield settings
    finally:
        stop_process(proc)
        queue.close()
        drop_keys(redis_url, settings.key_prefix)


async def job_id_of(call: Any) -> str:
    return dict(await call.initial_metadata())[JOB_ID_METADATA]


def ended_unrun(queue: JobQueue, job_id: str) -> Callable[[], Awaitable[bool]]:
    """Whether the job ended without running: cancelled, or, where the cancel came after the job's own deadline
    (the call's, a loaded box), failed as expired; either way no worker will run it."""
    async def check() -> bool:
        job = await queue.get(job_id)
        return job is not None and job.started_at is None and (
            job.status == JobStatus.cancelled
            or (job.status == JobStatus.failed and (job.error or "").startswith("deadline exceeded: not started")))
    return check


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# ----------------------------------------------------------------------------------------------- end to end

@pytest.mark.anyio
async def test_generate_with_a_real_worker_answers_every_image_with_its_parameters(
        start_server: StartServer, real_worker: Settings) -> None:
    env = await start_server(settings=real_worker, worker=False)
    request = pb.GenerateRequest(parameters=params(n=2, prompt="two circles"))
    call = env.stub.Generate(request)
    response = await call
    assert response.job_id == await job_id_of(call)
    assert [(i.index, i.seed, i.width, i.height) for i in response.images] == [(0, 7, 64, 64), (1, 8, 64, 64)]
    for image in response.images:
        png = decoded(image.png)
        assert png.format == "PNG" and png.size == (64, 64)
        assert {k: png.info[k] for k in ("seed", "steps", "sampler", "prompt", "model")} == {
            "seed": str(image.seed), "steps": "2", "sampler": "dpmpp_2m", "prompt": "two circles", "model": REAL_MODEL}
    assert response.images[0].png != response.images[1].png  # two seeds, two images
    p = response.parameters
    assert (p.model, p.seed, p.steps, p.n, p.prompt) == (REAL_MODEL, 7, 2, 2, "two circles")
    assert (p.sampler, p.guidance_scale, p.HasField("strength")) == ("dpmpp_2m", 7.5, False)  # defaults, resolved

    job = await env.stub.GetJob(pb.GetJobRequest(job_id=response.job_id, include_images=True))
    assert job.status == pb.JOB_STATUS_SUCCEEDED and job.task == pb.TASK_TXT2IMG
    assert job.results == 2 and job.step == job.total == 2 and job.attempts == 1
    assert job.created_at.ToDatetime() <= job.started_at.ToDatetime() <= job.finished_at.ToDatetime()
    assert [i.png for i in job.images] == [i.png for i in response.images]
    assert not (await env.stub.GetJob(pb.GetJobRequest(job_id=response.job_id))).images  # only on request

    again = await env.stub.Generate(request)  # a new job, the same seed: the same bytes
    assert again.job_id != response.job_id and [i.png for i in again.images] == [i.png for i in response.images]


@pytest.mark.anyio
async def test_generate_stream_with_a_real_worker_sends_progress_then_the_same_images_as_generate(
        start_server: StartServer, real_worker: Settings) -> None:
    env = await start_server(settings=real_worker, worker=False)
    request = pb.GenerateRequest(parameters=params(seed=11))
    messages = [m async for m in env.stub.GenerateStream(request)]
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["progress"] * (len(kinds) - 1) + ["image"]
    progress = [m.progress for m in messages[:-1]]
    assert progress[0].type == pb.EVENT_TYPE_QUEUED and pb.EVENT_TYPE_STARTED in [p.type for p in progress]
    steps = [p.step for p in progress if p.type == pb.EVENT_TYPE_PROGRESS]
    assert steps == sorted(steps) and steps[-1] == 2 and {p.total for p in progress[1:]} == {2}
    assert (progress[-1].type, progress[-1].status) == (pb.EVENT_TYPE_SUCCEEDED, pb.JOB_STATUS_SUCCEEDED)
    unary = await env.stub.Generate(request)
    assert messages[-1].image.png == unary.images[0].png


@pytest.mark.anyio
async def test_inpaint_with_a_real_worker_repaints_the_mask_and_keeps_every_other_pixel(
        start_server: StartServer, real_worker: Settings) -> None:
    env = await start_server(settings=real_worker, worker=False)
    image = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))  # left half: repaint
    request = pb.InpaintRequest(parameters=params(width=None, height=None, prompt="a red square"),
                                image=png_of(image), mask=png_of(mask))
    response = await env.stub.Inpaint(request)
    [result] = response.images
    out = decoded(result.png).convert("RGB")
    assert (result.width, result.height) == out.size == (64, 48)  # the size came from the image
    assert out.crop((32, 0, 64, 48)).tobytes() == image.crop((32, 0, 64, 48)).tobytes()  # kept exactly
    assert out.crop((0, 0, 32, 48)).tobytes() != image.crop((0, 0, 32, 48)).tobytes()  # repainted
    assert (response.parameters.width, response.parameters.height, response.parameters.strength) == (64, 48, 1.0)
    job = await env.stub.GetJob(pb.GetJobRequest(job_id=response.job_id))
    assert job.task == pb.TASK_INPAINT and job.status == pb.JOB_STATUS_SUCCEEDED


@pytest.mark.anyio
async def test_img2img_with_a_real_worker_starts_from_the_image(start_server: StartServer,
                                                                real_worker: Settings) -> None:
    env = await start_server(settings=real_worker, worker=False)
    image = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    request = pb.ImageRequest(parameters=params(width=None, height=None, prompt="a blue square"), image=png_of(image))
    response = await env.stub.Img2Img(request)
    [result] = response.images
    out = decoded(result.png).convert("RGB")
    assert (result.width, result.height) == out.size == (64, 48)  # the size came from the image
    assert out.tobytes() != image.tobytes()
    assert decoded(result.png).info["task"] == "img2img"
    assert (response.parameters.width, response.parameters.height, response.parameters.strength) == (64, 48, 0.75)
    job = await env.stub.GetJob(pb.GetJobRequest(job_id=response.job_id))
    assert job.task == pb.TASK_IMG2IMG and job.status == pb.JOB_STATUS_SUCCEEDED
    weaker = await env.stub.Img2Img(pb.ImageRequest(parameters=params(width=None, height=None, strength=0.3,
                                                                      prompt="a blue square"), image=png_of(image)))
    assert weaker.images[0].png != result.png  # strength reaches the worker


@pytest.mark.anyio
async def test_upscale_on_a_text_to_image_model_is_invalid_argument(start_server: StartServer,
                                                                    real_worker: Settings) -> None:
    env = await start_server(settings=real_worker, worker=False)
    image = png_of(Image.new("RGB", (32, 32), (200, 10, 10)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Upscale(pb.ImageRequest(parameters=params(width=None, height=None), image=image))
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "upscale" in (err.value.details() or "")
    layout = [pb.LayoutBox(label="red circle", x0=0.1, y0=0.1, x1=0.5, y1=0.5)]
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the worker registered its tasks: refused before queueing
        await env.stub.LayoutToImage(pb.GenerateRequest(parameters=params(prompt="", layout=layout)))
    assert err.value.code() == StatusCode.INVALID_ARGUMENT
    assert f"model {REAL_MODEL!r} cannot do layout; it can do img2img, inpaint, txt2img" in (err.value.details() or "")


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["Img2Img", "Upscale"])
async def test_image_tasks_refuse_bad_images_and_contradicting_sizes(start_server: StartServer, method: str) -> None:
    env = await start_server()
    call = getattr(env.stub, method)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pb.ImageRequest(parameters=params(width=None, height=None), image=b"not an image"))
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "image" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pb.ImageRequest(parameters=params(width=128, height=None),
                                   image=png_of(Image.new("RGB", (64, 64)))))
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "parameters.width" in (err.value.details() or "")


@pytest.mark.anyio
async def test_generate_stream_relays_every_event_of_the_job_in_order(start_server: StartServer) -> None:
    env = await start_server()  # the fake worker: one progress event per step, exactly
    call = env.stub.GenerateStream(pb.GenerateRequest(parameters=params(n=2, steps=3)))
    messages = [m async for m in call]
    job_id = await job_id_of(call)
    assert {m.job_id for m in messages} == {job_id}
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["progress"] * (len(kinds) - 2) + ["image", "image"]  # every progress message first
    progress = [m.progress for m in messages if m.HasField("progress")]
    assert [(p.type, p.status, p.step, p.total) for p in progress] == [
        (pb.EVENT_TYPE_QUEUED, pb.JOB_STATUS_QUEUED, 0, 0),
        (pb.EVENT_TYPE_STARTED, pb.JOB_STATUS_RUNNING, 0, 3),
        (pb.EVENT_TYPE_PROGRESS, pb.JOB_STATUS_RUNNING, 1, 3),
        (pb.EVENT_TYPE_PROGRESS, pb.JOB_STATUS_RUNNING, 2, 3),
        (pb.EVENT_TYPE_PROGRESS, pb.JOB_STATUS_RUNNING, 3, 3),
        (pb.EVENT_TYPE_SUCCEEDED, pb.JOB_STATUS_SUCCEEDED, 3, 3)]
    images = [m.image for m in messages if m.HasField("image")]
    assert [(i.index, i.seed) for i in images] == [(0, 7), (1, 8)]
    assert all(decoded(i.png).size == (64, 64) for i in images)
    assert await call.code() == StatusCode.OK


@pytest.mark.anyio
@pytest.mark.parametrize(("image", "mask", "parameters", "message"), [
    (b"", b"", {}, "image is empty"),
    (b"not an image at all", b"", {}, "image is not a PNG, JPEG or WebP image"),
    ("64x64", "32x32", {}, "mask is 32x32 pixels but the image is 64x64"),
    ("60x64", "60x64", {}, "multiples of 8"),
    ("64x64", "64x64", {"width": 128}, "parameters.width: width is 128 but the image's is 64"),
    ("64x64", "64x64", {"strength": 1.5}, "parameters.strength"),
])
async def test_inpaint_refuses_bad_images_with_invalid_argument(
        start_server: StartServer, image: bytes | str, mask: bytes | str, parameters: dict[str, Any],
        message: str) -> None:
    env = await start_server(worker=False)

    def encoded(spec: bytes | str) -> bytes:
        if isinstance(spec, bytes):
            return spec
        width, height = map(int, spec.split("x"))
        return png_of(Image.new("RGB", (width, height)))

    request = pb.InpaintRequest(parameters=params(**{"width": None, "height": None, **parameters}),
                                image=encoded(image), mask=encoded(mask))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Inpaint(request)
    assert err.value.code() == StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert (await env.queue.stats(MODEL)).depth == 0


# ----------------------------------------------------------------------------------------------- jobs

@pytest.mark.anyio
async def test_get_job_and_cancel_a_queued_job(start_server: StartServer) -> None:
    env = await start_server(worker=False)
    queued = await env.queue.submit(GenerationRequest(prompt="from REST", width=64, height=64, steps=2))
    job = await env.stub.GetJob(pb.GetJobRequest(job_id=queued.id))
    assert (job.id, job.model, job.status, job.parameters.prompt) == (queued.id, MODEL, pb.JOB_STATUS_QUEUED,
                                                                      "from REST")
    assert not job.HasField("started_at") and job.parameters.seed == queued.request.seed
    cancelled = await env.stub.CancelJob(pb.CancelJobRequest(job_id=queued.id))
    assert cancelled.status == pb.JOB_STATUS_CANCELLED and cancelled.HasField("finished_at")
    assert (await env.queue.stats(MODEL)).depth == 0  # no worker will ever see it
    again = await env.stub.CancelJob(pb.CancelJobRequest(job_id=queued.id))  # cancelling an ended job: no change
    assert again.status == pb.JOB_STATUS_CANCELLED


@pytest.mark.anyio
async def test_cancel_of_a_running_job_ends_its_stream_with_cancelled(start_server: StartServer) -> None:
    env = await start_server(step_delay_s=0.1)
    call = env.stub.GenerateStream(pb.GenerateRequest(parameters=params(steps=50)))
    seen: list[pb.Progress] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for message in call:
            seen.append(message.progress)
            if message.progress.type == pb.EVENT_TYPE_PROGRESS and len(seen) == 3:
                job = await env.stub.CancelJob(pb.CancelJobRequest(job_id=message.job_id))
                assert job.status == pb.JOB_STATUS_RUNNING and job.cancel_requested
    assert err.value.code() == StatusCode.CANCELLED and "was cancelled" in (err.value.details() or "")
    assert pb.EVENT_TYPE_CANCEL_REQUESTED in [p.type for p in seen]
    assert (seen[-1].type, seen[-1].status) == (pb.EVENT_TYPE_CANCELLED, pb.JOB_STATUS_CANCELLED)
    assert seen[-1].step < 50


@pytest.mark.anyio
async def test_watch_job_streams_any_jobs_events_and_resumes_after_an_event(start_server: StartServer) -> None:
    env = await start_server(step_delay_s=0.05)
    job = await env.queue.submit(GenerationRequest(prompt="from REST", width=64, height=64, steps=4))
    whole = [p async for p in env.stub.WatchJob(pb.WatchJobRequest(job_id=job.id))]
    assert [(p.type, p.step) for p in whole] == [
        (pb.EVENT_TYPE_QUEUED, 0), (pb.EVENT_TYPE_STARTED, 0), *[(pb.EVENT_TYPE_PROGRESS, i) for i in range(1, 5)],
        (pb.EVENT_TYPE_SUCCEEDED, 4)]
    assert [p.event_id for p in whole] == [e.id for e in await env.queue.events(job.id)]  # Redis's own ids
    rest = [p async for p in env.stub.WatchJob(pb.WatchJobRequest(job_id=job.id, after_event_id=whole[2].event_id))]
    assert rest == whole[3:]  # resumed exactly after the event named
    done = await env.stub.GetJob(pb.GetJobRequest(job_id=job.id, include_images=True))
    assert done.status == pb.JOB_STATUS_SUCCEEDED and len(done.images) == 1


@pytest.mark.anyio
async def test_previews_every_k_steps_arrive_as_png_bytes_in_progress(start_server: StartServer) -> None:
    env = await start_server()
    call = env.stub.GenerateStream(pb.GenerateRequest(parameters=params(steps=5, preview_every=2)))
    progress = [m.progress for m in [m async for m in call] if m.HasField("progress")]
    shown = {p.step: p.preview for p in progress if p.type == pb.EVENT_TYPE_PROGRESS and p.preview}
    assert sorted(shown) == [2, 4]
    assert all(Image.open(io.BytesIO(data)).format == "PNG" for data in shown.values())
    job = await env.stub.GetJob(pb.GetJobRequest(job_id=await job_id_of(call)))
    assert job.parameters.preview_every == 2


@pytest.mark.anyio
async def test_watch_job_ends_ok_when_the_job_fails(start_server: StartServer) -> None:
    env = await start_server(step_delay_s=0.05, fail_with="invalid_input: a bad input")
    failing = await env.queue.submit(GenerationRequest(prompt="x", width=64, height=64, steps=2))
    seen = [p async for p in env.stub.WatchJob(pb.WatchJobRequest(job_id=failing.id))]
    assert (seen[-1].type, seen[-1].status) == (pb.EVENT_TYPE_FAILED, pb.JOB_STATUS_FAILED)
    assert "a bad input" in seen[-1].error


@pytest.mark.anyio
async def test_leaving_a_watch_leaves_the_job_alone(start_server: StartServer) -> None:
    quiet = await start_server(worker=False)
    queued = await quiet.queue.submit(GenerationRequest(prompt="x", width=64, height=64, steps=2))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the watcher gives up; the job is not tied to its call
        [p async for p in quiet.stub.WatchJob(pb.WatchJobRequest(job_id=queued.id), timeout=0.5)]
    assert err.value.code() == StatusCode.DEADLINE_EXCEEDED
    record = await quiet.queue.get(queued.id)
    assert record is not None and record.status == JobStatus.queued
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [p async for p in quiet.stub.WatchJob(pb.WatchJobRequest(job_id=queued.id, after_event_id="soon"))]
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "after_event_id" in (err.value.details() or "")


@pytest.mark.anyio
async def test_unknown_job_is_not_found(start_server: StartServer) -> None:
    env = await start_server(worker=False)
    for job_id in ("0" * 32, "not-a-job-id", ""):
        for rpc, request in ((env.stub.GetJob, pb.GetJobRequest(job_id=job_id)),
                             (env.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc(request)
            assert err.value.code() == StatusCode.NOT_FOUND and f"no job {job_id!r}" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [p async for p in env.stub.WatchJob(pb.WatchJobRequest(job_id=job_id))]
        assert err.value.code() == StatusCode.NOT_FOUND and f"no job {job_id!r}" in (err.value.details() or "")


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.anyio
@pytest.mark.parametrize(("fields", "messages"), [
    ({"width": 100}, ["parameters.width: width must be a multiple of 8, got 100"]),
    ({"height": 4096}, ["parameters.height: height must be between 32 and 1024 pixels"]),
    ({"steps": 0}, ["parameters.steps: Input should be greater than or equal to 1"]),
    ({"steps": 5000}, ["parameters.steps: steps must be between 1 and 1000, got 5000"]),
    ({"sampler": "heun"}, ["parameters.sampler: Input should be 'ddpm', 'ddim', 'plms', 'dpmpp_2m' or 'euler_a'"]),
    ({"sampler": "ddim", "karras": True, "n": 99},
     ["parameters.n: n must be between 1 and 8", "parameters.karras: karras sigmas are supported by dpmpp_2m only"]),
    ({"seed": -1}, ["parameters.seed: Input should be greater than or equal to 0"]),
    ({"guidance_scale": float("nan")}, ["parameters.guidance_scale: Input should be a finite number"]),
    ({"model": "bad model name!"}, ["parameters.model: String should match pattern"]),
])
async def test_invalid_parameters_are_invalid_argument_naming_each_field(
        start_server: StartServer, fields: dict[str, Any], messages: list[str]) -> None:
    env = await start_server(worker=False)
    for rpc in (env.stub.Generate, env.stub.GenerateStream):
        call = rpc(pb.GenerateRequest(parameters=params(**fields)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call if rpc is env.stub.Generate else [m async for m in call]
        assert err.value.code() == StatusCode.INVALID_ARGUMENT
        for message in messages:
            assert message in (err.value.details() or "")
    assert (await env.queue.stats(MODEL)).depth == 0  # nothing was queued


@pytest.mark.anyio
async def test_full_queue_is_resource_exhausted_with_retry_after(start_server: StartServer) -> None:
    env = await start_server(worker=False, queue_max_depth=1, queue_retry_after_s=7)
    await env.queue.submit(GenerationRequest(prompt="first", width=64, height=64, steps=2))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Generate(pb.GenerateRequest(parameters=params()))
    assert err.value.code() == StatusCode.RESOURCE_EXHAUSTED and "is full" in (err.value.details() or "")
    assert ("retry-after", "7") in tuple(err.value.trailing_metadata() or ())


@pytest.mark.anyio
async def test_unreachable_redis_is_unavailable_and_not_serving(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", grpc_port=0,
                             grpc_health_interval_s=0.1)
    server = create_grpc_server(settings)  # opens (and will close) its own queue
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound_port(server)}") as channel:
            stub = pb_grpc.DiffusionStub(channel)
            for call in (stub.Generate(pb.GenerateRequest(parameters=params())),
                         stub.GetJob(pb.GetJobRequest(job_id="0" * 32))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == StatusCode.UNAVAILABLE
                assert "the job queue is unavailable" in (err.value.details() or "")
            health = health_pb2_grpc.HealthStub(channel)

            async def not_serving() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

            await eventually(not_serving)
    finally:
        await stop_grpc(server, 0)


@pytest.mark.anyio
async def test_short_deadline_without_worker_is_deadline_exceeded_and_cancels_the_job(
        start_server: StartServer) -> None:
    env = await start_server(worker=False)
    started = time.monotonic()
    call = env.stub.Generate(pb.GenerateRequest(parameters=params()), timeout=0.8)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
    job_id = await job_id_of(call)
    # nobody waits for it any more, so no worker will spend time on it (the servicer cancels it as the call ends;
    # on a loaded machine that can take a few seconds)
    await eventually(ended_unrun(env.queue, job_id), timeout_s=20.0)


@pytest.mark.anyio
async def test_deadline_with_idempotency_key_leaves_the_job_for_a_retry(start_server: StartServer) -> None:
    env = await start_server(worker=False)
    metadata = (("idempotency-key", "retry-me"),)
    call = env.stub.Generate(pb.GenerateRequest(parameters=params()), timeout=0.5, metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == StatusCode.DEADLINE_EXCEEDED
    job_id = await job_id_of(call)
    await asyncio.sleep(0.2)
    job = await env.queue.get(job_id)
    assert job is not None and job.status == JobStatus.queued  # left for the retry
    worker = FakeWorker(env.settings)
    task = asyncio.create_task(worker.run())
    try:
        retry = env.stub.Generate(pb.GenerateRequest(parameters=params(), idempotency_key="retry-me"), timeout=10)
        response = await retry
    finally:
        task.cancel()
    assert response.job_id == job_id == await job_id_of(retry) and worker.jobs_run == [job_id]


@pytest.mark.anyio
async def test_a_client_leaving_a_stream_cancels_its_job(start_server: StartServer) -> None:
    env = await start_server(worker=False)
    call = env.stub.GenerateStream(pb.GenerateRequest(parameters=params()))
    first = await call.read()
    assert first.progress.type == pb.EVENT_TYPE_QUEUED
    call.cancel()

    async def cancelled() -> bool:
        job = await env.queue.get(first.job_id)
        return job is not None and job.status == JobStatus.cancelled

    await eventually(cancelled)


@pytest.mark.anyio
@pytest.mark.parametrize(("error", "code"), [
    ("unsupported: grpc-test-model is a text-to-image model; it cannot upscale", StatusCode.INVALID_ARGUMENT),
    ("out_of_memory: even one sample does not fit", StatusCode.RESOURCE_EXHAUSTED),
    ("internal: the sampler produced NaNs", StatusCode.INTERNAL),
])
async def test_a_failed_job_answers_the_status_of_its_reason(start_server: StartServer, error: str,
                                                             code: grpc.StatusCode) -> None:
    env = await start_server(fail_with=error)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Generate(pb.GenerateRequest(parameters=params()))
    assert err.value.code() == code and error in (err.value.details() or "")
    messages: list[pb.GenerateStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for message in env.stub.GenerateStream(pb.GenerateRequest(parameters=params())):
            messages.append(message)
    assert err.value.code() == code
    last = messages[-1].progress
    assert (last.type, last.status, last.error) == (pb.EVENT_TYPE_FAILED, pb.JOB_STATUS_FAILED, error)


@pytest.mark.anyio
async def test_an_unexpected_error_is_internal_without_its_details(start_server: StartServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env = await start_server(worker=False)

    async def broken(job_id: str) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(env.queue, "get", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.GetJob(pb.GetJobRequest(job_id="0" * 32))
    assert err.value.code() == StatusCode.INTERNAL
    assert "RuntimeError" in (err.value.details() or "") and "secret" not in (err.value.details() or "")


@pytest.mark.anyio
async def test_idempotency_key_answers_the_same_job_and_refuses_another_request(start_server: StartServer) -> None:
    env = await start_server()
    request = pb.GenerateRequest(parameters=params(seed=None))  # a random seed, resolved once
    first = await env.stub.Generate(request, metadata=(("idempotency-key", "k1"),))
    again = await env.stub.Generate(pb.GenerateRequest(parameters=params(seed=None), idempotency_key="k1"))
    assert again.job_id == first.job_id and [i.png for i in again.images] == [i.png for i in first.images]
    assert env.worker is not None and env.worker.jobs_run == [first.job_id]  # it ran once
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Generate(pb.GenerateRequest(parameters=params(prompt="something else"), idempotency_key="k1"))
    assert err.value.code() == StatusCode.ALREADY_EXISTS and "different request" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Generate(pb.GenerateRequest(parameters=params(), idempotency_key="k3"),
                                metadata=(("idempotency-key", "k2"),))
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "differ" in (err.value.details() or "")


@pytest.mark.anyio
async def test_message_size_limit_is_the_configured_one(start_server: StartServer) -> None:
    env = await start_server(worker=False, grpc_max_message_bytes=6 * 2**20)
    big = pb.InpaintRequest(parameters=params(), image=b"\0" * (5 * 2**20), mask=b"\0")  # over grpc's 4 MiB default
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Inpaint(big)
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "image is not a PNG" in (err.value.details() or "")
    too_big = pb.InpaintRequest(parameters=params(), image=b"\0" * (7 * 2**20), mask=b"\0")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.Inpaint(too_big)
    assert err.value.code() == StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.anyio
async def test_malformed_request_bytes_are_invalid_argument_and_the_server_lives_on(
        start_server: StartServer) -> None:
    env = await start_server()
    raw = env.channel.unary_unary("/ldm.v1.Diffusion/Generate")  # no serializers: bytes go out as they are
    for garbage in (b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05\xff\xfe\xfd\xfc\xfb", b"\xff" * 32):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(garbage)
        assert err.value.code() == StatusCode.INVALID_ARGUMENT
        assert "not a valid message for /ldm.v1.Diffusion/Generate" in (err.value.details() or "")
    response = await env.stub.Generate(pb.GenerateRequest(parameters=params()))
    assert len(response.images) == 1


# ----------------------------------------------------------------------------------------------- health, reflection

@pytest.mark.anyio
async def test_health_is_serving_for_the_server_and_the_service(start_server: StartServer) -> None:
    env = await start_server(worker=False)
    health = health_pb2_grpc.HealthStub(env.channel)

    async def serving() -> bool:  # NOT_SERVING until the first Redis ping, milliseconds after start
        replies = [await health.Check(health_pb2.HealthCheckRequest(service=s)) for s in ("", SERVICE_NAME)]
        return all(r.status == health_pb2.HealthCheckResponse.SERVING for r in replies)

    await eventually(serving)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == StatusCode.NOT_FOUND


@pytest.mark.anyio
async def test_reflection_lists_and_describes_the_service(start_server: StartServer) -> None:
    env = await start_server(worker=False)
    stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]
    listed, described = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    [service] = [s for f in files if f.package == "ldm.v1" for s in f.service]
    assert [m.name for m in service.method] == ["Generate", "GenerateStream", "Inpaint", "Img2Img", "Upscale",
                                                "ClassToImage", "LayoutToImage", "SemanticToImage", "Unconditional",
                                                "GetJob", "WatchJob", "CancelJob"]
    assert [m.server_streaming for m in service.method] == [False, True] + [False] * 8 + [True, False]


@pytest.mark.anyio
async def test_every_call_is_counted_by_method_and_status_code(start_server: StartServer) -> None:
    metrics = ApiMetrics()
    env = await start_server(metrics=metrics)
    await env.stub.Generate(pb.GenerateRequest(parameters=params()))
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await env.stub.GetJob(pb.GetJobRequest(job_id="0" * 32))
    [message async for message in env.stub.GenerateStream(pb.GenerateRequest(parameters=params()))]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("ldm_grpc_requests_total", method="Generate", code="OK") == 1
    assert sample("ldm_grpc_requests_total", method="GetJob", code="NOT_FOUND") == 2
    assert sample("ldm_grpc_requests_total", method="GenerateStream", code="OK") == 1
    assert sample("ldm_grpc_request_duration_seconds_count", method="GetJob") == 2


@pytest.mark.anyio
async def test_serve_grpc_runs_until_stopped_then_stops_gracefully(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(grpc_port=free_port(), grpc_shutdown_grace_s=1.0)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_grpc(settings, stop=stop))  # with its own queue
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving_ok() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving_ok)
        stop.set()
        await asyncio.wait_for(serving, 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert err.value.code() == StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------------------------- conversions

def test_every_status_event_and_task_has_a_proto_enum_value() -> None:
    for status in JobStatus:
        event = JobEvent(id="1-0", type="queued", status=status, at=0.0)
        assert pb.JobStatus.Name(to_progress(event).status) == f"JOB_STATUS_{status.name.upper()}"
    for kind in ("queued", "started", "progress", "requeued", "cancel_requested", "succeeded", "failed",
                 "cancelled"):
        event = JobEvent(id="1-0", type=kind, status=JobStatus.running, at=0.0)  # type: ignore[arg-type]
        assert pb.EventType.Name(to_progress(event).type) == f"EVENT_TYPE_{kind.upper()}"
    assert {pb.Task.Name(v) for v in pb.Task.values()} == {"TASK_UNSPECIFIED"} | {f"TASK_{t.value.upper()}"
                                                                                   for t in Task}


def test_parameters_round_trip_through_the_proto(make_settings: Callable[..., Settings]) -> None:
    request = admit(GenerationRequest(prompt="p", negative_prompt="n", seed=3, steps=9, sampler="ddim", eta=0.5,
                                      guidance_scale=4.25, width=96, height=64, n=2), make_settings())
    message = pb.GenerationParameters.FromString(to_parameters(request).SerializeToString())
    assert to_request(message, Task.txt2img) == request
