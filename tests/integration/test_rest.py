"""The REST API against real parts: uvicorn on a free port (in a thread), the test Redis, httpx and the official
`openai` client as clients, and for end-to-end runs a real worker process (`run_worker`, model `random:tiny-sd`:
random weights, so images are noise, but every byte comes through the real pipeline, queue and PNG encoder).

`stack` (one per module): API + one worker. `api(...)`: an API alone with the settings a test needs (no
worker: jobs stay queued), for validation, limits, cancellation of queued jobs, 429, 503, timeouts.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image

from service.api.rest import build_server
from service.config import Settings
from service.queue import SyncJobQueue
from tests.helpers import drop_keys, png_claiming, stop_process, wait_ready

pytestmark = pytest.mark.timeout(60)
MODEL = "random:tiny-sd"
FAST: dict[str, Any] = {"redis_timeout_s": 2.0, "redis_connect_timeout_s": 0.5, "redis_retries": 1,
                        "redis_backoff_s": 0.05, "heartbeat_interval_s": 0.5, "min_width": 32, "min_height": 32}
TXT = {"prompt": "a red circle on the left", "width": 64, "height": 64, "steps": 2, "seed": 7}


# ------------------------------------------------------------------------------------------------ helpers

def png(width: int = 64, height: int = 64, mode: str = "RGB", color: Any = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def gradient_png(width: int = 64, height: int = 64) -> bytes:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (height, 1)), np.tile(x[::-1], (height, 1)), np.full((height, width), 90, np.uint8)], 2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@dataclass
class Api:
    url: str
    settings: Settings
    client: httpx.Client

    def wait_status(self, job_id: str, *statuses: str, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not reach {statuses}")


@dataclass
class Frame:
    id: str | None
    event: str | None
    data: str | None
    comments: list[str]


def sse(client: httpx.Client, url: str, headers: dict[str, str] | None = None,
        stop: Callable[[Frame], bool] | None = None) -> list[Frame]:
    """The frames of an event stream until the server ends it (or `stop` says so)."""
    frames, fields, comments = [], {}, []
    with client.stream("GET", url, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line:
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
            elif fields or comments:
                frame = Frame(fields.get("id"), fields.get("event"), fields.get("data"), comments)
                frames.append(frame)
                fields, comments = {}, []
                if stop is not None and stop(frame):
                    break
    return frames


# ------------------------------------------------------------------------------------------------ servers

@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[Api]:
    """The app under uvicorn on a free port, in a thread; stopped gracefully on exit."""
    server = build_server(settings, host="127.0.0.1", port=0, log_level="warning")
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield Api(url, settings, client)
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def worker_process(settings: Settings, **env_settings: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process (`run_worker`) on `settings`' Redis and key prefix; `env_settings` are more LDM_
    settings for the worker alone (batching="continuous": LDM_BATCHING=continuous)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update({"LDM_REDIS_URL": str(settings.redis_url), "LDM_KEY_PREFIX": settings.key_prefix,
                "LDM_DEFAULT_MODEL": MODEL, "LDM_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
                "LDM_WORKER_TORCH_THREADS": "2"})
    env.update({f"LDM_{name.upper()}": value for name, value in env_settings.items()})
    code = ("from service.config import load_settings; from service.worker.process import run_worker; "
            f"raise SystemExit(run_worker(load_settings(), {MODEL!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def ready_stack(settings: Settings, **worker_settings: str) -> Iterator[Api]:
    """The API and one real worker on `settings` (and `worker_settings`, see `worker_process`), once /readyz answers
    200; the run's Redis keys dropped after."""
    try:
        with worker_process(settings, **worker_settings) as proc, serving(settings) as api:
            wait_ready(api.client.get, 40, procs=[proc])
            yield api
    finally:
        drop_keys(str(settings.redis_url), settings.key_prefix)


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Api]:
    """The API and one real worker (model random:tiny-sd, the default), ready."""
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=MODEL, **FAST)
    try:
        with worker_process(settings) as proc, serving(settings) as api:
            wait_ready(api.client.get, 40, procs=[proc])
            yield api
    finally:
        drop_keys(redis_url, settings.key_prefix)


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Api]]:
    """Start an API alone (no worker) with settings overrides."""
    with contextlib.ExitStack() as stack:
        def start(**overrides: Any) -> Api:
            return stack.enter_context(serving(make_settings(**{**FAST, **overrides})))
        yield start


