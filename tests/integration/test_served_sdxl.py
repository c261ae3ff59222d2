"""SDXL through the running service: micro-conditioning on every front end (native REST, gRPC, the `openai` package's
extra_body) and base + refiner in one job (`refiner`, `refiner_switch`; A1111's refiner_checkpoint and
refiner_switch_at), with real worker processes.

Four workers, started together: `xl`, a toy SDXL base holding the toy refiner `xl-refiner` beside it
(LDM_WORKER_REFINER); `xl-continuous`, the same with LDM_BATCHING=continuous; `toysd`, a toy SD v1 model; `x4`, a toy
SD x4 upscaler (tests/helpers.py `toy_sdxl_config`, `toy_sd_config`, `toy_x4_upscaler_config`: random weights at toy
width with the real structure, saved as single files with a tokenizer folder beside them). The workers register
what their model takes (`options`, `refiners`), so a field the model does not take is refused at submission, naming
it; the worker checks again for jobs that get past. The refined image must be the one the library's base + refiner
run makes (tests/integration/test_sdxl_parity.py shows that run matches diffusers), and the upscaled one the
library's upscale at the asked noise_level.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
from PIL import Image

from models.checkpoints import load_model, save_model
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.tokenizers import CLIPTokenizer
from service.config import Settings
from service.queue import Job, JobStatus, SyncJobQueue
from tests.helpers import (
    drop_keys,
    random_model,
    stop_process,
    torch_threads,
    toy_sd_config,
    toy_sdxl_config,
    toy_sr_config,
    toy_x4_upscaler_config,
    wait_until,
    write_clip_tokenizer,
)
from tests.integration.test_rest import Api, serving
from tests.integration.test_served_conditionings import grpc_stub, pb

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
XL, REFINER, SD, X4 = "xl", "xl-refiner", "toysd", "x4"
CONTINUOUS = "xl-continuous"  # the SDXL base and refiner again, served by a continuous-batching worker
FAST: dict[str, Any] = {"redis_timeout_s": 2.0, "redis_connect_timeout_s": 0.5, "redis_retries": 2,
                        "redis_backoff_s": 0.05, "heartbeat_interval_s": 0.5, "max_wait_ms": 20, "max_batch": 8}
JOB: dict[str, Any] = {"model": XL, "steps": 4, "width": 64, "height": 64, "sampler": "ddim", "prompt": "a red circle",
                       "seed": 3, "guidance_scale": 5.0}
MICRO = {"original_size": [1024, 768], "crops_coords_top_left": [16, 32], "target_size": [512, 512]}


@dataclass
class Stack:
    settings: Settings
    api: Api
    queue: SyncJobQueue
    folder: Path
    workers: list[subprocess.Popen[bytes]]

    def start_worker(self, model: str, name: str | None = None, **env_settings: str) -> subprocess.Popen[bytes]:
        """A worker process for the file of `model`, serving the queue `name` (default: the file's stem)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env.update({f"LDM_{k.upper()}": str(v) for k, v in FAST.items()})
        env.update(LDM_REDIS_URL=str(self.settings.redis_url), LDM_KEY_PREFIX=self.settings.key_prefix,
                   LDM_WORKER_TORCH_THREADS="1", OMP_NUM_THREADS="1",
                   LDM_WORKER_TOKENIZER_DIR=str(self.folder / "tokenizer"))
        env.update({f"LDM_{k.upper()}": v for k, v in env_settings.items()})
        with (self.folder / f"{model}-{len(self.workers)}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.worker", "--model",
                                     str(self.folder / f"{model}.safetensors"), "--model-name", name or model],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def wait_registered(self, model: str, proc: subprocess.Popen[bytes]) -> None:
        wait_until(lambda: bool(self.queue.workers(model)), 120, f"the {model} worker to register", every_s=0.05,
                   procs=[proc], log=lambda: "\n".join(p.read_text(errors="replace")
                                                       for p in self.folder.glob("*.log")))

    def submit(self, **fields: Any) -> str:
        resp = self.api.client.post("/v1/jobs", json={**JOB, **fields})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def wait(self, job_id: str, timeout_s: float = 120) -> Job:
        deadline = time.monotonic() + timeout_s
        while (job := self.queue.get(job_id)) is None or not job.status.terminal:
            assert time.monotonic() < deadline, f"job {job_id} did not end"
            time.sleep(0.02)
        return job

    def png(self, job_id: str, timeout_s: float = 120) -> bytes:
        job = self.wait(job_id, timeout_s)
        assert job.status == JobStatus.succeeded, job.error
        png = self.queue.result(job_id, 0)
        assert png is not None
        return png


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("served-sdxl")
    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    vocab = CLIPTokenizer.from_dir(tokenizer).vocab_size
    with torch_threads(1):
        save_model(random_model(toy_sdxl_config(vocab, name=XL), seed=1), folder / f"{XL}.safetensors")
        save_model(random_model(toy_sdxl_config(vocab, refiner=True, name=REFINER), seed=2),
                   folder / f"{REFINER}.safetensors")
        save_model(random_model(toy_sd_config(vocab, name=SD), seed=3), folder / f"{SD}.safetensors")
        save_model(random_model(toy_x4_upscaler_config(vocab, name=X4), seed=4), folder / f"{X4}.safetensors")
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=XL,
                        grpc_port=0, **FAST)
    queue = SyncJobQueue(settings)
    s: Stack | None = None
    try:
        with serving(settings) as api:
            s = Stack(settings, api, queue, folder, [])
            sdxl = {"worker_refiner": str(folder / f"{REFINER}.safetensors"), "worker_tokenizer_2_dir": str(tokenizer)}
            started = {XL: s.start_worker(XL, **sdxl), SD: s.start_worker(SD), X4: s.start_worker(X4),
                       CONTINUOUS: s.start_worker(XL, CONTINUOUS, batching="continuous", **sdxl)}
            for name, proc in started.items():  # they start together: their loading overlaps
                s.wait_registered(name, proc)
            yield s
    finally:
        procs = s.workers if s is not None else []
        for proc in procs:  # all at once: they drain in parallel
            proc.terminate()
        for proc in procs:
            stop_process(proc)
        queue.close()
        drop_keys(redis_url, settings.key_prefix)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def text_of(png: bytes) -> dict[str, str]:
    return dict(Image.open(io.BytesIO(png)).text)  # type: ignore[attr-defined]


