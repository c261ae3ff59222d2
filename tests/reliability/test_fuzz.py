"""Fuzzing: generated and malformed input against the real front ends and decoders.

- schemathesis against the OpenAPI schema of a running API (`ldm api` on a real Redis, one real worker, the
  request limits narrowed so that every valid job is a few tiny sampler steps): every operation, valid and invalid
  requests (a bounded number), and no answer is a 5xx and none hangs;
- hypothesis on the decoding of input images and masks (service/images.py, for the front ends and, through
  service/worker/runner.py, the worker): arbitrary bytes raise nothing but the documented errors;
- malformed gRPC messages on the real method paths (bytes that are no protobuf, fields of the wrong wire type, huge
  fields): INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a message over the size limit), never UNKNOWN or INTERNAL,
  and the server serves on.
"""

from __future__ import annotations

import io
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode

from service import images
from service.api._proto.ldm.v1 import ldm_pb2 as pb
from service.config import Settings
from service.worker import runner
from tests.reliability.procs import Api, Stack

pytestmark = pytest.mark.timeout(300)
#: small limits, so that every valid job the fuzzer makes is cheap for the worker
LIMITS: dict[str, Any] = {"max_steps": 3, "max_n": 2, "max_width": 64, "max_height": 64, "job_deadline_s": 30,
                          "max_batch": 8}
EXAMPLES_PER_OPERATION = 16
ANSWER_WITHIN_S = 20.0


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Api]]:
    stack = Stack(tmp_path_factory.mktemp("fuzz"), LIMITS)
    try:
        worker = stack.start_worker(wait=False)
        api = stack.start_api()
        stack.wait_registered(worker)
        yield stack, api
    finally:
        stack.close()


def within_limits(case: Any) -> None:
    """Bring a valid request's costly numbers inside LIMITS (the schema allows more than these settings), so that
    valid jobs really reach the worker and the synchronous calls wait for real results: steps 1-3 (also when left
    to the default of 20), n 1-2, guidance at most 30, the model's default size, the default model."""
    if not isinstance(case.body, dict):
        return
    body = case.body

    def number(name: str) -> float | None:
        value = body.get(name)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    body["steps"] = 1 + int(number("steps") or 0) % LIMITS["max_steps"]
    if (n := number("n")) is not None:
        body["n"] = 1 + int(n) % LIMITS["max_n"]
    if (scale := number("guidance_scale")) is not None:
        body["guidance_scale"] = scale % 30.0
    for name in ("width", "height", "size", "model"):
        body.pop(name, None)