def problems(resp: httpx.Response) -> dict[str, str]:
    """field -> message of a native 422 answer."""
    assert resp.status_code == 422, resp.text
    return {".".join(str(p) for p in item["loc"][1:]): item["msg"] for item in resp.json()["detail"]}


def openai_error(resp: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ------------------------------------------------------------------------------------------------ end to end

def test_txt2img_answers_a_png_with_its_parameters_and_same_seed_same_bytes(stack: Api) -> None:
    first = stack.client.post("/v1/txt2img", json=TXT)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(first.content))
    assert image.size == (64, 64) and image.format == "PNG"
    assert image.text["prompt"] == TXT["prompt"] and image.text["seed"] == "7"  # type: ignore[attr-defined]
    h = first.headers
    shown = (h["x-seed"], h["x-steps"], h["x-model"], h["x-sampler"], h["x-images"])
    assert shown == ("7", "2", MODEL, "dpmpp_2m", "1")
    second = stack.client.post("/v1/txt2img", json=TXT)
    assert second.content == first.content and second.headers["x-job-id"] != h["x-job-id"]
    job = stack.client.get(f"/v1/jobs/{h['x-job-id']}").json()
    assert job["status"] == "succeeded" and job["links"]["images"] == [f"/v1/jobs/{h['x-job-id']}/images/0"]


def test_async_job_status_images_and_location(stack: Api) -> None:
    resp = stack.client.post("/v1/jobs", json={**TXT, "n": 2, "seed": None})
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] == "queued"
    assert isinstance(job["request"]["seed"], int) and job["model"] == MODEL  # resolved at admission
    done = stack.wait_status(job["id"], "succeeded")
    assert done["results"] == 2 and done["started_at"] and done["finished_at"]
    images = [stack.client.get(link) for link in done["links"]["images"]]
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in images)
    assert images[0].content != images[1].content  # seeds seed and seed + 1
    missing = stack.client.get(f"/v1/jobs/{job['id']}/images/2")
    assert missing.status_code == 404 and "has 2 images" in missing.json()["detail"]
    assert stack.client.get(f"/v1/jobs/{'0' * 32}").status_code == 404
    assert stack.client.get("/v1/jobs/not-a-job/images/0").status_code == 404


def test_inpaint_repaints_only_the_white_part_of_the_mask(stack: Api) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :24] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    original = gradient_png()
    resp = stack.client.post("/v1/inpaint", json={"prompt": "a blue square", "image": b64(original),
                                                  "mask": b64(buf.getvalue()), "steps": 2, "seed": 1})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-task"] == "inpaint"
    out, before = pixels(resp.content), pixels(original)
    assert (out[:, 24:] == before[:, 24:]).all()  # kept exactly
    assert np.abs(out[:, :24] - before[:, :24]).mean() > 5  # repainted


