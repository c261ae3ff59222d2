"""Input image decoding: formats, limits, decompression bombs, sizes, masks (ours and OpenAI's)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.config import Settings
from service.images import (
    ImageError,
    decode_image,
    decode_mask,
    decode_openai_mask,
    openai_image_and_mask,
)
from tests.helpers import png_claiming

SETTINGS = Settings(config_file=None, min_width=32, min_height=32, max_width=256, max_height=256,
                    max_image_bytes=200_000, max_image_pixels=256 * 256)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    bands = [np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
             np.full((height, width, 1), 90, np.uint8)]
    return Image.fromarray(np.concatenate(bands, axis=2))


def problem(data: bytes, settings: Settings = SETTINGS) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, settings)
    return caught.value


@pytest.mark.parametrize(("fmt", "params", "exact"), [("PNG", {}, True), ("WEBP", {"lossless": True}, True),
                                                       ("JPEG", {"quality": 95}, False)])
def test_allowed_formats_decode_to_an_rgb_png(fmt: str, params: dict[str, object], exact: bool) -> None:
    original = gradient()
    decoded = decode_image(encode(original, fmt, **params), SETTINGS)
    assert decoded.size == (64, 48) and decoded.image.mode == "RGB"
    again = Image.open(io.BytesIO(decoded.png))
    assert again.format == "PNG" and again.mode == "RGB"
    diff = np.abs(np.asarray(again, dtype=int) - np.asarray(original, dtype=int))
    assert diff.max() == 0 if exact else diff.mean() < 3


def test_rgba_and_palette_images_become_rgb_and_metadata_is_dropped() -> None:
    assert decode_image(encode(gradient().convert("RGBA")), SETTINGS).image.mode == "RGB"
    palette = gradient().convert("P")
    palette.info["transparency"] = 0
    assert decode_image(encode(palette), SETTINGS).image.mode == "RGB"
    text = PngImagePlugin.PngInfo()
    text.add_text("prompt", "from the client")
    assert b"from the client" not in decode_image(encode(gradient(), pnginfo=text), SETTINGS).png


def test_other_formats_and_non_images_are_refused_with_a_clear_message() -> None:
    for data in (encode(gradient(), "GIF"), encode(gradient(), "BMP"), b"hello, not an image", b"\x89PNG\r\n\x1a\n"):
        error = problem(data)
        assert error.status == 422 and error.field == "image"
        assert error.message == "image is not a PNG, JPEG or WebP image"
    assert problem(b"").message == "image is empty"


def test_truncated_data_is_a_client_error() -> None:
    data = encode(gradient())
    error = problem(data[: len(data) // 2])
    assert error.status == 422 and "could not be decoded" in error.message


def test_byte_limit_is_413() -> None:
    error = problem(b"\0" * (SETTINGS.max_image_bytes + 1))
    assert error.status == 413 and f"the limit is {SETTINGS.max_image_bytes} bytes" in error.message


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (512, 512)])
def test_decompression_bombs_are_refused_from_the_header_without_decoding(width: int, height: int) -> None:
    """A few hundred bytes claiming 10^10 pixels (past Pillow's own guard), or just past our limit."""
    data = png_claiming(width, height)
    assert len(data) < 1000
    start = time.perf_counter()
    error = problem(data)
    assert time.perf_counter() - start < 0.5  # nothing was allocated or inflated
    assert error.status == 413 and "pixels" in error.message


def test_size_must_be_a_multiple_of_8_and_within_bounds() -> None:
    odd = problem(encode(gradient(60, 48)))
    assert odd.status == 422 and odd.message == "image is 60x48 pixels; width and height must be multiples of 8"
    small = problem(encode(gradient(16, 48)))
    assert "width must be between 32 and 256" in small.message
    big = problem(encode(gradient(264, 48)))
    assert "image is 264x48 pixels" in big.message


def test_mask_is_read_as_luminance_and_must_match_the_image() -> None:
    image = decode_image(encode(gradient()), SETTINGS)
    white = Image.new("RGB", (64, 48), "white")
    mask = decode_mask(encode(white), image, SETTINGS)
    assert mask.image.mode == "L" and mask.image.getextrema() == (255, 255)
    with pytest.raises(ImageError) as caught:
        decode_mask(encode(Image.new("L", (64, 56))), image, SETTINGS)
    assert caught.value.field == "mask" and caught.value.status == 422
    assert caught.value.message == "mask is 64x56 pixels but the image is 64x48; they must be the same size"
    with pytest.raises(ImageError, match="mask is not a PNG, JPEG or WebP image"):
        decode_mask(b"garbage", image, SETTINGS)


def openai_mask(left_transparent: int, width: int = 64, height: int = 48) -> bytes:
    """RGBA: the `left_transparent` leftmost columns fully transparent (= edit), the rest opaque."""
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, :left_transparent] = 0
    rgba = np.dstack([np.zeros((height, width, 3), np.uint8), alpha])
    return encode(Image.fromarray(rgba, "RGBA"))


def test_openai_mask_transparent_pixels_become_white_repaint_pixels() -> None:
    image = decode_image(encode(gradient()), SETTINGS)
    ours = np.asarray(decode_openai_mask(openai_mask(16), image, SETTINGS).image)
    assert (ours[:, :16] == 255).all() and (ours[:, 16:] == 0).all()
    partly = Image.new("LA", (64, 48), (0, 200))
    assert np.asarray(decode_openai_mask(encode(partly), image, SETTINGS).image).max() == 55  # 255 - alpha


def test_openai_mask_needs_an_alpha_channel() -> None:
    image = decode_image(encode(gradient()), SETTINGS)
    with pytest.raises(ImageError, match="mask has no alpha channel") as caught:
        decode_openai_mask(encode(Image.new("L", (64, 48), 255)), image, SETTINGS)
    assert caught.value.status == 422


def test_openai_edit_without_mask_uses_the_images_transparency() -> None:
    rgba = gradient().convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(64)[None, :] < 8, 0, 255).astype(np.uint8).repeat(48, 0)))
    image, mask = openai_image_and_mask(encode(rgba), None, SETTINGS)
    assert image.image.mode == "RGB" and mask.image.mode == "L"
    m = np.asarray(mask.image)
    assert (m[:, :8] == 255).all() and (m[:, 8:] == 0).all()
    with pytest.raises(ImageError, match="mask is required: the image has no transparent pixels to edit"):
        openai_image_and_mask(encode(gradient()), None, SETTINGS)
    with pytest.raises(ImageError, match="mask is required"):
        openai_image_and_mask(encode(gradient().convert("RGBA")), None, SETTINGS)  # alpha, all opaque