def test_workers_register_what_their_models_take(stack: Stack) -> None:
    models = {m["id"]: m for m in stack.api.client.get("/v1/models").json()["data"]}
    assert models[XL]["options"] == ["original_size", "crops_coords_top_left", "target_size"]
    assert models[XL]["refiners"] == [REFINER]
    assert (models[SD]["options"], models[SD]["refiners"]) == ([], [])


@pytest.mark.anyio
async def test_micro_conditioning_is_the_same_image_through_every_front_end(stack: Stack) -> None:
    """The same micro-conditioned job through native REST, gRPC (PixelSize, CropCorner) and the openai client's
    extra_body: the same PNG bytes, which carry the fields; without them the image differs."""
    native = stack.png(stack.submit(**MICRO))
    plain = stack.png(stack.submit())
    assert np.abs(pixels(native) - pixels(plain)).max() > 0  # the conditioning reaches the UNet
    assert (text_of(native)["original_size"], text_of(native)["target_size"]) == ("[1024, 768]", "[512, 512]")
    assert "original_size" not in text_of(plain)
    params = {k: v for k, v in JOB.items() if k not in ("model", "guidance_scale")}
    async with grpc_stub(stack.settings) as stub:
        answer = await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
            model=XL, guidance_scale=5.0, original_size=pb.PixelSize(height=1024, width=768),
            crops_coords_top_left=pb.CropCorner(top=16, left=32), target_size=pb.PixelSize(height=512, width=512),
            **params)))
    assert answer.images[0].png == native
    assert (answer.parameters.original_size.height, answer.parameters.crops_coords_top_left.left) == (1024, 32)
    client = openai.OpenAI(base_url=f"{stack.api.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt=JOB["prompt"], model=XL, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 4, "sampler": "ddim", "guidance_scale": 5.0,
                                                **MICRO})
    assert result.data is not None and base64.b64decode(result.data[0].b64_json or "") == native