def test_sse_events_arrive_in_order_and_resume_after_last_event_id(stack: Api) -> None:
    job = stack.client.post("/v1/jobs", json={**TXT, "steps": 4}).json()
    frames = sse(stack.client, f"/v1/jobs/{job['id']}/events")
    events = [f for f in frames if f.data is not None]
    kinds = [f.event for f in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "succeeded", kinds
    steps = [json.loads(str(f.data))["step"] for f in events if f.event == "progress"]
    assert steps == sorted(steps) and steps[-1] == 4 and len(set(steps)) == len(steps)
    ids = [tuple(int(p) for p in str(f.id).split("-")) for f in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    resumed = sse(stack.client, f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(events[1].id)})
    assert [(f.id, f.event) for f in resumed if f.data] == [(f.id, f.event) for f in events[2:]]
    after_end = sse(stack.client, f"/v1/jobs/{job['id']}/events?after={events[-1].id}")
    assert [f for f in after_end if f.data] == []  # nothing after the terminal event: the stream just ends
    bad = stack.client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert "Last-Event-ID" in problems(bad)


def test_cancel_of_a_running_job_stops_it_between_steps(stack: Api) -> None:
    job = stack.client.post("/v1/jobs", json={**TXT, "steps": 400}).json()
    url = f"/v1/jobs/{job['id']}/events"
    sse(stack.client, url, stop=lambda f: f.event == "progress")
    resp = stack.client.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    kinds = [f.event for f in sse(stack.client, url) if f.data]
    assert kinds[-1] == "cancelled" and "cancel_requested" in kinds and "succeeded" not in kinds, kinds
    done = stack.wait_status(job["id"], "cancelled", "succeeded", "failed")
    assert done["status"] == "cancelled" and done["step"] < 400
    again = stack.client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_of_a_finished_job_is_a_conflict(stack: Api) -> None:
    job_id = stack.client.post("/v1/txt2img", json=TXT).headers["x-job-id"]
    resp = stack.client.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code == 409 and resp.json()["detail"] == f"job {job_id} has already succeeded"


def test_openai_client_generations_b64_and_url(stack: Api) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 2, "guidance_scale": 3.0, "sampler": "ddim",
                                                "negative_prompt": "blurry"})
    assert result.data is not None and len(result.data) == 2 and result.created > 0
    first = base64.b64decode(str(result.data[0].b64_json))
    shown = Image.open(io.BytesIO(first))
    assert shown.size == (64, 64)
    assert (shown.text["seed"], shown.text["sampler"]) == ("5", "ddim")  # type: ignore[attr-defined]
    linked = client.images.generate(prompt="a red circle", n=1, size="64x64", response_format="url",
                                    extra_body={"seed": 5, "steps": 2, "guidance_scale": 3.0, "sampler": "ddim",
                                                "negative_prompt": "blurry"})
    assert linked.data is not None and str(linked.data[0].url).startswith(stack.url)
    assert httpx.get(str(linked.data[0].url)).content == first  # same seed, same bytes
    with pytest.raises(openai.BadRequestError, match="steps must be between 1 and 1000"):
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 5000})


def test_openai_client_edit_repaints_the_transparent_part_of_the_mask(stack: Api) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 40:] = 0  # transparent = edit
    buf = io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA").save(buf, format="PNG")
    original = gradient_png()
    result = client.images.edit(image=("photo.png", original, "image/png"),
                                mask=("mask.png", buf.getvalue(), "image/png"), prompt="a tree", n=1,
                                size="64x64", response_format="b64_json",
                                extra_body={"seed": 3, "steps": 2})
    assert result.data is not None and len(result.data) == 1
    out, before = pixels(base64.b64decode(str(result.data[0].b64_json))), pixels(original)
    assert (out[:, :40] == before[:, :40]).all()
    assert np.abs(out[:, 40:] - before[:, 40:]).mean() > 5
    with pytest.raises(openai.BadRequestError, match="no alpha channel"):
        client.images.edit(image=("photo.png", original, "image/png"), prompt="a tree",
                           mask=("mask.png", png(mode="L", color=255), "image/png"))


def test_models_lists_the_workers_models(stack: Api) -> None:
    listed = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused").models.list()
    assert [m.id for m in listed.data] == [MODEL]
    body = stack.client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["workers"] == 1
    assert body["data"][0]["tasks"] == ["txt2img", "img2img", "inpaint"] and body["data"][0]["labels"] is None