def fuzz_operation(operation: Any, mode: GenerationMode, base_url: str, statuses: Counter[int],
                   problems: list[str]) -> None:
    """EXAMPLES_PER_OPERATION requests of `mode` to one operation; their statuses counted, the faults listed."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def call(case: Any) -> None:
        if mode == GenerationMode.POSITIVE:
            within_limits(case)
        began = time.monotonic()
        try:
            response = case.call(base_url=base_url, timeout=ANSWER_WITHIN_S)
        except requests.Timeout:
            problems.append(f"{case.method} {case.formatted_path}: no answer in {ANSWER_WITHIN_S} s")
            return
        statuses[response.status_code] += 1
        body = case.body if isinstance(case.body, dict) else {}
        chose_wait = response.status_code == 504 and ("timeout" in (case.query or {}) or
                                                      body.get("deadline_s") is not None)
        if response.status_code >= 500 and not chose_wait:
            problems.append(f"{case.method} {case.formatted_path} -> {response.status_code} "
                            f"{response.text[:300]} (query {case.query}, {time.monotonic() - began:.1f} s)")

    try:
        call()
    except Unsatisfiable:  # no invalid request exists for an operation without parameters (GET /healthz)
        assert mode == GenerationMode.NEGATIVE


def test_no_generated_request_gets_a_5xx_or_hangs(fuzz_stack: tuple[Stack, Api]) -> None:
    """Every operation of the schema, EXAMPLES_PER_OPERATION valid and as many invalid requests each (schemathesis's
    positive and negative generation, the valid ones brought `within_limits`); a 504 is allowed only where the
    client chose the time (`?timeout=` or `deadline_s`): the documented answer of a synchronous call that ran out of
    the time it was given."""
    api, began = fuzz_stack[1], time.monotonic()
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    seen: dict[str, Counter[int]] = {}
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err would raise here: the schema is ours
        statuses = seen.setdefault(f"{operation.method.upper()} {operation.path}", Counter())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(operation, mode, api.url, statuses, problems)
    total = sum(sum(c.values()) for c in seen.values())
    print(f"schemathesis: {total} requests over {len(seen)} operations: "
          + "; ".join(f"{op} {dict(c)}" for op, c in seen.items()))
    assert not problems, "\n".join(problems[:20])
    assert len(seen) >= 12 and total >= 300
    assert time.monotonic() - began < 120  # bounded: a server that slows down under garbage is a finding too


# ------------------------------------------------------------------------------------------- image and mask decoding

DECODE_SETTINGS = Settings(config_file=None, min_width=8, min_height=8, max_width=256, max_height=256,
                           max_image_bytes=200_000, max_image_pixels=128 * 128, size_multiple=8)


def _encoded(size: tuple[int, int], mode: str, fmt: str, **params: Any) -> bytes:
    rng = np.random.default_rng(size[0] * 7 + size[1])
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if bands == 1 else pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


#: well-formed inputs to start mutating from: every format the API opens, and others it must refuse
SEEDS: list[bytes] = [
    _encoded((16, 16), "RGB", "PNG"), _encoded((24, 16), "RGBA", "PNG"), _encoded((16, 8), "L", "PNG"),
    _encoded((16, 16), "P", "PNG", transparency=0), _encoded((8, 8), "LA", "PNG"), _encoded((16, 16), "I;16", "PNG"),
    _encoded((16, 16), "RGB", "JPEG", quality=80), _encoded((16, 16), "L", "JPEG", progressive=True),
    _encoded((16, 16), "CMYK", "JPEG"), _encoded((16, 16), "RGB", "WEBP", lossless=True),
    _encoded((16, 16), "RGBA", "WEBP", quality=50), _encoded((16, 16), "RGB", "GIF"), _encoded((16, 16), "RGB", "BMP"),
    _encoded((16, 16), "RGB", "TIFF"),
]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid image with some bytes replaced, inserted or cut (headers included)."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["replace", "insert", "cut", "truncate"])):
            case "replace" if at < len(data):
                data[at] = draw(st.integers(0, 255))
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            case "cut":
                del data[at:at + draw(st.integers(1, 16))]
            case "truncate":
                del data[at:]
    return bytes(data)


FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
VALID_IMAGE = images.decode_image(_encoded((16, 16), "RGB", "PNG"), DECODE_SETTINGS)


def _as_in_production(call: Callable[[], Any]) -> Any:
    """Run a decoder as the server does: Pillow's warnings are warnings there (printed), not the errors this test
    suite turns every warning into."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return call()


@FUZZ
@given(data=image_bytes())
def test_api_image_decoding_raises_only_image_errors(data: bytes) -> None:
    try:
        decoded = _as_in_production(lambda: images.decode_image(data, DECODE_SETTINGS))
    except images.ImageError as err:
        assert err.status in (413, 422) and err.field == "image" and err.message
        event(f"refused {err.status}")
        return
    event("decoded")
    assert decoded.image.mode == "RGB" and decoded.png.startswith(b"\x89PNG")
    assert decoded.size[0] * decoded.size[1] <= DECODE_SETTINGS.max_image_pixels


@FUZZ
@given(data=image_bytes(), openai=st.booleans())
def test_api_mask_decoding_raises_only_image_errors(data: bytes, openai: bool) -> None:
    decode = images.decode_openai_mask if openai else images.decode_mask
    try:
        mask = _as_in_production(lambda: decode(data, VALID_IMAGE, DECODE_SETTINGS))
    except images.ImageError as err:
        assert err.status in (413, 422) and err.field == "mask" and err.message
        return
    assert mask.image.mode == "L" and mask.size == VALID_IMAGE.size


@FUZZ
@given(data=image_bytes(), mask=st.none() | image_bytes())
def test_api_openai_edit_inputs_raise_only_image_errors(data: bytes, mask: bytes | None) -> None:
    try:
        _as_in_production(lambda: images.openai_image_and_mask(data, mask, DECODE_SETTINGS))
    except images.ImageError as err:
        assert err.status in (413, 422) and err.field in ("image", "mask")


@FUZZ
@given(data=image_bytes(), what=st.sampled_from(["image", "mask"]))
def test_worker_image_decoding_raises_only_invalid_input_failures(data: bytes, what: Literal["image", "mask"]) -> None:
    try:
        image = _as_in_production(lambda: runner.decode_image(data, what, DECODE_SETTINGS.max_image_pixels))
    except runner.JobFailure as failure:
        assert failure.reason == "invalid_input" and failure.message.startswith(f"the {what} ")
        event("refused")
        return
    event("decoded")
    assert image.mode == ("L" if what == "mask" else "RGB")


