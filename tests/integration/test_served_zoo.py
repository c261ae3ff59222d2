"""CompVis zoo checkpoints served for real: `python -m service.worker --model DIR/model.ckpt` (its config.yaml
beside it) registers the model under its folder's name with the tasks its conditioning allows, and REST jobs run
through it: cin256-v2 by class id, inpainting_big's masked-image inpainting (unmasked pixels returned exactly), and
cin256 (v1: no null class) at its own default guidance, 1, when a request gives none, refusing any other scale.
The checkpoints are tests/compvis_zoo.py's reduced random-weight ones."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api import proto_build

proto_build.ensure()  # the stubs are a build output (`make install`); a fresh checkout gets them here

from service.api._proto.ldm.v1 import ldm_pb2 as pb  # noqa: E402
from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc  # noqa: E402
from service.api.grpc import bound_port, create_grpc_server, stop_grpc  # noqa: E402
from service.config import Settings  # noqa: E402
from service.embedded import free_port  # noqa: E402
from service.queue import JobQueue, JobStatus, SyncJobQueue  # noqa: E402
from service.schemas import GenerationRequest  # noqa: E402
from tests.compvis_zoo import write_checkpoint  # noqa: E402
from tests.helpers import drop_keys, stop_process, torch_threads  # noqa: E402
from tests.integration.test_rest import Api, b64, serving  # noqa: E402
from tests.integration.test_served_conditionings import FAST, _spawn  # noqa: E402

pytestmark = pytest.mark.timeout(240)
MODELS = ("cin256-v2", "inpainting_big", "cin256")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, SyncJobQueue]]:
    folder = tmp_path_factory.mktemp("zoo")
    with torch_threads(1):
        files = {name: folder / name / "model.ckpt" for name in MODELS}
        for name in MODELS:
            write_checkpoint(folder / name, name, first_stage_copy=name == "inpainting_big")
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model="cin256-v2",
                        grpc_port=0, **FAST)
    procs = {name: _spawn(settings, files[name], free_port(), folder / f"{name}.log") for name in MODELS}
    queue = SyncJobQueue(settings)
    try:
        deadline = time.monotonic() + 200
        for name, proc in procs.items():
            while not queue.workers(name):
                log = (folder / f"{name}.log").read_text(errors="replace")
                assert proc.poll() is None, f"the {name} worker exited with {proc.returncode}:\n{log}"
                assert time.monotonic() < deadline, f"the {name} worker did not register:\n{log}"
                time.sleep(0.05)
        with serving(settings) as api:
            yield api, queue
    finally:
        for proc in procs.values():
            stop_process(proc)
        queue.close()
        drop_keys(redis_url, settings.key_prefix)


def _wait(queue: SyncJobQueue, job_id: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        job = queue.get(job_id)
        assert job is not None
        if job.status.terminal:
            assert job.status == JobStatus.succeeded, job.error
            return
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(0.05)


def test_zoo_workers_register_their_names_and_tasks(served: tuple[Api, SyncJobQueue]) -> None:
    _, queue = served
    assert sorted(t.value for t in queue.workers("cin256-v2")[0].tasks) == ["class", "unconditional"]
    assert [t.value for t in queue.workers("inpainting_big")[0].tasks] == ["inpaint"]
    labels = queue.workers("cin256-v2")[0].labels
    assert labels is not None and labels.n_classes == 1000


def test_class_and_inpaint_jobs_through_rest(served: tuple[Api, SyncJobQueue]) -> None:
    api, queue = served
    resp = api.client.post("/v1/jobs", json={"model": "cin256-v2", "task": "class", "class_label": 207,
                                             "guidance_scale": 3.0, "sampler": "ddim", "steps": 3, "seed": 1})
    assert resp.status_code == 202, resp.text
    _wait(queue, resp.json()["id"])
    png = queue.result(resp.json()["id"], 0)
    assert png is not None
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (32, 32)

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    hole = np.zeros((32, 32), dtype=np.uint8)
    hole[8:24, 4:20] = 255
    resp = api.client.post("/v1/jobs", json={"model": "inpainting_big", "task": "inpaint", "prompt": "",
                                             "image": b64(_png(picture)), "mask": b64(_png(Image.fromarray(hole))),
                                             "sampler": "ddim", "steps": 3, "seed": 2})
    assert resp.status_code == 202, resp.text
    _wait(queue, resp.json()["id"])
    png = queue.result(resp.json()["id"], 0)
    assert png is not None
    with Image.open(io.BytesIO(png)) as image:
        out = np.asarray(image.convert("RGB"))
    assert np.array_equal(out[hole == 0], np.asarray(picture)[hole == 0])
    assert np.abs(out[hole > 0].astype(int) - np.asarray(picture)[hole > 0]).mean() > 5


def _text(png: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(png)) as image:
        return dict(image.text)  # type: ignore[attr-defined]


def test_a_model_without_a_null_class_gets_guidance_1_when_none_is_given(served: tuple[Api, SyncJobQueue]) -> None:
    """cin256 (v1) registers its default guidance (1, not the class task's 5) and the null condition it lacks; a
    class job that leaves guidance out runs unguided, and the job record and the PNG say 1. cin256-v2, which has
    a null class, keeps the task's 5."""
    api, queue = served
    worker = queue.workers("cin256")[0]
    assert worker.missing_null == "null class" and {t.value: g for t, g in worker.default_guidance.items()} == {
        "class": 1.0}
    assert queue.workers("cin256-v2")[0].missing_null is None
    cards = {c["id"]: c for c in api.client.get("/v1/models").json()["data"]}
    assert cards["cin256"]["default_guidance"] == {"class": 1.0} and cards["cin256"]["missing_null"] == "null class"
    assert cards["cin256-v2"]["default_guidance"]["class"] == 5.0
    ids = {}
    for model in ("cin256", "cin256-v2"):
        resp = api.client.post("/v1/jobs", json={"model": model, "task": "class", "class_label": 3,
                                                 "sampler": "ddim", "steps": 2, "seed": 4})
        assert resp.status_code == 202, resp.text
        ids[model] = resp.json()["id"]
    for model, expected in (("cin256", 1.0), ("cin256-v2", 5.0)):
        _wait(queue, ids[model])
        job = queue.get(ids[model])
        assert job is not None and job.request.guidance_scale == expected
        png = queue.result(ids[model], 0)
        assert png is not None and float(_text(png)["guidance_scale"]) == expected
    assert api.client.get(f"/v1/jobs/{ids['cin256']}").json()["request"]["guidance_scale"] == 1.0


def test_guidance_for_a_model_without_a_null_class_is_refused_naming_it(served: tuple[Api, SyncJobQueue]) -> None:
    """Asked explicitly, guidance 5 is refused at submission (422 on guidance_scale) naming the missing null class;
    a job queued past the API (straight onto the queue, the task's default filled in) fails in the worker with the
    same words."""
    api, queue = served
    resp = api.client.post("/v1/jobs", json={"model": "cin256", "task": "class", "class_label": 3,
                                             "guidance_scale": 5, "sampler": "ddim", "steps": 2})
    assert resp.status_code == 422, resp.text
    assert "guidance_scale" in resp.text and "no null class" in resp.text and "not 5" in resp.text
    explicit_one = api.client.post("/v1/jobs", json={"model": "cin256", "task": "class", "class_label": 3,
                                                     "guidance_scale": 1, "sampler": "ddim", "steps": 2})
    assert explicit_one.status_code == 202, explicit_one.text
    _wait(queue, explicit_one.json()["id"])

    job = queue.submit(GenerationRequest(model="cin256", task="class", class_label=3, sampler="ddim", steps=2))
    assert job.request.guidance_scale == 5.0  # the queue alone knows only the task's default
    deadline = time.monotonic() + 120
    while not (done := queue.get(job.id)) or not done.status.terminal:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.status == JobStatus.failed and done.error is not None
    assert done.error.startswith("invalid_input:") and "no null class" in done.error and "not 5" in done.error


@pytest.mark.anyio
async def test_grpc_applies_the_model_default_and_refuses_guidance_naming_the_null_class(
        served: tuple[Api, SyncJobQueue]) -> None:
    """ClassToImage over real gRPC (the same `check_model` as REST): unset guidance runs at cin256's 1 and the
    response's parameters say so; 5 is INVALID_ARGUMENT naming the missing null class."""
    api, _ = served
    async with JobQueue(api.settings) as queue:
        server = create_grpc_server(api.settings, queue)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{bound_port(server)}") as channel:
                stub = pb_grpc.DiffusionStub(channel)
                fields = {"model": "cin256", "class_label": "3", "sampler": "ddim", "steps": 2, "seed": 6}
                response = await stub.ClassToImage(pb.GenerateRequest(parameters=pb.GenerationParameters(**fields)))
                assert response.parameters.guidance_scale == 1.0 and len(response.images) == 1
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ClassToImage(pb.GenerateRequest(
                        parameters=pb.GenerationParameters(**fields, guidance_scale=5.0)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no null class" in (err.value.details() or "")
        finally:
            await stop_grpc(server, 0)