def test_task_the_model_cannot_do_and_unknown_model_are_422(stack: Api) -> None:
    resp = stack.client.post("/v1/jobs", json={"prompt": "x", "task": "upscale", "image": b64(png())})
    assert problems(resp)["task"].startswith(f"model {MODEL!r} cannot do upscale; it can do img2img, inpaint, txt2img")
    resp = stack.client.post("/v1/jobs", json={**TXT, "model": "sd-xxl"})
    assert problems(resp)["model"] == f"unknown model 'sd-xxl'; served: {MODEL}"
    layout = [{"label": "red circle", "box": [0.1, 0.1, 0.5, 0.5]}]
    resp = stack.client.post("/v1/layout2img", json={"layout": layout, "steps": 2})
    assert problems(resp)["task"] == f"model {MODEL!r} cannot do layout; it can do img2img, inpaint, txt2img"


def test_readyz_with_a_worker_and_metrics_count_requests(stack: Api) -> None:
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 1
    stack.client.post("/v1/jobs", json={**TXT, "steps": 0})
    text = stack.client.get("/metrics").text
    assert 'ldm_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert 'ldm_http_requests_total{method="POST",route="/v1/jobs",status="422"}' in text
    assert 'ldm_http_request_duration_seconds_count{method="GET",route="/readyz"}' in text
    assert f'ldm_workers{{model="{MODEL}"}} 1.0' in text and "ldm_redis_up 1.0" in text
    assert "not-a-job" not in text  # route templates, never raw paths


# ------------------------------------------------------------------------------------------------ bad input

INPAINT = {"prompt": "x", "task": "inpaint", "image": b64(png()), "mask": b64(png(mode="L", color=255))}


