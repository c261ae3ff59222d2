"""The AUTOMATIC1111-compatible API (/sdapi/v1) driven by the real `webuiapi` client (its PyPI package, as A1111
users run it) against a real uvicorn, the test Redis and a real worker process (model random:tiny-sd: random
weights, so images are noise, but every byte comes through the real pipeline and queue)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image

from service.config import Settings
from tests.integration.secure import Keys, bearer
from tests.integration.test_rest import FAST, MODEL, Api, gradient_png, pixels, ready_stack, serving
from tests.integration.test_webhooks import SECRET, receiving

pytestmark = pytest.mark.timeout(90)
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def a1111(redis_url: str) -> Iterator[Api]:
    """The API and one real worker (model random:tiny-sd, the default), ready."""
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=MODEL,
                        webhook_allowed_hosts=("127.0.0.1",), webhook_secret=SECRET, **FAST)
    with ready_stack(settings) as api:
        yield api


@pytest.fixture
def client(a1111: Api) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{a1111.url}/sdapi/v1", sampler="DPM++ 2M")


def test_txt2img_gives_the_native_apis_image_for_the_same_seed(a1111: Api, client: webuiapi.WebUIApi) -> None:
    result = client.txt2img(prompt="a red circle", seed=7, cfg_scale=7.5, **SMALL)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert result.info["seed"] == 7 and result.info["all_seeds"] == [7] and result.info["sd_model_name"] == MODEL
    assert result.info["sampler_name"] == "DPM++ 2M" and "Seed: 7" in result.info["infotexts"][0]
    assert result.info["ldm_ignored"] == {}  # every field webuiapi sent was neutral or done
    native = a1111.client.post("/v1/txt2img", json={"prompt": "a red circle", "seed": 7, **SMALL})
    buf = io.BytesIO()
    result.image.save(buf, format="PNG", pnginfo=None)
    assert (pixels(native.content) == pixels(buf.getvalue())).all()
    first = client.txt2img(prompt="a red circle", seed=-1, batch_size=2, **SMALL)  # -1 = random, then seed + i
    seed = first.info["seed"]
    assert isinstance(seed, int) and first.info["all_seeds"] == [seed, seed + 1] and len(first.images) == 2


def test_img2img_with_a_mask_keeps_every_unmasked_pixel(client: webuiapi.WebUIApi) -> None:
    original = Image.open(io.BytesIO(gradient_png()))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :24] = 255
    result = client.img2img(images=[original], mask_image=Image.fromarray(mask), prompt="a blue square", seed=1,
                            denoising_strength=0.9, inpainting_fill=1, **SMALL)
    out, before = np.asarray(result.image.convert("RGB"), np.int16), np.asarray(original, np.int16)
    assert (out[:, 24:] == before[:, 24:]).all()  # kept exactly
    assert np.abs(out[:, :24] - before[:, :24]).mean() > 5  # repainted
    assert result.info["is_using_inpainting_conditioning"] and result.info["denoising_strength"] == 0.9
    assert {"mask_blur", "inpaint_full_res"} <= set(result.info["ldm_ignored"])  # webuiapi's defaults, not done
    inverted = client.img2img(images=[original], mask_image=Image.fromarray(mask), inpainting_mask_invert=1,
                              prompt="x", seed=1, **SMALL)
    out = np.asarray(inverted.image.convert("RGB"), np.int16)
    assert (out[:, :24] == before[:, :24]).all() and np.abs(out[:, 24:] - before[:, 24:]).mean() > 5


def test_img2img_resizes_the_init_image_to_the_asked_size(client: webuiapi.WebUIApi) -> None:
    original = Image.open(io.BytesIO(gradient_png(96, 96)))
    result = client.img2img(images=[original], prompt="x", seed=3, denoising_strength=0.5, include_init_images=True,
                            **SMALL)
    assert [i.size for i in result.images] == [(64, 64), (64, 64)]  # the result, then the (resized) init image


def test_progress_then_interrupt_stops_the_running_job(client: webuiapi.WebUIApi) -> None:
    answer: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: answer.update(r=client.txt2img(prompt="x", seed=1, width=64, height=64,
                                                                            steps=1000)))
    started = time.monotonic()
    worker.start()
    seen: list[dict[str, Any]] = []
    while time.monotonic() - started < 30:
        seen.append(client.get_progress())
        if seen[-1]["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    progress = seen[-1]
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 1000
    assert 0 < progress["progress"] < 1 and progress["current_image"] is None
    assert client.interrupt() == {}
    worker.join(30)
    assert not worker.is_alive() and answer["r"].images == [] and answer["r"].info == {"interrupted": True}
    idle = client.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_models_samplers_and_options(a1111: Api, client: webuiapi.WebUIApi) -> None:
    assert [m["title"] for m in client.get_sd_models()] == [MODEL]
    names = {s["name"] for s in client.get_samplers()}
    assert names == {"DPM++ 2M", "DPM++ 2M Karras", "Euler a", "DDIM", "PLMS", "DDPM"}
    client.set_options({"sd_model_checkpoint": f"{MODEL} [0123abcd]", "CLIP_stop_at_last_layers": 2})
    assert client.util_get_current_model() == MODEL and client.get_options()["CLIP_stop_at_last_layers"] == 2
    refused = a1111.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert refused.status_code == 422 and "unknown model 'no-such-model'" in refused.text
    for getter in (client.get_upscalers, client.get_sd_vae, client.get_loras, client.get_embeddings,
                   client.get_scripts, client.get_schedulers, client.get_prompt_styles):
        assert getter() is not None
    assert a1111.client.get("/internal/ping").status_code == 200


def test_unsupported_fields_are_refused_by_name_and_others_noted(a1111: Api, client: webuiapi.WebUIApi) -> None:
    for fields, name in (({"restore_faces": True}, "restore_faces"), ({"tiling": True}, "tiling"),
                         ({"enable_hr": True, "hr_scale": 20}, "hr_scale"),
                         ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
                         ({"no_such_field": 1}, "no_such_field"), ({"sampler_name": "Heun"}, "sampler_name"),
                         ({"scheduler": "Exponential"}, "scheduler"), ({"batch_size": 99}, "batch_size"),
                         ({"override_settings": {"sd_model_checkpoint": "nope"}}, "sd_model_checkpoint")):
        resp = a1111.client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, **fields})
        assert resp.status_code == 422, (fields, resp.text)
        assert [p["loc"][-1] for p in resp.json()["detail"]] == [name], resp.text
    noted = client.txt2img(prompt="x", seed=2, subseed=5, subseed_strength=0.5, **SMALL)
    assert set(noted.info["ldm_ignored"]) == {"subseed", "subseed_strength"}


def test_the_hires_fix_upscales_then_refines_at_the_final_size(client: webuiapi.WebUIApi) -> None:
    result = client.txt2img(prompt="a red circle", seed=4, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3,
                            denoising_strength=0.5, hr_upscaler=webuiapi.HiResUpscaler.Latent, batch_size=2, **SMALL)
    assert [i.size for i in result.images] == [(96, 96), (96, 96)]
    info = result.info
    assert (info["width"], info["height"], info["denoising_strength"], info["all_seeds"]) == (96, 96, 0.5, [4, 5])
    assert info["extra_generation_params"]["Hires steps"] == 3 and "hr_upscaler" in info["ldm_ignored"]
    texts = [i.text for i in result.images]  # type: ignore[attr-defined]
    assert [(t["task"], t["seed"], t["steps"], t["strength"]) for t in texts] == [
        ("img2img", "4", "3", "0.5"), ("img2img", "5", "3", "0.5")]
    sized = client.txt2img(prompt="x", seed=1, enable_hr=True, hr_resize_x=128, hr_upscaler="Nearest",
                           width=64, height=32, steps=2)
    assert sized.image.size == (128, 64) and sized.info["ldm_ignored"] == {}


def test_webhook_url_extension_field_delivers_the_signed_event(a1111: Api) -> None:
    with receiving() as receiver:
        resp = a1111.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 3, "webhook_url": receiver.url,
                                                            **SMALL})
        assert resp.status_code == 200, resp.text
        job_id = json.loads(resp.json()["info"])["ldm_job_id"]
        deadline = time.monotonic() + 20
        while not receiver.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        headers, body = receiver.calls[0]
        assert receiver.verified(headers, body) and json.loads(body)["type"] == "job.succeeded"
        assert json.loads(body)["data"]["links"]["images"] == [f"/v1/jobs/{job_id}/images/0"]


def test_png_info_reads_our_parameters(client: webuiapi.WebUIApi) -> None:
    result = client.txt2img(prompt="a green triangle", negative_prompt="blur", seed=11, **SMALL)
    buf = io.BytesIO(base64.b64decode(result.json["images"][0]))
    info = client.png_info(Image.open(buf))
    assert info.info.startswith("a green triangle\nNegative prompt: blur\nSteps: 2, Sampler: DPM++ 2M")
    assert "Seed: 11" in info.info and f"Model: {MODEL}" in info.info


def test_a_keyed_server_needs_the_key_on_sdapi(make_settings: Any) -> None:
    keys = Keys.fresh()
    with serving(make_settings(**FAST, **keys.settings())) as api:
        assert api.client.get("/sdapi/v1/sd-models").status_code == 401
        client = webuiapi.WebUIApi(baseurl=f"{api.url}/sdapi/v1")
        client.session.headers.update(bearer(keys.alice))
        assert client.get_samplers() and client.get_progress()["progress"] == 0


@pytest.mark.timeout(180)  # its own API and continuous-batching worker
def test_progress_shows_the_live_preview_when_previews_are_on(redis_url: str) -> None:
    """A continuous-batching worker and LDM_A1111_PREVIEW_EVERY=1: webuiapi's get_progress gets `current_image`, a
    small PNG of the running job's current estimate (the default stays null: the test above; the `preview_every`
    field over the setting: tests/unit/test_a1111.py)."""
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=MODEL,
                        a1111_preview_every=1, **FAST)
    with ready_stack(settings, batching="continuous") as api:
        client = webuiapi.WebUIApi(baseurl=f"{api.url}/sdapi/v1", sampler="DPM++ 2M")
        answer: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: answer.update(r=client.txt2img(prompt="x", seed=1, width=64,
                                                                                height=64, steps=1000)))
        worker.start()
        progress, deadline = client.get_progress(), time.monotonic() + 60
        while progress["current_image"] is None or progress["state"]["sampling_step"] < 3:
            assert time.monotonic() < deadline and worker.is_alive(), progress
            time.sleep(0.05)
            progress = client.get_progress()
        with Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))) as preview:
            assert preview.format == "PNG" and preview.mode == "RGB" and max(preview.size) <= 64
        skipped = api.client.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
        assert skipped["state"]["job_count"] == 1 and skipped["current_image"] is None
        assert client.interrupt() == {}
        worker.join(30)
        assert not worker.is_alive() and answer["r"].images == []
