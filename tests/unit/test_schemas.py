"""The job schema: admission messages name the field and the limit; batch keys group what may share a batch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings, load_settings
from service.queue import Job, JobStatus, WorkerInfo
from service.schemas import BatchKey, GenerationRequest, LabelSet, Task, admit, check_labels

SETTINGS = Settings(config_file=None, max_width=512, max_height=512, min_width=32, min_height=32, max_steps=100,
                    max_n=4, max_guidance_scale=20.0, max_prompt_bytes=16, max_image_bytes=100,
                    default_model="tiny-shapes")
IMAGE = b"\x89PNG\r\n\x1a\n" + b"x" * 8
BOX = {"label": "red circle", "box": [0.1, 0.2, 0.5, 0.6]}


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
    ({"task": Task.class_, "prompt": ""}, "class_label", "task class needs a class_label: a class name"),
    ({"class_label": "red circle"}, "class_label", "class_label applies to task class only, not txt2img"),
    ({"task": Task.layout, "prompt": "", "layout": []}, "layout", "task layout needs a layout of at least one box"),
    ({"layout": [BOX]}, "layout", "layout applies to task layout only, not txt2img"),
    ({"task": Task.semantic, "prompt": ""}, "label_map", "task semantic needs a label_map"),
    ({"label_map": IMAGE}, "label_map", "label_map applies to task semantic only, not txt2img"),
    ({"task": Task.semantic, "prompt": "", "label_map": IMAGE * 10}, "label_map",
     "label_map is 160 bytes; the limit is 100 bytes"),
    ({"task": Task.class_, "class_label": 1}, "prompt", "task class takes no prompt: it is conditioned on its "
     "class_label"),
    ({"task": Task.layout, "prompt": "", "negative_prompt": "blur", "layout": [BOX]}, "negative_prompt",
     "task layout takes no negative_prompt"),
    ({"task": Task.unconditional, "prompt": "", "guidance_scale": 3.0}, "guidance_scale",
     "unconditional sampling is unguided"),
    ({"task": Task.class_, "prompt": "", "class_label": 2, "image": IMAGE}, "image", "task class takes no input image"),
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
    ({"task": "paint"}, "Input should be 'txt2img', 'img2img', 'inpaint', 'upscale', 'class', 'unconditional', "
                        "'semantic' or 'layout'"),
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


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"class_label": True}, "a class label is a class name (such as 'red circle') or a class id"),
    ({"class_label": -2}, "a class id is an integer >= 0, got -2"),
    ({"class_label": " "}, "a class name has 1 to 64 characters"),
    ({"layout": [{**BOX, "box": [0.5, 0.2, 0.1, 0.6]}]}, "layout.0.box\n  box [0.5, 0.2, 0.1, 0.6] is empty or "
     "inverted: need x0 < x1 and y0 < y1"),
    ({"layout": [BOX, {**BOX, "box": [0.1, 0.2, 1.5, 0.6]}]}, "layout.1.box\n  box [0.1, 0.2, 1.5, 0.6] is not "
     "inside the image"),
    ({"layout": [{**BOX, "box": [0.1, 0.2, 0.5]}]}, "box must be 4 numbers [x0, y0, x1, y1] in [0, 1], got [0.1, 0.2, "
     "0.5]"),
    ({"layout": [{**BOX, "box": [0.1, float("nan"), 0.5, 0.6]}]}, "box coordinates must be finite numbers"),
    ({"layout": [{"label": "red circle"}]}, "layout.0.box\n  Field required"),
    ({"layout": [BOX] * 65}, "Tuple should have at most 64 items"),
])
def test_static_validation_checks_class_labels_and_boxes(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        req(**fields)


def test_admission_resolves_model_and_a_random_seed_and_keeps_given_ones() -> None:
    admitted = admit(req(), SETTINGS)
    assert admitted.model == "tiny-shapes" and admitted.seed is not None and 0 <= admitted.seed < 2**32
    assert admit(GenerationRequest(), SETTINGS).batch_key().width is None  # the model's default size
    assert admit(req(model="other", seed=7, n=3), SETTINGS).seeds() == [7, 8, 9]
    given = req(model="other", seed=7, guidance_scale=7.5)
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


def test_admission_resolves_the_guidance_of_the_task_and_keeps_a_given_one() -> None:
    cases: list[tuple[Task, dict[str, Any]]] = [
        (Task.txt2img, {"prompt": "a cat"}), (Task.class_, {"task": Task.class_, "class_label": "red circle"}),
        (Task.layout, {"task": Task.layout, "layout": [BOX]}), (Task.unconditional, {"task": Task.unconditional}),
        (Task.semantic, {"task": Task.semantic, "label_map": IMAGE})]
    admitted = {task: admit(GenerationRequest(model="m", seed=1, **fields), SETTINGS).guidance_scale
                for task, fields in cases}
    assert admitted == {Task.txt2img: 7.5, Task.class_: 5.0, Task.layout: 3.0, Task.unconditional: 1.0,
                        Task.semantic: 2.0}
    kept = admit(GenerationRequest(task=Task.class_, class_label=3, guidance_scale=2.5), SETTINGS)
    assert kept.guidance_scale == kept.effective_guidance == 2.5
    assert GenerationRequest(task=Task.layout).effective_guidance == 3.0  # before admission too (the worker's view)


def test_conditions_round_trip_and_the_label_map_stays_out_of_dumps() -> None:
    layout = admit(GenerationRequest(task=Task.layout, layout=[BOX, {"label": 4, "box": [0, 0, 1, 1]}]), SETTINGS)
    assert GenerationRequest.model_validate_json(layout.model_dump_json()) == layout
    assert [b.label for b in layout.layout or ()] == ["red circle", 4]  # a name stays a name, an id an id
    semantic = req(task=Task.semantic, prompt="", label_map=IMAGE)
    assert "label_map" not in semantic.model_dump_json() and semantic.stored_image == IMAGE
    assert semantic.fingerprint() != req(task=Task.semantic, prompt="", label_map=IMAGE + b"!").fingerprint()
    assert req(task=Task.img2img, image=IMAGE).stored_image == IMAGE


SHAPES = LabelSet(n_classes=18, class_names=("red circle", "red square", "blue square") + tuple(
    f"class {i}" for i in range(3, 18)), max_boxes=2)


@pytest.mark.parametrize(("fields", "where", "message"), [
    ({"task": Task.class_, "class_label": "pink circle"}, "class_label",
     "unknown class 'pink circle'; known: red circle, red square, blue square, class 3"),
    ({"task": Task.class_, "class_label": 18}, "class_label", "class id 18 is outside 0..17"),
    ({"task": Task.class_, "class_label": "18"}, "class_label", "class id 18 is outside 0..17"),
    ({"task": Task.layout, "layout": [BOX, {**BOX, "label": "cyan"}]}, "layout.1.label", "unknown class 'cyan'"),
    ({"task": Task.layout, "layout": [BOX] * 3}, "layout", "model 'm' takes at most 2 boxes in a layout, got 3"),
])
def test_labels_the_model_does_not_take_are_named(fields: dict[str, Any], where: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_labels(GenerationRequest(model="m", **fields), SHAPES)
    found = {".".join(map(str, e["loc"])): e["msg"] for e in caught.value.errors()}
    assert list(found) == [where] and found[where].startswith(message)


def test_known_labels_pass_by_name_id_or_digits_and_map_values_are_checked() -> None:
    for label in ("Red  Circle", "BLUE square", 17, "0"):
        check_labels(GenerationRequest(task=Task.class_, class_label=label), SHAPES)
    check_labels(GenerationRequest(task=Task.layout, layout=[BOX, {"label": 2, "box": [0, 0, 1, 1]}]), SHAPES)
    semantic = GenerationRequest(task=Task.semantic, label_map=IMAGE)
    check_labels(semantic, SHAPES, map_labels=[0, 1, 18])
    with pytest.raises(ValidationError, match=r"label map values must be 0 \(background\) to 18; found unknown "
                       r"label\(s\) \[19, 200\]"):
        check_labels(semantic, SHAPES, map_labels=[0, 200, 19])
    assert WorkerInfo.model_validate_json(WorkerInfo(id="w", models=["m"], labels=SHAPES).model_dump_json()).labels \
        == SHAPES


def test_sdxl_micro_conditioning_is_per_sample_and_checked() -> None:
    """original_size, crops_coords_top_left, target_size: optional pairs, kept in the stored request, out of the batch
    key (they vary per sample), and out of the fingerprint while unset (older requests keep theirs)."""
    plain, sized = req(prompt="x"), req(prompt="x", original_size=[1024, 768], crops_coords_top_left=[0, 16])
    assert sized.micro_conditioning == {"original_size": (1024, 768), "crops_coords_top_left": (0, 16)}
    assert plain.micro_conditioning == {}
    assert GenerationRequest.model_validate_json(sized.model_dump_json()) == sized
    assert sized.fingerprint() != plain.fingerprint()
    assert admit(sized, SETTINGS).batch_key() == admit(plain, SETTINGS).batch_key()
    for bad in ({"original_size": [0, 512]}, {"crops_coords_top_left": [-1, 0]}, {"target_size": [512]}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            req(**bad)


def test_refiner_and_noise_level_rules_defaults_and_batch_key() -> None:
    """`refiner` finishes txt2img jobs (its switch defaults to 0.8 at admission, strictly inside (0, 1), and needs a
    refiner); `noise_level` is the upscale task's; both split batches; unset, they leave fingerprints as they were."""
    refined = admit(req(model="m", refiner="xl-refiner"), SETTINGS)
    assert refined.refiner_switch == 0.8
    plain = admit(req(model="m"), SETTINGS)
    assert refined.batch_key() != plain.batch_key()
    assert refined.batch_key() != admit(req(model="m", refiner="xl-refiner", refiner_switch=0.7), SETTINGS).batch_key()
    assert plain.batch_key() == BatchKey("m", Task.txt2img, 64, 64, "dpmpp_2m", 20, False, 0.0, None)
    assert req(prompt="x", refiner="r").fingerprint() != req(prompt="x").fingerprint()
    assert errors(req(refiner_switch=0.5)) == {"refiner_switch": "refiner_switch needs a refiner: name it in `refiner`"}
    assert errors(req(task="img2img", image=b"x", refiner="r")) == {
        "refiner": "a refiner finishes txt2img jobs only, not img2img"}
    assert errors(req(noise_level=20)) == {
        "noise_level": "noise_level applies to task upscale only (the SD x4 upscaler), not txt2img"}
    upscale = admit(req(model="m", task="upscale", image=b"x", noise_level=20), SETTINGS)
    assert upscale.batch_key() != admit(req(model="m", task="upscale", image=b"x"), SETTINGS).batch_key()
    for bad in ({"refiner_switch": 0.0}, {"refiner_switch": 1.0}, {"noise_level": -1}, {"refiner": "../x"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            req(**bad)