@pytest.mark.parametrize(("body", "field", "message"), [
    ({**TXT, "width": 100}, "width", "width must be a multiple of 8, got 100"),
    ({**TXT, "height": 2048}, "height", "height must be between 32 and 1024 pixels, got 2048"),
    ({**TXT, "width": 16}, "width", "width must be between 32 and 1024 pixels, got 16"),
    ({**TXT, "steps": 0}, "steps", "Input should be greater than or equal to 1"),
    ({**TXT, "steps": 5000}, "steps", "steps must be between 1 and 1000, got 5000"),
    ({**TXT, "guidance_scale": -1}, "guidance_scale", "Input should be greater than or equal to 0"),
    ({**TXT, "guidance_scale": 31}, "guidance_scale", "guidance_scale must be between 0 and 30.0, got 31.0"),
    ({**TXT, "sampler": "heun"}, "sampler", "Input should be 'ddpm', 'ddim', 'plms', 'dpmpp_2m' or 'euler_a'"),
    ({**TXT, "n": 9}, "n", "n must be between 1 and 8, got 9"),
    ({**TXT, "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({**TXT, "image": b64(png())}, "image", "task txt2img takes no input image"),
    ({**INPAINT, "image": "not base64!"}, "image", "not valid base64: Only base64 data is allowed"),
    ({**INPAINT, "image": b64(b"GIF89a, or rather not an image at all")}, "image",
     "image is not a PNG, JPEG or WebP image"),
    ({**INPAINT, "image": b64(png(60, 64))}, "image", "image is 60x64 pixels; width and height must be multiples of 8"),
    ({**INPAINT, "mask": b64(png(64, 72, "L", 255))}, "mask",
     "mask is 64x72 pixels but the image is 64x64; they must be the same size"),
    ({**INPAINT, "mask": None}, "mask", "task inpaint needs a mask (white = repaint)"),
    ({**INPAINT, "width": 128}, "width", "width 128 differs from the image's width 64; leave width and height out "
     "for image tasks"),
])
def test_bad_job_requests_are_422_naming_the_field(stack: Api, body: dict[str, Any], field: str, message: str) -> None:
    resp = stack.client.post("/v1/jobs", json=body)
    assert problems(resp)[field] == message
    summary = resp.json()["message"]
    assert field in summary and message in summary


def test_sync_endpoints_validate_like_jobs(stack: Api) -> None:
    resp = stack.client.post("/v1/txt2img", json={**TXT, "task": "inpaint"})
    assert problems(resp)["task"] == "this endpoint runs txt2img only; submit inpaint jobs to POST /v1/jobs"
    resp = stack.client.post("/v1/inpaint", json={"prompt": "x", "image": b64(png())})
    assert problems(resp)["mask"] == "task inpaint needs a mask (white = repaint)"
    resp = stack.client.post("/v1/txt2img", json={**TXT, "steps": 2000, "width": 16})
    assert problems(resp) == {"width": "width must be between 32 and 1024 pixels, got 16",
                              "steps": "steps must be between 1 and 1000, got 2000"}  # every problem at once


def test_truncated_image_and_decompression_bombs(api: Callable[..., Api]) -> None:
    app = api(max_image_pixels=256 * 256)
    data = gradient_png()
    resp = app.client.post("/v1/jobs", json={**INPAINT, "image": b64(data[: len(data) // 2])})
    assert problems(resp)["image"].startswith("image could not be decoded (corrupt or truncated PNG data")
    for width, height in ((100_000, 100_000), (1024, 1024)):  # past Pillow's own guard; past ours
        resp = app.client.post("/v1/jobs", json={**INPAINT, "image": b64(png_claiming(width, height))})
        assert resp.status_code == 413 and "pixels" in resp.json()["detail"], resp.text


def test_size_limits_are_413(api: Callable[..., Api]) -> None:
    app = api(max_image_bytes=4000, max_body_bytes=20_000)
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    resp = app.client.post("/v1/jobs", json={**INPAINT, "image": b64(buf.getvalue())})
    assert resp.status_code == 413 and resp.json()["detail"].startswith(f"image is {len(buf.getvalue())} bytes")
    resp = app.client.post("/v1/jobs", json={**TXT, "prompt": "x" * 30_000})
    assert resp.status_code == 413
    assert resp.json() == {"detail": "request body is larger than the limit of 20000 bytes"}
    chunked = app.client.post("/v1/jobs", content=iter([b'{"prompt": "', b"x" * 30_000, b'"}']),
                              headers={"content-type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted as it streams in


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": "x", "response_format": "jpeg"}, "response_format", "Input should be 'b64_json' or 'url'"),
    ({"prompt": "x", "size": "64by64"}, "size", "size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'"),
    ({"prompt": "x", "size": "100x64"}, "size", "width must be a multiple of 8, got 100"),
    ({"prompt": "x", "size": "64x4096"}, "size", "height must be between 32 and 1024 pixels, got 4096"),
    ({"prompt": "x", "n": 20}, "n", "n must be between 1 and 8, got 20"),
    ({"prompt": "x", "steps": 0}, "steps", "Input should be greater than or equal to 1"),
    ({"prompt": "x", "guidance_scale": 100}, "guidance_scale", "guidance_scale must be between 0 and 30.0"),
    ({"prompt": "x", "sampler": "heun"}, "sampler", "Input should be"),
    ({"prompt": "x", "model": "dall-e-3"}, "model", "unknown model 'dall-e-3'"),
    ({"prompt": ""}, "prompt", "String should have at least 1 character"),
    ({"prompt": "x", "style": "vivid", "colour": "red"}, "colour", "Extra inputs are not permitted"),
])
def test_openai_generation_errors_are_400_in_openai_shape(stack: Api, body: dict[str, Any], param: str,
                                                         message: str) -> None:
    error = openai_error(stack.client.post("/v1/images/generations", json=body))
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


def test_openai_edit_errors(stack: Api) -> None:
    def edit(image: bytes, mask: bytes | None = None, **fields: Any) -> dict[str, Any]:
        files = {"image": ("i.png", image, "image/png"), **({"mask": ("m.png", mask, "image/png")} if mask else {})}
        return openai_error(stack.client.post("/v1/images/edits", files=files, data={"prompt": "x", **fields}))

    rgba = png(mode="RGBA", color=(0, 0, 0, 0))
    assert edit(b"not an image")["param"] == "image"
    assert edit(png(), png(mode="L", color=255))["message"].startswith("mask has no alpha channel")
    assert "they must be the same size" in edit(png(), png(64, 32, "RGBA", (0, 0, 0, 0)))["message"]
    assert edit(png())["message"].startswith("mask is required: the image has no transparent pixels")
    assert edit(png(), rgba, size="128x128")["param"] == "size"
    assert edit(png(), rgba, response_format="gif")["param"] == "response_format"
    resp = stack.client.post("/v1/images/edits", data={"prompt": "x"})
    assert openai_error(resp)["param"] == "image"


# ------------------------------------------------------------------------------------------------ no worker

def test_idempotent_resubmission_answers_the_same_job(api: Callable[..., Api]) -> None:
    app = api()
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    first = app.client.post("/v1/jobs", json={**TXT, "seed": None}, headers=key)
    again = app.client.post("/v1/jobs", json={**TXT, "seed": None}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["request"] == first.json()["request"]
    other = app.client.post("/v1/jobs", json={**TXT, "prompt": "something else"}, headers=key)
    assert other.status_code == 409 and "was used for a different request" in other.json()["detail"]
    bad = app.client.post("/v1/jobs", json=TXT, headers={"Idempotency-Key": "spaces are not allowed"})
    assert "Idempotency-Key" in problems(bad)


def test_cancel_of_a_queued_job_is_immediate(api: Callable[..., Api]) -> None:
    app = api()
    job = app.client.post("/v1/jobs", json=TXT).json()
    resp = app.client.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    kinds = [f.event for f in sse(app.client, f"/v1/jobs/{job['id']}/events") if f.data]
    assert kinds == ["queued", "cancelled"]
    images = app.client.get(f"/v1/jobs/{job['id']}/images/0")
    assert images.status_code == 409 and "is cancelled" in images.json()["detail"]
    assert app.client.delete(f"/v1/jobs/{'f' * 32}").status_code == 404


def test_full_queue_is_429_with_retry_after(api: Callable[..., Api]) -> None:
    app = api(queue_max_depth=2, queue_retry_after_s=3)
    assert [app.client.post("/v1/jobs", json=TXT).status_code for _ in range(2)] == [202, 202]
    resp = app.client.post("/v1/jobs", json=TXT)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    assert "is full (2 of 2 jobs)" in resp.json()["detail"]
    error = openai_error(app.client.post("/v1/images/generations", json={"prompt": "x"}), 429)
    assert error["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0).images.generate(prompt="x")


def test_redis_down_is_503_fast_and_healthz_stays_up(api: Callable[..., Api]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    app = api(redis_url=f"redis://127.0.0.1:{closed}/0", redis_connect_timeout_s=0.2, redis_retries=1)
    start = time.monotonic()
    resp = app.client.post("/v1/jobs", json=TXT)
    assert resp.status_code == 503 and resp.json()["detail"].startswith("the job queue is unavailable")
    assert resp.headers["retry-after"] == "1" and time.monotonic() - start < 5
    assert app.client.get(f"/v1/jobs/{'a' * 32}").status_code == 503
    assert app.client.get("/healthz").json() == {"status": "ok"}
    ready = app.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["reason"].startswith("Redis unreachable")
    assert "ldm_redis_up 0.0" in app.client.get("/metrics").text


def test_readyz_is_503_without_a_worker(api: Callable[..., Api]) -> None:
    resp = api().client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["reason"] == "no live worker serves the default model 'tiny-shapes'"


def test_sync_timeout_is_504_with_the_job_id(api: Callable[..., Api]) -> None:
    app = api()
    resp = app.client.post("/v1/txt2img?timeout=0.3", json=TXT)
    assert resp.status_code == 504
    job_id = resp.json()["job_id"]
    assert resp.headers["location"] == f"/v1/jobs/{job_id}" and "did not finish within 0.3 s" in resp.json()["detail"]
    assert app.client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # still there to poll
    error = openai_error(app.client.post("/v1/images/generations?timeout=0.3", json={"prompt": "x"}), 504)
    assert error["code"] == "timeout"


@pytest.mark.parametrize(("error", "status"), [("invalid_input: the image is 64x48, the request says 64x64", 422),
                                             ("unsupported: model 'x' cannot do inpaint", 422),
                                             ("out_of_memory: one 64x64 image does not fit", 413),
                                             ("internal: RuntimeError", 500)])
def test_sync_answer_of_a_failed_job_follows_its_reason(api: Callable[..., Api], error: str, status: int) -> None:
    """A worker that fails the job (speaking the real queue protocol from a thread) with each reason."""
    app = api()
    queue = SyncJobQueue(app.settings)

    def fail_the_job() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            claims = queue.claim(app.settings.default_model, "failing-worker", count=1, block_ms=100)
            if claims:
                [claim] = queue.start(claims)
                queue.fail(claim, error)
                return

    thread = threading.Thread(target=fail_the_job)
    thread.start()
    try:
        resp = app.client.post("/v1/txt2img", json=TXT)
    finally:
        thread.join()
        queue.close()
    assert resp.status_code == status, resp.text
    assert error in resp.json()["detail"] and resp.json()["job_id"]


def test_sync_client_that_goes_away_cancels_its_job(api: Callable[..., Api]) -> None:
    app = api()
    with pytest.raises(httpx.ReadTimeout):
        app.client.post("/v1/txt2img", json={**TXT, "prompt": "abandoned"}, timeout=0.5)
    deadline = time.monotonic() + 5
    client = redis.Redis.from_url(str(app.settings.redis_url))
    try:
        while time.monotonic() < deadline:
            jobs = [k for k in client.scan_iter(match=f"{app.settings.key_prefix}:job:*")]
            statuses = {client.hget(k, "status") for k in jobs}
            if statuses == {b"cancelled"}:
                break
            time.sleep(0.1)
    finally:
        client.close()
    assert statuses == {b"cancelled"}


def test_sync_client_with_an_idempotency_key_that_goes_away_leaves_its_job(api: Callable[..., Api]) -> None:
    """As over gRPC: the key lets a resend collect the result, so the job is not cancelled."""
    app = api()
    key = {"Idempotency-Key": f"leave-{uuid.uuid4().hex}"}
    with pytest.raises(httpx.ReadTimeout):
        app.client.post("/v1/txt2img", json={**TXT, "prompt": "kept"}, headers=key, timeout=0.5)
    time.sleep(1.5)  # the API notices the disconnect within a second
    resent = app.client.post("/v1/txt2img?timeout=0.3", json={**TXT, "prompt": "kept"}, headers=key)
    assert resent.status_code == 504  # no worker here: still queued, the same job
    job_id = resent.json()["job_id"]
    assert app.client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_sse_keep_alive_comments_while_queued(api: Callable[..., Api]) -> None:
    app = api(sse_keepalive_s=0.2)
    job = app.client.post("/v1/jobs", json=TXT).json()
    frames = sse(app.client, f"/v1/jobs/{job['id']}/events", stop=lambda f: bool(f.comments))
    assert frames[0].data is None  # the retry: hint
    assert frames[1].event == "queued" and frames[-1].comments == [": keep-alive"]


def test_docs_and_openapi_describe_the_api(api: Callable[..., Api]) -> None:
    app = api()
    assert app.client.get("/docs").status_code == 200
    paths = app.client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images/{index}", "/v1/jobs/{job_id}/events",
            "/v1/txt2img", "/v1/inpaint", "/v1/class2img", "/v1/layout2img", "/v1/semantic2img", "/v1/unconditional",
            "/v1/images/generations", "/v1/images/edits", "/v1/models", "/healthz",
            "/readyz", "/metrics"} <= set(paths)