def test_the_worker_opens_only_the_formats_the_front_ends_accept() -> None:
    for data in SEEDS[-3:]:  # GIF, BMP, TIFF: no parser but PNG's, JPEG's and WebP's runs on queued bytes
        with pytest.raises(runner.JobFailure, match="invalid_input: the image cannot be decoded"):
            runner.decode_image(data, "image", 10**6)


# ------------------------------------------------------------------------------------------- malformed gRPC messages

PICTURE, MASK = _encoded((64, 64), "RGB", "PNG"), _encoded((64, 64), "L", "PNG")
PARAMETERS = pb.GenerationParameters(prompt="a red circle", steps=2)
UNARY: dict[str, Any] = {
    "Generate": pb.GenerateRequest(parameters=PARAMETERS),
    "Inpaint": pb.InpaintRequest(parameters=PARAMETERS, image=PICTURE, mask=MASK),
    "Img2Img": pb.ImageRequest(parameters=PARAMETERS, image=PICTURE),
    "Upscale": pb.ImageRequest(parameters=PARAMETERS, image=PICTURE),
    "GetJob": pb.GetJobRequest(job_id="0" * 32), "CancelJob": pb.CancelJobRequest(job_id="0" * 32)}
STREAMING: dict[str, Any] = {"GenerateStream": UNARY["Generate"]}
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@st.composite
def message_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """Bytes that are no protobuf, or a valid message with bytes replaced, inserted or cut, or a field of the wrong
    wire type (a varint where a message or string belongs, a string of invalid UTF-8)."""
    kind = draw(st.sampled_from(["random", "mutated", "wrong_type"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "wrong_type":
        number = draw(st.integers(1, 20))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        tag = bytes([number << 3 | wire]) if number < 16 else bytes([(number << 3 | wire) & 0x7F | 0x80, number >> 4])
        payload = {0: b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 1: b"\x00" * 8, 5: b"\x00" * 4,
                   2: b"\x04\xff\xfe\xfd\xfc"}[wire]
        return valid + tag + payload if draw(st.booleans()) else tag + payload
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        if at < len(data) and draw(st.booleans()):
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def fuzz_method(channel: grpc.Channel, method: str, valid: bytes, seen: Counter[str]) -> None:
    """Malformed variants of `valid` sent as raw bytes to one method; their status codes counted."""
    path = f"/ldm.v1.Diffusion/{method}"
    call = channel.unary_stream(path) if method in STREAMING else channel.unary_unary(path)

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=message_bytes(valid))
    def send(data: bytes) -> None:
        try:
            answer = call(data, timeout=ANSWER_WITHIN_S)
            if method in STREAMING:
                list(answer)
            seen["OK"] += 1
        except grpc.RpcError as err:
            seen[err.code().name] += 1
            assert err.code() not in NEVER and err.code() != grpc.StatusCode.DEADLINE_EXCEEDED, \
                (method, data, err.code(), err.details())

    send()


def test_malformed_grpc_messages_are_invalid_argument_never_unknown_or_internal(
        fuzz_stack: tuple[Stack, Api]) -> None:
    api = fuzz_stack[1]
    codes: dict[str, Counter[str]] = {}
    with grpc.insecure_channel(f"127.0.0.1:{api.grpc_port}") as channel:
        for method, valid in {**UNARY, **STREAMING}.items():
            fuzz_method(channel, method, valid.SerializeToString(), codes.setdefault(method, Counter()))
        # huge fields: a prompt far over its limit but inside Generate's message limit (grpc_max_request_bytes); a
        # message over the method's limit
        generate = channel.unary_unary("/ldm.v1.Diffusion/Generate")
        huge_prompt = pb.GenerateRequest(parameters=pb.GenerationParameters(prompt="x" * 2**15, steps=2))
        with pytest.raises(grpc.RpcError) as err:
            generate(huge_prompt.SerializeToString(), timeout=ANSWER_WITHIN_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in (err.value.details() or "")
        over_limit = pb.ImageRequest(image=b"\0" * (fuzz_stack[0].settings.grpc_max_message_bytes + 1))
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/ldm.v1.Diffusion/Img2Img")(over_limit.SerializeToString(), timeout=ANSWER_WITHIN_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the server lives on: a valid request still gets its image
        reply = pb.GenerateResponse.FromString(generate(UNARY["Generate"].SerializeToString(), timeout=60))
        assert len(reply.images) == 1 and reply.images[0].png.startswith(b"\x89PNG")
    print("gRPC codes: " + "; ".join(f"{m} {dict(c)}" for m, c in codes.items()))
    assert all(c["INVALID_ARGUMENT"] > 0 for c in codes.values())
