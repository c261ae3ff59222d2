"""Hard limits on input, each with its setting, over REST (real uvicorn) and gRPC (real grpc.aio), plus what no
request can make the service do: wait past its deadline, unpickle code, open a file by model name, fetch a URL.

Every limit is tried just over (refused, naming the field, nothing queued) and exactly at its value (accepted), so
a limit that is not wired to its setting, or is off by one, fails here.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import pathlib
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from PIL import Image

from models.checkpoints import CheckpointError, load_model
from service.config import Settings
from service.queue import JobQueue
from tests.helpers import drop_keys, png_claiming, wait_ready
from tests.integration.secure import TXT, grpc_serving, params, pb, queued
from tests.integration.test_rest import FAST, Api, serving, worker_process
from tests.integration.test_rest import MODEL as WORKER_MODEL

pytestmark = pytest.mark.timeout(90)
MODEL = "tiny-shapes"
ROOT = Path(__file__).resolve().parents[2]


def png(width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Api]]:
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serving(make_settings(**overrides)))


# ------------------------------------------------------------------------------------------------ limits

#: (setting, its value, body just over, field, message, body exactly at the limit)
LIMITS: list[tuple[str, Any, dict[str, Any], str, str, dict[str, Any]]] = [
    ("max_prompt_bytes", 12, {"prompt": "é" * 7}, "prompt", "prompt is 14 bytes long; the limit is 12 bytes",
     {"prompt": "é" * 6}),
    ("max_prompt_bytes", 12, {"prompt": "x", "negative_prompt": "x" * 13}, "negative_prompt",
     "the limit is 12 bytes", {"prompt": "x", "negative_prompt": "x" * 12}),
    ("max_steps", 5, {"steps": 6}, "steps", "steps must be between 1 and 5, got 6", {"steps": 5}),
    ("max_n", 2, {"n": 3}, "n", "n must be between 1 and 2, got 3", {"n": 2}),
    ("max_width", 128, {"width": 136}, "width", "width must be between 32 and 128 pixels, got 136", {"width": 128}),
    ("max_height", 96, {"height": 104}, "height", "height must be between 32 and 96 pixels, got 104",
     {"height": 96}),
    ("min_width", 48, {"width": 40}, "width", "width must be between 48 and 1024 pixels, got 40", {"width": 48}),
    ("min_height", 48, {"height": 40}, "height", "height must be between 48 and 1024", {"height": 48}),
    ("size_multiple", 16, {"width": 72}, "width", "width must be a multiple of 16, got 72", {"width": 80}),
    ("max_guidance_scale", 5.0, {"guidance_scale": 5.5}, "guidance_scale",
     "guidance_scale must be between 0 and 5.0, got 5.5", {"guidance_scale": 5.0}),
]


def openai_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The same request to the OpenAI-compatible endpoint (which takes the size as 'WxH')."""
    body = {"prompt": "x", **{k: v for k, v in fields.items() if k not in ("width", "height")}}
    if "width" in fields or "height" in fields:
        body["size"] = f"{fields.get('width', 64)}x{fields.get('height', 64)}"
    return body


@pytest.mark.parametrize(("setting", "value", "over", "field", "message", "at"), LIMITS,
                         ids=[f"{row[0]}-{row[3]}" for row in LIMITS])
def test_each_limit_has_a_setting_refuses_just_over_and_accepts_at(
        api: Callable[..., Api], setting: str, value: Any, over: dict[str, Any], field: str, message: str,
        at: dict[str, Any]) -> None:
    app = api(**{setting: value})
    resp = app.client.post("/v1/jobs", json={**TXT, **over})
    assert resp.status_code == 422, resp.text
    problems = {".".join(map(str, p["loc"][1:])): p["msg"] for p in resp.json()["detail"]}
    assert message in problems[field]
    openai = app.client.post("/v1/images/generations", json=openai_body(over))
    assert openai.status_code == 400 and message in openai.json()["error"]["message"], openai.text
    assert queued(app.settings, MODEL) == 0
    assert app.client.post("/v1/jobs", json={**TXT, **at}).status_code == 202


def test_static_bounds_hold_whatever_the_settings(api: Callable[..., Api]) -> None:
    app = api()
    for body, field in (({"guidance_scale": -0.5}, "guidance_scale"), ({"steps": 0}, "steps"), ({"n": 0}, "n"),
                        ({"seed": -1}, "seed"), ({"strength": 1.5}, "strength"), ({"width": 0}, "width")):
        resp = app.client.post("/v1/jobs", json={**TXT, **body})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == field, resp.text
    assert queued(app.settings, MODEL) == 0