@pytest.mark.anyio
async def test_micro_conditioning_is_refused_by_name_by_other_models(stack: Stack) -> None:
    """A model without micro-conditioning (SD v1 here) refuses each field at submission, naming it: 422 over REST and
    the OpenAI route, INVALID_ARGUMENT naming parameters.<field> over gRPC."""
    resp = stack.api.client.post("/v1/jobs", json={**JOB, "model": SD, "crops_coords_top_left": [0, 8]})
    assert resp.status_code == 422, resp.text
    assert "crops_coords_top_left is SDXL micro-conditioning; model 'toysd' is not an SDXL model" in resp.text
    async with grpc_stub(stack.settings) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
                model=SD, prompt="a red circle", steps=2, original_size=pb.PixelSize(height=512, width=512))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.original_size: original_size is SDXL micro-conditioning; model 'toysd' is not an SDXL model" \
        in str(err.value.details())
    client = openai.OpenAI(base_url=f"{stack.api.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError, match="target_size is SDXL base micro-conditioning; model 'toysd'"):
        client.images.generate(prompt="a red circle", model=SD, extra_body={"target_size": [64, 64]})


def expected_refined(stack: Stack, switch: float) -> np.ndarray:
    """The library's base + refiner run of JOB (the same files, tokenizers and CPU path as the worker)."""
    tokenizer = stack.folder / "tokenizer"
    with torch_threads(1):
        base, refiner = (load_model(stack.folder / f"{name}.safetensors", tokenizer_dir=tokenizer,
                                    tokenizer_2_dir=tokenizer) for name in (XL, REFINER))
        settings = RunSettings(sampler="ddim", steps=4, width=64, height=64, refiner_switch=switch)
        image = Pipeline(base, refiner=refiner, prompt_syntax="a1111").txt2img(
            [SampleSpec(JOB["prompt"], seed=JOB["seed"], guidance_scale=JOB["guidance_scale"])], settings).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.anyio
async def test_base_then_refiner_is_one_job_on_every_front_end(stack: Stack) -> None:
    """`refiner` + `refiner_switch` make the image of the library's base + refiner run; gRPC, the OpenAI route and
    A1111's refiner_checkpoint (a checkpoint title) / refiner_switch_at give the same image; the PNG and A1111's
    infotext say which refiner finished it and where."""
    native = stack.png(stack.submit(refiner=REFINER, refiner_switch=0.5))
    assert np.abs(pixels(native) - expected_refined(stack, 0.5)).max() <= 1  # CPU rounding may move a level
    assert np.abs(pixels(native) - pixels(stack.png(stack.submit()))).max() > 8  # the refiner did the last steps
    assert (text_of(native)["refiner"], text_of(native)["refiner_switch"]) == (REFINER, "0.5")
    params = {k: v for k, v in JOB.items() if k not in ("model", "guidance_scale")}
    async with grpc_stub(stack.settings) as stub:
        answer = await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
            model=XL, guidance_scale=5.0, refiner=REFINER, refiner_switch=0.5, **params)))
    assert answer.images[0].png == native and answer.parameters.refiner == REFINER
    client = openai.OpenAI(base_url=f"{stack.api.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt=JOB["prompt"], model=XL, size="64x64", extra_body={
        "seed": 3, "steps": 4, "sampler": "ddim", "guidance_scale": 5.0, "refiner": REFINER, "refiner_switch": 0.5})
    assert result.data is not None and base64.b64decode(result.data[0].b64_json or "") == native
    a1111 = stack.api.client.post("/sdapi/v1/txt2img", json={
        "prompt": JOB["prompt"], "seed": 3, "steps": 4, "sampler_name": "DDIM", "cfg_scale": 5.0, "width": 64,
        "height": 64, "override_settings": {"sd_model_checkpoint": XL},
        "refiner_checkpoint": f"{REFINER}.safetensors [0123abcd]", "refiner_switch_at": 0.5})
    assert a1111.status_code == 200, a1111.text
    assert base64.b64decode(a1111.json()["images"][0]) == native
    assert "Refiner: xl-refiner, Refiner switch at: 0.5" in a1111.json()["info"]


def test_a1111_hires_fix_refines_its_first_pass_and_says_so(stack: Stack) -> None:
    """With the hires fix the refiner finishes the first pass (txt2img); the second pass (img2img) runs on the model
    alone, and `info.ldm_ignored` says so."""
    resp = stack.api.client.post("/sdapi/v1/txt2img", json={
        "prompt": JOB["prompt"], "seed": 3, "steps": 2, "sampler_name": "DDIM", "width": 64, "height": 64,
        "override_settings": {"sd_model_checkpoint": XL}, "refiner_checkpoint": REFINER, "enable_hr": True,
        "hr_scale": 1.5, "hr_upscaler": "Lanczos"})
    assert resp.status_code == 200, resp.text
    info = json.loads(resp.json()["info"])
    assert "hires pass runs on the model alone" in info["ldm_ignored"]["refiner_checkpoint"]
    assert "Refiner: xl-refiner, Refiner switch at: 0.8" in info["infotexts"][0]
    assert pixels(base64.b64decode(resp.json()["images"][0])).shape == (96, 96, 3)


