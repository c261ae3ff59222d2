"""The job schema: admission messages name the field and the limit; batch keys group what may share a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from service.config import Settings, load_settings
from service.schemas import (
    BatchKey,
    GenerationRequest,
    Job,
    JobStatus,
    Sampler,
    Task,
    admit,
)

SETTINGS = Settings(config_file=None, max_width=512, max_height=512, min_width=32, min_height=32, max_steps=100,
                    max_n=4, max_guidance_scale=20.0, max_prompt_bytes=16, max_image_bytes=100,
                    default_model="tiny-shapes")
IMAGE = b"\x89PNG\r\n\x1a\n" + b"x" * 8


def req(**fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "width": 64, "height": 64, **fields})


def errors(request: GenerationRequest) -> dict[str, str]:
    """field -> message of every admission error."""
    with pytest.raises(ValidationError) as caught:
        admit(request, SETTINGS)
    return {".".join(map(str, e["loc"])): e["msg"] for e in caught.value.errors()}


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"width": 100}, "width", "width must be a multiple of 8, got 100"),
    ({"height": 1024}, "height", "height must be between 32 and 512 pixels, got 1024"),
    ({"width": 16}, "width", "width must be between 32 and 512 pixels, got 16"),
    ({"steps": 101}, "steps", "steps must be between 1 and 100, got 101"),
    ({"n": 5}, "n", "n must be between 1 and 4, got 5"),
    ({"guidance_scale": 25.0}, "guidance_scale", "guidance_scale must be between 0 and 20.0, got 25.0"),
    ({"prompt": "é" * 9}, "prompt", "prompt is 18 bytes long; the limit is 16 bytes (UTF-8)"),
    ({"negative_prompt": "x" * 17}, "negative_prompt", "negative_prompt is 17 bytes long"),
    ({"task": Task.img2img}, "image", "task img2img needs an input image"),
    ({"task": Task.inpaint, "image": IMAGE}, "mask", "task inpaint needs a mask"),
    ({"image": IMAGE}, "image", "task txt2img takes no input image"),
    ({"task": Task.img2img, "image": IMAGE, "mask": IMAGE}, "mask", "task img2img takes no mask"),
    ({"task": Task.img2img, "image": IMAGE * 10}, "image", "image is 160 bytes; the limit is 100 bytes"),
    ({"strength": 0.5}, "strength", "strength applies to img2img and inpaint only, not txt2img"),
    ({"sampler": "ddim", "karras": True}, "karras", "karras sigmas are supported by dpmpp_2m only, not ddim"),
    ({"sampler": "euler_a", "eta": 0.5}, "eta", "eta applies to ddim only, not euler_a"),
])
def test_admission_names_the_field_and_the_limit(fields: dict[str, Any], field: str, message: str) -> None:
    found = errors(req(**fields))
    assert list(found) == [field]
    assert found[field].startswith(message)


def test_admission_reports_every_problem_at_once() -> None:
    assert set(errors(req(width=100, height=2048, steps=500, sampler="plms", karras=True))) == {
        "width", "height", "steps", "karras"}


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"sampler": "heun"}, "Input should be 'ddpm', 'ddim', 'plms', 'dpmpp_2m' or 'euler_a'"),
    ({"task": "paint"}, "Input should be 'txt2img', 'img2img', 'inpaint' or 'upscale'"),
    ({"steps": 0}, "greater than or equal to 1"),
    ({"guidance_scale": float("nan")}, "finite number"),
    ({"strength": 1.5}, "less than or equal to 1"),
    ({"seed": -1}, "greater than or equal to 0"),
    ({"model": "../etc"}, "should match pattern"),
    ({"colour": "red"}, "Extra inputs are not permitted"),
])
def test_static_validation_rejects_bad_values(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(")):
        req(**fields)


def test_admission_resolves_model_and_a_random_seed_and_keeps_given_ones() -> None:
    admitted = admit(req(), SETTINGS)
    assert admitted.model == "tiny-shapes" and admitted.seed is not None and 0 <= admitted.seed < 2**32
    assert admit(GenerationRequest(), SETTINGS).batch_key().width is None  # the model's default size
    assert admit(req(model="other", seed=7, n=3), SETTINGS).seeds() == [7, 8, 9]
    given = req(model="other", seed=7)
    assert admit(given, SETTINGS) is given


def test_images_never_leave_in_a_dump_but_count_in_the_fingerprint() -> None:
    a = req(task=Task.img2img, image=IMAGE)
    b = req(task=Task.img2img, image=IMAGE + b"!")
    assert "image" not in a.model_dump() and "image" not in a.model_dump_json()
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == req(task=Task.img2img, image=IMAGE).fingerprint()


def test_batch_key_groups_compatible_jobs_only() -> None:
    base = admit(req(model="m", seed=1), SETTINGS)
    same = admit(req(model="m", seed=2, prompt="a dog", negative_prompt="blur", guidance_scale=3.0, n=2), SETTINGS)
    assert base.batch_key() == same.batch_key()
    assert base.batch_key() == BatchKey("m", Task.txt2img, 64, 64, "dpmpp_2m", 20, False, 0.0, None)
    for change in ({"width": 128}, {"height": 128}, {"steps": 30}, {"sampler": "ddim"}, {"karras": True},
                   {"model": "n"}):
        other = admit(req(**{"model": "m", "seed": 1, **change}), SETTINGS)
        assert other.batch_key() != base.batch_key(), change
    ddim = admit(req(model="m", sampler="ddim", eta=0.0), SETTINGS)
    assert ddim.batch_key() != admit(req(model="m", sampler="ddim", eta=0.5), SETTINGS).batch_key()


def test_batch_key_uses_the_task_default_strength() -> None:
    default = admit(req(model="m", task=Task.img2img, image=IMAGE), SETTINGS)
    explicit = admit(req(model="m", task=Task.img2img, image=IMAGE, strength=0.75), SETTINGS)
    half = admit(req(model="m", task=Task.img2img, image=IMAGE, strength=0.5), SETTINGS)
    assert default.batch_key() == explicit.batch_key() != half.batch_key()
    assert default.batch_key().strength == 0.75
    inpaint = admit(req(model="m", task=Task.inpaint, image=IMAGE, mask=IMAGE), SETTINGS)
    assert inpaint.batch_key().strength == 1.0 and inpaint.batch_key().task == Task.inpaint
    with pytest.raises(ValueError, match="admit"):
        req().batch_key()


def test_job_record_round_trips_through_json() -> None:
    job = Job(id="a" * 32, model="m", status=JobStatus.running, request=admit(req(model="m"), SETTINGS),
              created_at="2025-01-01T00:00:00Z", step=3, total=20)  # type: ignore[arg-type]
    assert Job.model_validate_json(job.model_dump_json()) == job
    assert JobStatus.succeeded.terminal and not JobStatus.running.terminal
    assert job.model_dump(mode="json")["status"] == "running"


def test_sampler_names_match_the_model_library() -> None:
    import models.samplers as samplers
    assert set(get_args(Sampler)) == set(get_args(samplers.SamplerName))


def test_settings_read_env_over_yaml_over_defaults_and_refuse_unknown_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ldm.yaml"
    config.write_text("max_batch: 3\nrest_port: 9000\n")
    monkeypatch.setenv("LDM_CONFIG_FILE", str(config))
    monkeypatch.setenv("LDM_REST_PORT", "9100")
    settings = load_settings()
    assert (settings.max_batch, settings.rest_port, settings.grpc_port) == (3, 9100, 50051)
    assert load_settings(max_batch=5).max_batch == 5
    config.write_text("max_bacth: 3\n")
    with pytest.raises(ValidationError, match="max_bacth"):
        load_settings()


def test_every_setting_is_described() -> None:
    assert all(field.description for field in Settings.model_fields.values())