def test_body_image_and_pixel_limits_are_413(api: Callable[..., Api]) -> None:
    app = api(max_body_bytes=30_000, max_image_bytes=2_000, max_image_pixels=96 * 96)
    inpaint = {"prompt": "x", "task": "inpaint", "mask": b64(png())}
    by_length = app.client.post("/v1/jobs", json={**TXT, "prompt": "x" * 40_000})
    assert by_length.status_code == 413 and "30000 bytes" in by_length.json()["detail"]
    streamed = app.client.post("/v1/jobs", content=iter([b'{"prompt": "', b"x" * 40_000, b'"}']),
                               headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(noisy, format="PNG")  # incompressible: > 2000 bytes
    too_many_bytes = app.client.post("/v1/jobs", json={**inpaint, "image": b64(noisy.getvalue())})
    assert too_many_bytes.status_code == 413 and "the limit is 2000 bytes" in too_many_bytes.json()["detail"]
    bomb = app.client.post("/v1/jobs", json={**inpaint, "image": b64(png_claiming(128, 128))})
    assert bomb.status_code == 413 and "the limit is 9216 pixels" in bomb.json()["detail"]
    files = {"image": ("bomb.png", png_claiming(50_000, 50_000), "image/png")}
    edit = app.client.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert edit.status_code == 413 and edit.json()["error"]["param"] == "image"
    assert queued(app.settings, MODEL) == 0


@pytest.mark.anyio
async def test_grpc_applies_the_same_limits(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_steps=5, max_n=2, max_prompt_bytes=12, max_guidance_scale=5.0,
                             max_image_pixels=96 * 96)
    async with grpc_serving(settings) as env:
        for fields, message in (({"steps": 6}, "parameters.steps: steps must be between 1 and 5"),
                                ({"n": 3}, "parameters.n: n must be between 1 and 2"),
                                ({"prompt": "x" * 13}, "parameters.prompt: prompt is 13 bytes long"),
                                ({"guidance_scale": 6.0}, "parameters.guidance_scale"),
                                ({"model": "../zoo/tiny-shapes"}, "parameters.model")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await env.stub.Generate(pb.GenerateRequest(parameters=params(**fields)), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.Inpaint(pb.InpaintRequest(parameters=params(width=None, height=None),
                                                     image=png_claiming(60_000, 60_000), mask=png()), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in (err.value.details() or "")
        assert queued(settings, MODEL) == 0


# ------------------------------------------------------------------------------------------------ deadlines

def test_a_request_may_ask_for_a_shorter_deadline_never_a_longer_one(api: Callable[..., Api]) -> None:
    app = api(job_deadline_s=30)
    short = app.client.post("/v1/jobs", json={**TXT, "deadline_s": 0.2}).json()
    assert short["deadline_s"] == 0.2
    assert app.client.post("/v1/jobs", json={**TXT, "deadline_s": 3600}).json()["deadline_s"] == 30
    assert app.client.post("/v1/jobs", json=TXT).json()["deadline_s"] == 30
    for bad in (0, -1, "soon"):
        assert app.client.post("/v1/jobs", json={**TXT, "deadline_s": bad}).status_code == 422
    generated = app.client.post("/v1/images/generations?timeout=0.2", json={"prompt": "x", "deadline_s": 0.1})
    assert generated.status_code == 504
    record = app.client.get(f"/v1/jobs/{generated.json()['job_id']}").json()
    assert record["deadline_s"] == 0.1
    # no worker takes it: a synchronous call answers when its deadline passes, not when its own timeout does
    began = time.monotonic()
    unserved = app.client.post("/v1/images/generations", json={"prompt": "x", "deadline_s": 0.3})
    assert unserved.status_code == 504 and time.monotonic() - began < 3, unserved.text
    assert "deadline exceeded" in unserved.text
    assert app.client.get(f"/v1/jobs/{unserved.json()['job_id']}").json()["status"] == "failed"


@pytest.mark.anyio
async def test_grpc_deadline_is_the_jobs_deadline_unless_an_idempotency_key_keeps_it(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(job_deadline_s=60)
    async with grpc_serving(settings) as env, JobQueue(settings) as queue:
        for key, timeout in (("", 0.6), ("keep-me", 0.6)):
            call = env.stub.Generate(pb.GenerateRequest(parameters=params(), idempotency_key=key), timeout=timeout)
            with pytest.raises(grpc.aio.AioRpcError):
                await call
            job = await queue.get(dict(await call.initial_metadata())["ldm-job-id"])
            assert job is not None and job.deadline_s is not None
            assert (job.deadline_s <= timeout) if not key else (job.deadline_s == 60)


@pytest.fixture(scope="module")
def busy_worker(redis_url: str) -> Iterator[Api]:
    """An API and one real worker process (random:tiny-sd) on a key prefix of their own."""
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}",
                        default_model=WORKER_MODEL, **FAST)
    try:
        with worker_process(settings) as proc, serving(settings) as app:
            wait_ready(app.client.get, 60, procs=[proc])
            yield app
    finally:
        drop_keys(redis_url, settings.key_prefix)


def test_a_worker_never_runs_a_job_whose_deadline_passed_in_the_queue(busy_worker: Api) -> None:
    app = busy_worker
    long = app.client.post("/v1/jobs", json={**TXT, "steps": 400}).json()
    app.wait_status(long["id"], "running")
    late = app.client.post("/v1/jobs", json={**TXT, "deadline_s": 0.3}).json()
    patient = app.client.post("/v1/jobs", json=TXT).json()
    time.sleep(0.8)
    assert app.client.delete(f"/v1/jobs/{long['id']}").status_code == 202  # free the worker
    expired = app.wait_status(late["id"], "failed", "succeeded")
    assert expired["status"] == "failed" and expired["error"].startswith("deadline exceeded: not started within 0.3 s")
    assert expired["started_at"] is None and expired["attempts"] == 0  # never delivered to the worker
    assert app.wait_status(patient["id"], "succeeded", "failed")["status"] == "succeeded"


# ------------------------------------------------------------------------------------------------ never

BAD_MODEL_NAMES = ["../etc/passwd", "..", "../../models/zoo/tiny-shapes", "/etc/passwd", "models/zoo/tiny-shapes",
                   "tiny-shapes/../../x", "..\\..\\windows", "%2e%2e%2fetc", "~/x", "x\x00y", " tiny", "x" * 129]


def test_model_names_never_become_paths(api: Callable[..., Api]) -> None:
    app = api()
    for name in BAD_MODEL_NAMES:
        resp = app.client.post("/v1/jobs", json={**TXT, "model": name})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "model"], (name, resp.text)
        error = app.client.post("/v1/images/generations", json={"prompt": "x", "model": name}).json()["error"]
        assert error["param"] == "model", name
    assert queued(app.settings, MODEL) == 0


class Payload:
    """Unpickling this would run `Path.touch(marker)`: the shape of every pickle exploit (a callable + args)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return pathlib.Path.touch, (self.marker,)


def test_a_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: refused: .*weights_only=True"):
        load_model(path)
    assert not marker.exists()
    safetensors_only = tmp_path / "folder"
    safetensors_only.mkdir()
    (safetensors_only / "model.ckpt").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="expected one .safetensors file"):  # a folder loads safetensors only
        load_model(safetensors_only)
    assert not marker.exists()


def test_an_image_given_as_a_url_is_refused_and_never_fetched(api: Callable[..., Api]) -> None:
    app = api()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/image.png"
        for body in ({"task": "img2img", "image": url}, {"task": "inpaint", "image": b64(png()), "mask": url},
                     {"task": "img2img", "image": f"data:text/uri-list,{url}"}):
            resp = app.client.post("/v1/jobs", json={"prompt": "x", **body})
            assert resp.status_code == 422 and "not valid base64" in resp.text, resp.text
        generated = app.client.post("/v1/images/generations", json={"prompt": "x", "image": url})
        assert generated.status_code == 400  # not a field of generations at all
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody came
    assert queued(app.settings, MODEL) == 0


URL_CLIENTS = ("urllib.request", "http.client", "httpx", "requests", "aiohttp", "urllib3", "pycurl", "ftplib")


def imported(tree: ast.AST) -> list[str]:
    """Every module name an import statement of `tree` names (`from a import b` names a and a.b)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return names


def test_no_service_module_can_fetch_a_url() -> None:
    """The service imports no HTTP client (the worker's /metrics server and grpc are servers, not clients), but for
    the webhooks, which only POST to allow-listed hosts (tests/integration/test_webhooks.py) and never fetch, and
    the one-box /metrics, which reads only the loopback /metrics URLs of the workers `ldm serve` itself started
    (service/metrics.py `SupervisedWorkersCollector`; no request names a URL)."""
    found = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "service").rglob("*.py"))
             for name in imported(ast.parse(path.read_text()))
             if any(name == c or name.startswith(c + ".") for c in URL_CLIENTS)]
    assert found == ["service/metrics.py: httpx", "service/webhooks.py: httpx"]
    assert "urllib.request" in imported(ast.parse("from urllib import request"))  # the check sees this form
