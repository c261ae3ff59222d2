"""The A1111 field mapping (service/api/a1111.py): its table in docs/a1111.md, samplers, refusals, infotext."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api import a1111
from service.api.a1111 import Img2ImgBody, Txt2ImgBody
from service.schemas import GenerationRequest

DOC = Path(__file__).parents[2] / "docs" / "a1111.md"
ROW = re.compile(r"^\| `([a-z_0-9]+)` \| (supported|ignored|refused) \| (both|txt2img|img2img) \| (.+) \|$")


def test_the_docs_table_lists_every_field_with_its_kind_routes_and_note() -> None:
    rows = {m[1]: (m[2], m[3], m[4]) for line in DOC.read_text().splitlines() if (m := ROW.match(line))}
    expected = {name: (r.kind, "both" if len(r.endpoints) == 2 else r.endpoints[0], r.note)
                for name, r in a1111.FIELDS.items()}
    assert rows == expected


def test_every_typed_body_field_is_in_the_table() -> None:
    for body in (Txt2ImgBody, Img2ImgBody):
        assert set(body.model_fields) <= set(a1111.FIELDS)


@pytest.mark.parametrize(("name", "scheduler", "ours"), [
    ("DPM++ 2M", None, ("dpmpp_2m", False)), ("DPM++ 2M Karras", None, ("dpmpp_2m", True)),
    ("DPM++ 2M", "Karras", ("dpmpp_2m", True)), ("Euler a", "automatic", ("euler_a", False)),
    ("k_euler_ancestral", None, ("euler_a", False)), ("ddim", None, ("ddim", False)), ("PLMS", None, ("plms", False)),
    ("DDPM", None, ("ddpm", False)), ("dpmpp_2m", None, ("dpmpp_2m", False)),
    (None, None, (None, False)),  # no name: the model's default, filled in at submission from its workers
    (None, "karras", (None, True))])  # Karras alone: dpmpp_2m at submission, the one sampler that has them
def test_a1111_sampler_names_map_to_ours(name: str | None, scheduler: str | None,
                                         ours: tuple[str | None, bool]) -> None:
    assert a1111.sampler(Txt2ImgBody(sampler_name=name, scheduler=scheduler)) == ours


def test_unknown_samplers_and_schedulers_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="sampler 'Heun' is not served"):
        a1111.sampler(Txt2ImgBody(sampler_name="Heun"))
    with pytest.raises(ValidationError, match="scheduler 'SGM Uniform' is not supported"):
        a1111.sampler(Txt2ImgBody(scheduler="SGM Uniform"))


def test_check_fields_refuses_unknown_and_unsupported_values_and_notes_ignored_ones() -> None:
    neutral = {"restore_faces": False, "styles": [], "script_name": None, "alwayson_scripts": {}, "subseed": -1,
               "mask_blur": 0, "tiling": False}
    assert a1111.check_fields({k: v for k, v in neutral.items() if k != "mask_blur"}, "txt2img") == {}
    assert a1111.check_fields(neutral | {"mask_blur": 4, "inpaint_full_res": True}, "img2img").keys() == \
        {"mask_blur", "inpaint_full_res"}
    with pytest.raises(ValidationError) as info:
        a1111.check_fields({"restore_faces": True, "bogus": 1, "mask_blur": 4, "styles": ["x"]}, "txt2img")
    assert {e["loc"][0]: e["type"] for e in info.value.errors()} == {
        "restore_faces": "unsupported", "bogus": "unknown_field", "mask_blur": "unknown_field",  # img2img only
        "styles": "unsupported"}


def test_request_fields_multiply_batches_resolve_random_seeds_and_keep_eta_for_ddim_only() -> None:
    fields = a1111.request_fields(Txt2ImgBody(batch_size=2, n_iter=3, seed=-1, eta=1.0, sampler_name="Euler a"), "m")
    assert (fields["n"], fields["seed"], fields["eta"], fields["model"]) == (6, None, 0.0, "m")
    assert a1111.request_fields(Txt2ImgBody(eta=0.5, sampler_name="DDIM", seed=3), None)["eta"] == 0.5


def test_previews_come_from_the_body_else_the_servers_default() -> None:
    assert a1111.request_fields(Txt2ImgBody(), None)["preview_every"] == 0
    assert a1111.request_fields(Txt2ImgBody(), None, preview_every=5)["preview_every"] == 5
    assert a1111.request_fields(Txt2ImgBody(preview_every=0), None, preview_every=5)["preview_every"] == 0
    assert a1111.request_fields(Img2ImgBody(preview_every=3), None)["preview_every"] == 3
    with pytest.raises(ValidationError, match="preview_every"):
        Txt2ImgBody(preview_every=1001)


@pytest.mark.parametrize(("fields", "size"), [
    ({"hr_scale": 2}, (128, 96)), ({"hr_scale": 1.3}, (80, 56)), ({"hr_resize_x": 100}, (96, 72)),
    ({"hr_resize_y": 72}, (96, 72)), ({"hr_resize_x": 40, "hr_resize_y": 200}, (40, 200))])
def test_hires_size_scales_or_resizes_then_rounds_down_to_the_multiple(fields: dict[str, float],
                                                                       size: tuple[int, int]) -> None:
    assert a1111.hires_size(Txt2ImgBody(**fields), (64, 48), 8) == size


def test_hires_second_pass_takes_the_hr_fields_or_the_first_pass_ones() -> None:
    body = Txt2ImgBody(prompt="p", steps=9, sampler_name="DDIM", eta=0.3, hr_prompt="q", hr_second_pass_steps=4)
    second = a1111.second_pass(body, a1111.request_fields(body, None))
    assert (second["prompt"], second["steps"], second["sampler"], second["eta"], second["strength"], second["task"]) \
        == ("q", 4, "ddim", 0.3, 0.7, "img2img")
    other = Txt2ImgBody(sampler_name="DDIM", hr_sampler_name="DPM++ 2M Karras", denoising_strength=0.4)
    second = a1111.second_pass(other, a1111.request_fields(other, None))
    assert (second["sampler"], second["karras"], second["strength"], second["steps"]) == ("dpmpp_2m", True, 0.4, 20)
    assert a1111.hires_upscaler(Txt2ImgBody(hr_upscaler="Nearest")) == ("nearest", {})
    with pytest.raises(ValidationError, match="upscaler 'ESRGAN_4x' is not served"):
        a1111.hires_upscaler(Txt2ImgBody(hr_upscaler="ESRGAN_4x"))


@pytest.mark.parametrize(("fill", "strength", "noted"), [(1, 0.6, False), (2, 1.0, False), (0, 0.6, True),
                                                         (3, 0.6, True)])
def test_inpainting_fill_sets_the_strength(fill: int, strength: float, noted: bool) -> None:
    got, note = a1111.inpaint_strength(Img2ImgBody(inpainting_fill=fill, denoising_strength=0.6))
    assert got == strength and bool(note) == noted


def test_infotext_of_a_request_and_of_png_chunks_agree() -> None:
    request = GenerationRequest(prompt="a cat", negative_prompt="dog", seed=5, steps=3, sampler="dpmpp_2m",
                                karras=True, guidance_scale=6.0, width=64, height=32, model="m")
    chunks = {"prompt": "a cat", "negative_prompt": "dog", "seed": "5", "steps": "3", "sampler": "dpmpp_2m",
              "karras": "True", "guidance_scale": "6.0", "width": "64", "height": "32", "model": "m"}
    text = "a cat\nNegative prompt: dog\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6.0, Seed: 5, Size: 64x32, " \
           "Model: m"
    assert a1111.infotext(request) == a1111.infotext(chunks) == text
