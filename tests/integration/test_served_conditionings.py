"""The paper's other conditionings served for real: class, layout, semantic and unconditional jobs through the REST
API (uvicorn in a thread) and the gRPC server, on the test Redis, run by real worker processes
(`python -m service.worker --model FILE`), one per toy model.

The toy models are the model side's configs shrunk (tests/integration/test_conditionings.py): random weights, a
32x32 default size, the shapes data's 18 class names, a layout limit of 2 boxes; saved with `save_model`, so a
worker loads them as it would a trained model and registers their tasks and labels. Images are noise, but every
byte comes through the real pipeline methods, queue, batching and PNG encoder, so the properties asserted are
exact: the same parameters give the same bytes through either front end, a class named or numbered is the same
class, a label map's palette does not matter, two compatible jobs share one sampler run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from models.autoencoder import AutoencoderConfig
from models.checkpoints import save_model
from models.conditioners import ConditionerConfig
from models.conditioning import LayoutEncoderConfig, SemanticEncoderConfig, label_map_image
from models.config import ModelConfig, SamplerGuidance
from models.images import png_parameters
from models.train.data_shapes import CLASS_NAMES, label_map, scene_at
from models.unet import UNetConfig
from service.api import proto_build
from service.config import Settings
from service.embedded import free_port
from service.queue import Job, JobQueue, JobStatus, SyncJobQueue
from service.schemas import GenerationRequest, Task
from tests.helpers import drop_keys, png_claiming, random_model, stop_process, torch_threads, wait_until
from tests.integration.test_rest import Api, b64, problems, serving

proto_build.ensure()

from service.api._proto.ldm.v1 import ldm_pb2 as pb  # noqa: E402
from service.api._proto.ldm.v1 import ldm_pb2_grpc as pb_grpc  # noqa: E402
from service.api.grpc import bound_port, create_grpc_server, stop_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
KINDS = ("class", "layout", "semantic", "uncond")
FAST: dict[str, Any] = {"redis_timeout_s": 2.0, "redis_connect_timeout_s": 0.5, "redis_retries": 2,
                        "redis_backoff_s": 0.05, "heartbeat_interval_s": 0.5, "max_wait_ms": 20, "max_batch": 8,
                        "min_width": 32, "min_height": 32}
AUTOENCODER = AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, embed_dim=3, norm_groups=4,
                                mid_attention=False)  # f = 4, as the shapes models'
BOX_A: dict[str, Any] = {"label": "red circle", "box": [0.1, 0.1, 0.45, 0.5]}
BOX_B: dict[str, Any] = {"label": "blue square", "box": [0.55, 0.4, 0.95, 0.9]}
COMMON = {"steps": 2, "seed": 5}
StatusCode = grpc.StatusCode


def toy_config(kind: str) -> ModelConfig:
    """The shapes-{class,layout,semantic,uncond} wiring at toy width (the model side's test configs)."""
    conditioner = {
        "class": ConditionerConfig(kind="class", n_classes=18, class_dim=16, class_names=CLASS_NAMES),
        "layout": ConditionerConfig(kind="layout", n_classes=18, class_names=CLASS_NAMES,
                                    layout=LayoutEncoderConfig(max_boxes=2, width=16, depth=1, heads=2,
                                                               raster_channels=4, raster_hidden=8)),
        "semantic": ConditionerConfig(kind="semantic", n_classes=18, class_names=CLASS_NAMES,
                                      semantic=SemanticEncoderConfig(channels=4, hidden=8, downsample=4)),
        "uncond": None}[kind]
    unet = UNetConfig(in_channels=7 if kind in ("semantic", "layout") else 3, out_channels=3, model_channels=16,
                      channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2, norm_groups=8,
                      context_dim=16 if kind in ("class", "layout") else None)
    wiring = {"class": "crossattn", "layout": "hybrid", "semantic": "concat", "uncond": "none"}[kind]
    concat = {"layout": "layout", "semantic": "semantic"}.get(kind, "none")
    return ModelConfig(name=f"toy-{kind}", family="ldm", unet=unet, autoencoder=AUTOENCODER, conditioner=conditioner,
                       conditioning=wiring, concat_input=concat,  # type: ignore[arg-type]
                       default_size=32, scale_factor=1.0,
                       # as the shipped shapes-layout's: Euler ancestral by default, PLMS at its own scale 2
                       default_sampler="euler_a" if kind == "layout" else None,
                       sampler_guidance=(SamplerGuidance("plms", 2.0),) if kind == "layout" else ())


def map_png(labels: np.ndarray, mode: str = "P") -> bytes:
    """A label map as a PNG: mode P (palette index = label, shown in the colours of a gray ramp here) or L."""
    image = label_map_image(labels) if mode == "P" else Image.fromarray(labels.astype(np.uint8))
    if mode == "P":
        image.putpalette([v for k in range(256) for v in ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


SCENE_MAP = label_map(scene_at(1, 0))  # 64x64, labels of the shapes data (0 = background, class k = k + 1)


def text(png: bytes) -> dict[str, str]:
    return png_parameters(png)


# ------------------------------------------------------------------------------------------------ the stack

@dataclass
class Served:
    settings: Settings
    api: Api
    queue: SyncJobQueue
    metrics: dict[str, str]  # kind -> the worker's /metrics URL

    def scrape(self, kind: str) -> str:
        with urllib.request.urlopen(self.metrics[kind], timeout=5) as answer:
            return str(answer.read().decode())

    def wait(self, job_id: str, timeout_s: float = 60) -> Job:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.queue.get(job_id)
            assert job is not None
            if job.status.terminal:
                return job
            assert time.monotonic() < deadline, f"job {job_id} did not end"
            time.sleep(0.02)

    def result(self, job_id: str, index: int = 0) -> bytes:
        png = self.queue.result(job_id, index)
        assert png is not None
        return png


def _spawn(settings: Settings, model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update({f"LDM_{k.upper()}": str(v) for k, v in FAST.items()})
    env.update(LDM_REDIS_URL=str(settings.redis_url), LDM_KEY_PREFIX=settings.key_prefix,
               LDM_WORKER_METRICS_PORT=str(port), LDM_WORKER_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "service.worker", "--model", str(model)], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The REST API and four real workers, one per toy model (toy-class, toy-layout, toy-semantic, toy-uncond),
    registered; the default model is toy-class."""
    folder = tmp_path_factory.mktemp("toy-models")
    with torch_threads(1):
        files = {kind: save_model(random_model(toy_config(kind), seed=i), folder / f"toy-{kind}.safetensors")
                 for i, kind in enumerate(KINDS)}
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model="toy-class",
                        grpc_port=0, **FAST)
    ports = {kind: free_port() for kind in KINDS}
    procs = {kind: _spawn(settings, files[kind], ports[kind], folder / f"{kind}.log") for kind in KINDS}
    queue = SyncJobQueue(settings)
    try:
        deadline = time.monotonic() + 150
        for kind, proc in procs.items():
            wait_until(lambda kind=kind: bool(queue.workers(f"toy-{kind}")), deadline - time.monotonic(),
                       f"the {kind} worker to register", every_s=0.05, procs=[proc],
                       log=lambda kind=kind: (folder / f"{kind}.log").read_text(errors="replace"))
        with serving(settings) as api:
            yield Served(settings, api, queue, {k: f"http://127.0.0.1:{p}/metrics" for k, p in ports.items()})
    finally:
        for proc in procs.values():
            stop_process(proc)
        queue.close()
        drop_keys(redis_url, settings.key_prefix)


@contextlib.asynccontextmanager
async def grpc_stub(settings: Settings) -> AsyncIterator[pb_grpc.DiffusionStub]:
    """A gRPC server on `settings` (any free port) and a stub on a channel to it."""
    queue = JobQueue(settings)
    server = create_grpc_server(settings, queue)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound_port(server)}") as channel:
            yield pb_grpc.DiffusionStub(channel)
    finally:
        await stop_grpc(server, 0)
        await queue.aclose()


def submit_rest(served: Served, body: dict[str, Any]) -> Job:
    resp = served.api.client.post("/v1/jobs", json={**COMMON, **body})
    assert resp.status_code == 202, resp.text
    done = served.wait(resp.json()["id"])
    assert done.status == JobStatus.succeeded, done.error
    return done


# ------------------------------------------------------------------------------------------------ each task, REST

def test_the_workers_register_the_tasks_and_labels_of_their_models(served: Served) -> None:
    seen = {kind: served.queue.workers(f"toy-{kind}")[0] for kind in KINDS}
    assert {k: sorted(t.value for t in w.tasks) for k, w in seen.items()} == {
        "class": ["class", "unconditional"], "layout": ["layout", "unconditional"],
        "semantic": ["semantic", "unconditional"], "uncond": ["unconditional"]}
    labels = seen["layout"].labels
    assert labels is not None and labels.class_names == CLASS_NAMES and labels.max_boxes == 2
    assert seen["uncond"].labels is None


def test_class_by_name_or_id_is_the_same_class_and_the_png_says_which(served: Served) -> None:
    resp = served.api.client.post("/v1/class2img", json={**COMMON, "class_label": "Blue  Square"})
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert (h["x-task"], h["x-model"], h["x-guidance-scale"]) == ("class", "toy-class", "5")  # the task's default
    params = text(resp.content)
    assert (params["task"], params["class"], params["class_id"], params["guidance_scale"]) == (
        "class", "blue square", str(CLASS_NAMES.index("blue square")), "5.0")
    assert "prompt" not in params and Image.open(io.BytesIO(resp.content)).size == (32, 32)
    by_id = submit_rest(served, {"task": "class", "class_label": CLASS_NAMES.index("blue square")})
    assert served.result(by_id.id) == resp.content  # same class, seed and steps: same bytes
    assert by_id.request.class_label == 7 and by_id.request.guidance_scale == 5.0  # the record keeps what was asked
    other = submit_rest(served, {"task": "class", "class_label": "red circle"})
    assert served.result(other.id) != resp.content


def test_layout_job_draws_its_boxes_and_records_them(served: Served) -> None:
    done = submit_rest(served, {"task": "layout", "model": "toy-layout", "layout": [BOX_A, BOX_B], "n": 2})
    pngs = [served.result(done.id, i) for i in range(2)]
    assert pngs[0] != pngs[1]  # seeds 5 and 6
    params = text(pngs[0])
    assert params["task"] == "layout" and params["guidance_scale"] == "3.0" and params["seed"] == "5"
    assert json.loads(params["layout"]) == [BOX_A, BOX_B]
    record = served.api.client.get(f"/v1/jobs/{done.id}").json()
    assert record["request"]["layout"] == [BOX_A, BOX_B] and record["request"]["task"] == "layout"
    swapped = served.api.client.post("/v1/layout2img", json={**COMMON, "model": "toy-layout", "layout": [BOX_B, BOX_A]})
    assert swapped.status_code == 200, swapped.text  # a layout is a set: the order of its boxes does not matter
    difference = np.abs(np.asarray(Image.open(io.BytesIO(swapped.content)), np.int16)
                        - np.asarray(Image.open(io.BytesIO(pngs[0])), np.int16))
    assert difference.max() <= 1  # (up to float rounding: attention sums its keys in another order)


def test_semantic_map_sets_the_size_and_its_palette_does_not_matter(served: Served) -> None:
    as_palette = served.api.client.post("/v1/semantic2img", json={**COMMON, "model": "toy-semantic",
                                                                  "label_map": b64(map_png(SCENE_MAP, "P"))})
    assert as_palette.status_code == 200, as_palette.text
    assert Image.open(io.BytesIO(as_palette.content)).size == (64, 64)  # the map's size, not the model's 32
    params = text(as_palette.content)
    assert params["label_map_sha256"] == hashlib.sha256(SCENE_MAP.astype(np.uint8).tobytes()).hexdigest()
    assert (params["task"], params["guidance_scale"], params["width"]) == ("semantic", "2.0", "64")
    gray = b64(map_png(SCENE_MAP, "L"))
    as_gray = submit_rest(served, {"task": "semantic", "model": "toy-semantic", "label_map": gray})
    assert served.result(as_gray.id) == as_palette.content  # labels, not colours
    assert (as_gray.request.width, as_gray.request.height) == (64, 64)
    assert "label_map" not in served.api.client.get(f"/v1/jobs/{as_gray.id}").json()["request"]
    other = SCENE_MAP.copy()
    other[:8, :8] = 5
    changed = submit_rest(served, {"task": "semantic", "model": "toy-semantic", "label_map": b64(map_png(other))})
    assert served.result(changed.id) != as_palette.content


def test_unconditional_samples_the_model_unguided(served: Served) -> None:
    resp = served.api.client.post("/v1/unconditional", json={**COMMON, "model": "toy-uncond", "n": 2})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-images"] == "2" and resp.headers["x-guidance-scale"] == "1"
    params = text(resp.content)
    assert (params["task"], params["guidance_scale"], params["model"]) == ("unconditional", "1.0", "toy-uncond")
    second = served.api.client.get(f"/v1/jobs/{resp.headers['x-job-id']}/images/1").content
    assert second != resp.content
    on_class_model = served.api.client.post("/v1/unconditional", json=COMMON)  # the default model's null class
    assert on_class_model.status_code == 200 and text(on_class_model.content)["model"] == "toy-class"


def test_two_compatible_class_jobs_run_as_one_batch_with_their_own_classes(served: Served) -> None:
    alone = submit_rest(served, {"task": "class", "class_label": "green triangle", "seed": 21})
    before = served.scrape("class")
    blocker = served.queue.submit(GenerationRequest(task=Task.class_, class_label=0, steps=1000, seed=1))
    deadline = time.monotonic() + 60
    while (job := served.queue.get(blocker.id)) is not None and job.step < 1:  # the worker is busy with it
        assert time.monotonic() < deadline, "the blocker did not start"
        time.sleep(0.02)
    pair = [served.queue.submit(GenerationRequest(task=Task.class_, class_label="green triangle", steps=2, seed=21)),
            served.queue.submit(GenerationRequest(task=Task.class_, class_label=11, steps=2, seed=22,
                                                  guidance_scale=5.0))]
    served.queue.cancel(blocker.id)  # the pair waits in the stream; the worker's next claim takes both
    finished = [served.wait(j.id) for j in pair]
    assert all(j.status == JobStatus.succeeded for j in finished)
    assert finished[0].started_at == finished[1].started_at  # started by one call: one batch
    after = served.scrape("class")

    def delta(name: str) -> float:
        line = f'{name}{{model="toy-class",task="class"}}'
        values = [sum(float(x.rsplit(" ", 1)[1]) for x in t.splitlines() if x.startswith(line))
                  for t in (before, after)]
        return values[1] - values[0]

    assert (delta("ldm_batch_size_count"), delta("ldm_batch_size_sum")) == (2, 3)  # the blocker, then the pair
    assert served.result(pair[0].id) == served.result(alone.id)  # an image does not depend on its batch
    assert text(served.result(pair[1].id))["class"] == "yellow triangle"  # class 11, guidance 5, in the same run
    assert text(served.result(pair[1].id))["guidance_scale"] == "5.0"


# ------------------------------------------------------------------------------------------------ bad input, REST

@pytest.mark.parametrize(("body", "field", "message"), [
    ({"task": "layout", "model": "toy-layout", "layout": [{**BOX_A, "box": [0.5, 0.1, 0.2, 0.5]}]}, "layout.0.box",
     "box [0.5, 0.1, 0.2, 0.5] is empty or inverted: need x0 < x1 and y0 < y1"),
    ({"task": "layout", "model": "toy-layout", "layout": [BOX_A, {**BOX_B, "box": [0.5, 0.4, 1.2, 0.9]}]},
     "layout.1.box", "box [0.5, 0.4, 1.2, 0.9] is not inside the image: coordinates are fractions of its width and "
     "height, in [0, 1]"),
    ({"task": "layout", "model": "toy-layout", "layout": [{**BOX_A, "label": "pink circle"}]}, "layout.0.label",
     "unknown class 'pink circle'; known: red circle, red square, red triangle, green circle"),
    ({"task": "layout", "model": "toy-layout", "layout": [BOX_A, BOX_B, BOX_A]}, "layout",
     "model 'toy-layout' takes at most 2 boxes in a layout, got 3"),
    ({"task": "layout", "model": "toy-layout", "layout": []}, "layout",
     "task layout needs a layout of at least one box"),
    ({"task": "class", "class_label": "pink circle"}, "class_label", "unknown class 'pink circle'; known: red circle"),
    ({"task": "class", "class_label": 18}, "class_label", "class id 18 is outside 0..17"),
    ({"task": "class", "class_label": "red circle", "prompt": "a red circle"}, "prompt",
     "task class takes no prompt: it is conditioned on its class_label"),
    ({"task": "class"}, "class_label", "task class needs a class_label"),
    ({"task": "class", "model": "toy-layout", "class_label": 1}, "task",
     "model 'toy-layout' cannot do class; it can do layout, unconditional"),
    ({"task": "layout", "layout": [BOX_A]}, "task",
     "model 'toy-class' cannot do layout; it can do class, unconditional"),
    ({"task": "unconditional", "model": "toy-uncond", "guidance_scale": 4}, "guidance_scale",
     "unconditional sampling is unguided"),
])
def test_bad_classes_and_boxes_are_422_naming_the_field(served: Served, body: dict[str, Any], field: str,
                                                        message: str) -> None:
    resp = served.api.client.post("/v1/jobs", json={**COMMON, **body})
    found = problems(resp)
    assert field in found and found[field].startswith(message), found
    assert field in resp.json()["message"]


def _png_of(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("label_map", "status", "message"), [
    (_png_of(Image.new("RGB", (64, 64), (1, 1, 1))), 422, "label_map is a mode RGB PNG; a label map is a "
     "single-channel PNG (mode L, or P whose palette indices are the labels)"),
    (_png_of(Image.new("L", (64, 64), 1), "JPEG"), 422, "label_map is not a PNG image"),
    (_png_of(Image.new("L", (60, 64), 1)), 422, "label_map is 60x64 pixels; width and height must be multiples of 8"),
    (_png_of(Image.new("L", (64, 2048), 1)), 422, "label_map is 64x2048 pixels; width must be between 32"),
    (map_png(np.where(SCENE_MAP > 0, 19, 0)), 422, "label map values must be 0 (background) to 18; found unknown "
     "label(s) [19]"),
    (png_claiming(5000, 5000), 413, "label_map is 5000x5000 = 25000000 pixels; the limit is 16777216 pixels"),
    (b"\x89PNG\r\n\x1a\n truncated", 422, "label_map is not a PNG image"),
])
def test_bad_label_maps_are_refused_at_the_front_end(served: Served, label_map: bytes, status: int,
                                                     message: str) -> None:
    resp = served.api.client.post("/v1/semantic2img", json={**COMMON, "model": "toy-semantic",
                                                            "label_map": b64(label_map)})
    assert resp.status_code == status, resp.text
    shown = problems(resp)["label_map"] if status == 422 else resp.json()["detail"]
    assert shown.startswith(message), shown


def test_a_map_and_a_size_that_disagree_and_a_map_on_another_task(served: Served) -> None:
    resp = served.api.client.post("/v1/jobs", json={**COMMON, "task": "semantic", "model": "toy-semantic", "width": 32,
                                                    "label_map": b64(map_png(SCENE_MAP))})
    assert problems(resp)["width"] == ("width 32 differs from the label map's width 64; leave width and height out "
                                       "for semantic: the label map sets the size")
    resp = served.api.client.post("/v1/jobs", json={**COMMON, "task": "class", "class_label": 1,
                                                    "label_map": b64(map_png(SCENE_MAP))})
    assert problems(resp)["label_map"] == "label_map applies to task semantic only, not class"
    resp = served.api.client.post("/v1/class2img", json={**COMMON, "task": "layout"})
    assert problems(resp)["task"] == "this endpoint runs class only; submit layout jobs to POST /v1/jobs"


def test_what_only_the_model_knows_fails_the_job_as_invalid_input_in_the_worker(served: Served) -> None:
    """Jobs queued past the front end's label check (a front end that did not know the model's labels, here the
    queue itself) are checked by the worker against the model and fail alone, before any batch."""
    bad = [GenerationRequest(task=Task.class_, class_label="pink circle", seed=1, steps=2),
           GenerationRequest.model_validate({"model": "toy-layout", "task": "layout", "layout": [BOX_A, BOX_B, BOX_A],
                                             "seed": 1, "steps": 2}),
           GenerationRequest(model="toy-semantic", task=Task.semantic, label_map=map_png(np.full((32, 32), 19)),
                             seed=1, steps=2)]
    errors = [served.wait(served.queue.submit(r).id).error for r in bad]
    assert errors == [
        "invalid_input: class_label: unknown class 'pink circle'; known: " + ", ".join(CLASS_NAMES),
        "invalid_input: a layout holds at most 2 boxes for this model, got 3",
        "invalid_input: label_map: label map values must be 0 (background) .. 18, found unknown label(s) [19]"]
    failures = 'ldm_job_failures_total{model="toy-class",reason="invalid_input"}'
    assert any(line.startswith(failures) and float(line.rsplit(" ", 1)[1]) >= 1
               for line in served.scrape("class").splitlines())


def test_a_job_that_names_no_sampler_runs_with_the_one_its_models_workers_register(served: Served) -> None:
    """toy-layout's config says euler_a (as the shipped shapes-* models' do), toy-class's says none (dpmpp_2m): the
    workers register theirs, GET /v1/models shows them, and a job that names no sampler runs with its model's and
    records it; one that names a sampler runs with that, one that asks for Karras sigmas with dpmpp_2m (the one
    sampler that has them). A job queued past the front ends (the queue itself) gets its model's from the worker."""
    assert (served.queue.workers("toy-layout")[0].default_sampler,
            served.queue.workers("toy-class")[0].default_sampler) == ("euler_a", "dpmpp_2m")
    cards = {c["id"]: c for c in served.api.client.get("/v1/models").json()["data"]}
    assert (cards["toy-layout"]["default_sampler"], cards["toy-class"]["default_sampler"]) == ("euler_a", "dpmpp_2m")
    body = {"task": "layout", "model": "toy-layout", "layout": [BOX_A]}
    unnamed, named, other, karras = (submit_rest(served, {**body, **extra}) for extra in (
        {}, {"sampler": "euler_a"}, {"sampler": "dpmpp_2m"}, {"karras": True}))
    assert (unnamed.request.sampler, karras.request.sampler) == ("euler_a", "dpmpp_2m")
    assert text(served.result(unnamed.id))["sampler"] == "euler_a"
    assert served.result(unnamed.id) == served.result(named.id) != served.result(other.id)
    assert (text(served.result(karras.id))["sampler"], text(served.result(karras.id))["karras"]) == ("dpmpp_2m", "True")
    klass = submit_rest(served, {"task": "class", "class_label": "red circle"})
    assert klass.request.sampler == "dpmpp_2m" and text(served.result(klass.id))["sampler"] == "dpmpp_2m"
    direct = served.queue.submit(GenerationRequest.model_validate({**COMMON, **body}))
    assert direct.request.sampler is None  # nobody filled it in
    assert served.wait(direct.id).status == JobStatus.succeeded
    assert served.result(direct.id) == served.result(unnamed.id)  # the worker ran the model's euler_a
    assert text(served.result(direct.id))["sampler"] == "euler_a"


def test_a_sampler_with_its_own_default_scale_gets_it_when_a_job_gives_none(served: Served) -> None:
    """toy-layout's config gives PLMS its own scale, 2 (the layout task's is 3): its worker registers it, GET
    /v1/models shows it, a PLMS job without guidance_scale runs at 2 and records it, other samplers at 3, a given
    scale wins, unconditional stays unguided."""
    registered = served.queue.workers("toy-layout")[0].sampler_guidance
    assert registered == {"plms": {Task.layout: 2.0, Task.unconditional: 1.0}}
    cards = {c["id"]: c for c in served.api.client.get("/v1/models").json()["data"]}
    assert cards["toy-layout"]["sampler_guidance"] == {"plms": {"layout": 2.0, "unconditional": 1.0}}
    assert cards["toy-class"]["sampler_guidance"] == {}
    body = {"task": "layout", "model": "toy-layout", "layout": [BOX_A]}
    plms, ddim, given = (submit_rest(served, {**body, **extra}) for extra in (
        {"sampler": "plms"}, {"sampler": "ddim"}, {"sampler": "plms", "guidance_scale": 4.0}))
    assert (plms.request.guidance_scale, ddim.request.guidance_scale, given.request.guidance_scale) == (2.0, 3.0, 4.0)
    assert text(served.result(plms.id))["guidance_scale"] == "2.0"
    uncond = submit_rest(served, {"task": "unconditional", "model": "toy-layout", "sampler": "plms"})
    assert uncond.request.guidance_scale == 1.0


# ------------------------------------------------------------------------------------------------ gRPC

@pytest.mark.anyio
async def test_grpc_class_layout_semantic_and_unconditional_answer_what_rest_does(served: Served) -> None:
    params: dict[str, Any] = {"steps": 2, "seed": 5}
    async with grpc_stub(served.settings) as stub:
        klass = await stub.ClassToImage(pb.GenerateRequest(parameters=pb.GenerationParameters(
            class_label="blue square", **params)))
        layout = await stub.LayoutToImage(pb.GenerateRequest(parameters=pb.GenerationParameters(
            model="toy-layout", layout=[pb.LayoutBox(label=b["label"], x0=b["box"][0], y0=b["box"][1],
                                                     x1=b["box"][2], y1=b["box"][3]) for b in (BOX_A, BOX_B)],
            **params)))
        semantic = await stub.SemanticToImage(pb.SemanticRequest(
            parameters=pb.GenerationParameters(model="toy-semantic", **params), label_map=map_png(SCENE_MAP)))
        uncond = await stub.Unconditional(pb.GenerateRequest(parameters=pb.GenerationParameters(
            model="toy-uncond", **params)))
        job = await stub.GetJob(pb.GetJobRequest(job_id=layout.job_id))
    rest: dict[str, dict[str, Any]] = {
        "class": {"task": "class", "class_label": "blue square"},
        "layout": {"task": "layout", "model": "toy-layout", "layout": [BOX_A, BOX_B]},
        "semantic": {"task": "semantic", "model": "toy-semantic", "label_map": b64(map_png(SCENE_MAP, "L"))},
        "uncond": {"task": "unconditional", "model": "toy-uncond"}}
    for kind, answer in (("class", klass), ("layout", layout), ("semantic", semantic), ("uncond", uncond)):
        [image] = answer.images
        assert image.png == served.result(submit_rest(served, rest[kind]).id), kind  # one job, two front ends
    assert (klass.parameters.class_label, klass.parameters.guidance_scale) == ("blue square", 5.0)
    assert (semantic.images[0].width, semantic.parameters.width, semantic.parameters.guidance_scale) == (64, 64, 2.0)
    assert uncond.parameters.guidance_scale == 1.0
    assert (klass.parameters.sampler, layout.parameters.sampler) == ("dpmpp_2m", "euler_a")  # the models' own
    assert job.task == pb.TASK_LAYOUT and job.status == pb.JOB_STATUS_SUCCEEDED
    assert [(b.label, round(b.x0, 6), round(b.y1, 6)) for b in job.parameters.layout] == [
        ("red circle", 0.1, 0.5), ("blue square", 0.55, 0.9)]


@pytest.mark.anyio
async def test_grpc_bad_boxes_classes_and_maps_are_invalid_argument(served: Served) -> None:
    def box(label: str, *coords: float) -> pb.LayoutBox:
        return pb.LayoutBox(label=label, x0=coords[0], y0=coords[1], x1=coords[2], y1=coords[3])

    cases: list[tuple[str, Any, str]] = [
        ("LayoutToImage", pb.GenerateRequest(parameters=pb.GenerationParameters(
            model="toy-layout", steps=2, layout=[box("red circle", 0.6, 0.1, 0.2, 0.5)])),
         "parameters.layout.0.box: box [0.6, 0.1, 0.2, 0.5] is empty or inverted"),
        ("LayoutToImage", pb.GenerateRequest(parameters=pb.GenerationParameters(
            model="toy-layout", steps=2, layout=[box("cyan circle", 0.1, 0.1, 0.2, 0.5)])),
         "parameters.layout.0.label: unknown class 'cyan circle'"),
        ("LayoutToImage", pb.GenerateRequest(parameters=pb.GenerationParameters(model="toy-layout", steps=2)),
         "parameters.layout: task layout needs a layout of at least one box"),
        ("ClassToImage", pb.GenerateRequest(parameters=pb.GenerationParameters(class_label="pink circle", steps=2)),
         "parameters.class_label: unknown class 'pink circle'"),
        ("ClassToImage", pb.GenerateRequest(parameters=pb.GenerationParameters(model="toy-layout", class_label="1"))
         , "task: model 'toy-layout' cannot do class"),
        ("SemanticToImage", pb.SemanticRequest(parameters=pb.GenerationParameters(model="toy-semantic"),
                                               label_map=_png_of(Image.new("RGB", (64, 64)))),
         "label_map is a mode RGB PNG"),
        ("SemanticToImage", pb.SemanticRequest(parameters=pb.GenerationParameters(model="toy-semantic"),
                                               label_map=map_png(np.full((32, 32), 40))),
         "label_map: label map values must be 0 (background) to 18; found unknown label(s) [40]"),
        ("SemanticToImage", pb.SemanticRequest(parameters=pb.GenerationParameters(model="toy-semantic", width=32),
                                               label_map=map_png(SCENE_MAP)),
         "parameters.width: width is 32 but the label map's is 64"),
    ]
    async with grpc_stub(served.settings) as stub:
        for method, request, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, method)(request)
            assert err.value.code() == StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert message in (err.value.details() or ""), (method, err.value.details())