def test_refiner_switch_defaults_to_0_8(stack: Stack) -> None:
    job = stack.submit(refiner=REFINER)
    assert np.abs(pixels(stack.png(job)) - expected_refined(stack, 0.8)).max() <= 1
    assert stack.api.client.get(f"/v1/jobs/{job}").json()["request"]["refiner_switch"] == 0.8


@pytest.mark.anyio
async def test_a_refiner_the_workers_do_not_hold_is_refused_by_name(stack: Stack) -> None:
    """An unknown refiner (or one asked of a model whose workers hold none), a switch without a refiner, a refiner
    on another task: 422 naming the field (A1111: its own field names), INVALID_ARGUMENT over gRPC."""
    cases = [({"refiner": "ghost"}, "refiner", f"model 'xl' has no refiner 'ghost': its workers hold '{REFINER}'"),
             ({"model": SD, "refiner": REFINER}, "refiner", "model 'toysd' has no refiner 'xl-refiner': its workers "
              "hold none (a worker holds one with LDM_WORKER_REFINER)"),
             ({"refiner_switch": 0.5}, "refiner_switch", "refiner_switch needs a refiner"),
             ({"refiner": REFINER, "refiner_switch": 1.0}, "refiner_switch", "less than 1")]
    for fields, name, message in cases:
        resp = stack.api.client.post("/v1/jobs", json={**JOB, **fields})
        assert resp.status_code == 422 and message in resp.text, (fields, resp.text)
        assert any(d["loc"][-1] == name for d in resp.json()["detail"]), resp.text
    a1111 = stack.api.client.post("/sdapi/v1/txt2img", json={
        "prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "refiner_checkpoint": "ghost [00ff]"})
    assert a1111.status_code == 422 and "no refiner 'ghost'" in a1111.text
    assert a1111.json()["detail"][0]["loc"][-1] == "refiner_checkpoint"
    async with grpc_stub(stack.settings) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
                model=XL, prompt="a red circle", steps=2, refiner="ghost")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.refiner: model 'xl' has no refiner 'ghost'" in str(err.value.details())


def test_a_continuous_batching_worker_hands_over_to_the_refiner(stack: Stack) -> None:
    """With LDM_BATCHING=continuous the base's steps run in the step batch beside other jobs, and the refiner finishes
    a job's images once they all reach the switch: the images of the static worker (the PNGs differ only in the
    model name they carry)."""
    refined = stack.submit(model=CONTINUOUS, refiner=REFINER, refiner_switch=0.5, n=2)
    plain = stack.submit(model=CONTINUOUS)
    second = stack.png(refined) and stack.queue.result(refined, 1)
    assert second is not None
    for png, static in ((stack.png(refined), stack.submit(refiner=REFINER, refiner_switch=0.5)),
                        (second, stack.submit(refiner=REFINER, refiner_switch=0.5, seed=4)),
                        (stack.png(plain), stack.submit())):
        assert np.array_equal(pixels(png), pixels(stack.png(static)))
    done = stack.wait(refined)
    assert (done.step, done.total) == (4, 4)  # the refiner's steps are reported too


def test_the_worker_checks_each_job_itself_and_refuses_a_refiner_that_does_not_fit(stack: Stack) -> None:
    """A job that got past the front end (no live worker had registered) fails alone, as `unsupported`, naming the
    field; a worker whose refiner cannot finish its model's runs does not start."""
    from service.schemas import GenerationRequest
    from service.worker.runner import JobFailure, Runner

    tokenizer = stack.folder / "tokenizer"
    with torch_threads(1):
        sd = Runner.load(str(stack.folder / f"{SD}.safetensors"), tokenizer_dir=tokenizer)
        for fields, message in (({"target_size": (64, 64)}, "target_size is SDXL base micro-conditioning"),
                                ({"refiner": REFINER}, "model 'toysd' has no refiner 'xl-refiner'")):
            with pytest.raises(JobFailure, match=message) as failure:
                sd.check(GenerationRequest(model=SD, **fields))  # type: ignore[arg-type]
            assert failure.value.reason == "unsupported"
        sr = Runner(random_model(toy_sr_config()), "toy-sr")  # LDM-SR: upscales its input without noise
        with pytest.raises(JobFailure, match="noise_level applies to the SD x4 upscaler only; model 'toy-sr' is not"):
            sr.check(GenerationRequest(model="toy-sr", task="upscale", noise_level=30, image=b"png"))
        vocab = CLIPTokenizer.from_dir(tokenizer).vocab_size
        xl, plain = random_model(toy_sdxl_config(vocab)), random_model(toy_sd_config(vocab))
        with pytest.raises(ValueError, match="refiner 'toy-sd' is sd_v1, not an SDXL refiner"):
            Runner(xl, XL, refiner=plain)
        with pytest.raises(ValueError, match="finishes an SDXL base model's images; model 'toy-sd' is sd_v1"):
            Runner(plain, SD, refiner=xl)


def test_the_new_parameters_round_trip_through_the_proto() -> None:
    from service.api.grpc.convert import to_parameters, to_request
    from service.schemas import GenerationRequest, Task

    for fields in ({"original_size": (1024, 768), "crops_coords_top_left": (0, 16), "target_size": (512, 640),
                    "refiner": "r", "refiner_switch": 0.75}, {"task": Task.upscale, "noise_level": 40, "image": b"x"}):
        request = GenerationRequest(prompt="p", seed=3, **fields)  # type: ignore[arg-type]
        task = request.task
        back = to_request(pb.GenerationParameters.FromString(to_parameters(request).SerializeToString()), task,
                          image=request.image)
        assert {k: getattr(back, k) for k in fields} == {k: getattr(request, k) for k in fields}
    unset = to_request(pb.GenerationParameters(prompt="p"), Task.txt2img)
    assert (unset.original_size, unset.refiner, unset.refiner_switch, unset.noise_level) == (None, None, None, None)


def low_res_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")  # the smallest size the settings take
    return buf.getvalue()


@pytest.mark.anyio
async def test_noise_level_reaches_the_x4_upscaler_and_is_refused_elsewhere(stack: Stack) -> None:
    """A worker serving the SD x4 upscaler (toy) registers `noise_level`: an upscale job with it makes the library's
    image at that level (other than the default level's), over REST and gRPC (Upscale); above the model's
    max_noise_level the job fails as invalid_input; any other task refuses the field by name."""
    low = low_res_png()
    job = {"model": X4, "task": "upscale", "prompt": "a red square", "steps": 3, "sampler": "ddim", "seed": 5,
           "image": base64.b64encode(low).decode(), "width": None, "height": None, "guidance_scale": None}
    assert {m["id"]: m for m in stack.api.client.get("/v1/models").json()["data"]}[X4]["options"] == ["noise_level"]
    native = stack.png(stack.submit(**job, noise_level=100))
    default = stack.png(stack.submit(**job))
    too_much = stack.submit(**job, noise_level=351)
    async with grpc_stub(stack.settings) as stub:
        answer = await stub.Upscale(pb.ImageRequest(image=low, parameters=pb.GenerationParameters(
            model=X4, prompt="a red square", steps=3, sampler="ddim", seed=5, noise_level=100)))
    with torch_threads(1):
        model = load_model(stack.folder / f"{X4}.safetensors", tokenizer_dir=stack.folder / "tokenizer")
        expected = Pipeline(model, prompt_syntax="a1111").upscale(
            [SampleSpec("a red square", seed=5)], RunSettings(sampler="ddim", steps=3, noise_level=100),
            [Image.open(io.BytesIO(low)).convert("RGB")]).images[0]
    assert pixels(native).shape == (128, 128, 3) and text_of(native)["noise_level"] == "100"
    assert np.abs(pixels(native) - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert np.abs(pixels(native) - pixels(default)).max() > 0
    assert answer.images[0].png == native and answer.parameters.noise_level == 100
    failed = stack.wait(too_much)
    assert failed.error == "invalid_input: noise_level must be within 0..350 for model 'x4', " \
        "got 351"
    resp = stack.api.client.post("/v1/jobs", json={**JOB, "noise_level": 20})
    assert resp.status_code == 422 and "noise_level applies to task upscale only" in resp.text
