"""Safe decoding of input images, masks and label maps: the one place Pillow reads bytes from outside, for the
REST and gRPC front ends and for the worker. Pillow only (no torch: the front ends import it).

Front ends: every input image goes through `decode_image` before it reaches the queue:
- the encoded bytes are bounded (`max_image_bytes`, 413);
- only PNG, JPEG and WebP are opened (Pillow is told so: no other decoder ever sees the bytes);
- the size read from the header is checked *before* any pixel is decoded: within the configured width and
  height bounds, a multiple of `size_multiple`, and at most `max_image_pixels` (413), so a small file that claims
  a huge size (a decompression bomb) is refused without allocating its pixels. Pillow's own global guard
  (`Image.MAX_IMAGE_PIXELS`) stays in place behind ours; we never change that process-wide setting;
- it is decoded fully (a truncated or corrupt file is a 422 here, not a crash in a worker), converted to RGB
  (alpha dropped, palettes expanded) and re-encoded as PNG, so the worker only ever sees one format and no
  metadata from the client.

Masks: ours are white = repaint (`decode_mask`, any mode, read as luminance). OpenAI's are transparent = repaint
(`decode_openai_mask`, needs an alpha channel): we convert them to ours as 255 - alpha, so a fully transparent
pixel is white, an opaque one black, and the pipeline's binarisation at 0.5 decides partly transparent ones.

Label maps (`decode_label_map`, task semantic) pass the same byte, pixel, bomb and size checks, but only PNG is
opened (JPEG and lossy WebP would change labels at every edge) and only single-channel modes: L (pixel value =
label) and P (palette index = label; the palette's colours, there to make the file viewable, are ignored). They
are re-encoded as mode L, whatever they came as, and the labels they hold are reported for the model's check.

The worker decodes the queued bytes again (`decode_queued_image`, `decode_queued_label_map`): the front ends
stored PNG, but a job written to the queue by anything else must not get Pillow's other parsers (TIFF, EPS, ...)
run on its bytes in the worker process, so the same format lists apply, and the pixel count is checked before any
pixel is decoded. It reports in its own words ("the image cannot be decoded: ..."), which become the job's error.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageChops, UnidentifiedImageError

from service.config import Settings

#: the formats Pillow may try on client bytes
FORMATS = ("PNG", "JPEG", "WEBP")
#: label maps: lossless only
LABEL_MAP_FORMATS = ("PNG",)
LABEL_MAP_MODES = ("L", "P")
_FORMAT_NAMES = "PNG, JPEG or WebP"
_PNG_LEVEL = 3  # re-encoding: fast, and still compact for photos and masks
#: what Pillow raises for bytes it cannot open or decode, and for a decompression bomb
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageError(ValueError):
    """A client image that cannot be used: `status` 413 (too big) or 422 (anything else), `field` names it."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class DecodedImage:
    """A checked input: the pixels and the normalised PNG bytes that go on the queue."""

    image: Image.Image
    png: bytes

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _open(data: bytes, field: str, settings: Settings, formats: tuple[str, ...] = FORMATS,
          names: str = _FORMAT_NAMES) -> Image.Image:
    """Open (header only) and check format, byte size and pixel size; no pixel is decoded here."""
    if not data:
        raise ImageError(field, f"{field} is empty")
    if len(data) > settings.max_image_bytes:
        raise ImageError(field, f"{field} is {len(data)} bytes; the limit is {settings.max_image_bytes} bytes", 413)
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except _BOMB as exc:
        raise ImageError(field, f"{field} claims too many pixels to decode (decompression bomb?): {exc}", 413) from exc
    except _UNREADABLE as exc:
        raise ImageError(field, f"{field} is not a {names} image") from exc
    width, height = image.size
    if width * height > settings.max_image_pixels:
        raise ImageError(field, f"{field} is {width}x{height} = {width * height} pixels; the limit is "
                         f"{settings.max_image_pixels} pixels", 413)
    return image


def _check_size(image: Image.Image, field: str, settings: Settings) -> None:
    (width, height), m = image.size, settings.size_multiple
    if width % m or height % m:
        raise ImageError(field, f"{field} is {width}x{height} pixels; width and height must be multiples of {m}")
    if not (settings.min_width <= width <= settings.max_width and settings.min_height <= height <= settings.max_height):
        raise ImageError(field, f"{field} is {width}x{height} pixels; width must be between {settings.min_width} "
                         f"and {settings.max_width} and height between {settings.min_height} and "
                         f"{settings.max_height}")


def _load(image: Image.Image, field: str) -> Image.Image:
    """Decode every pixel of the first frame; corrupt or truncated data is the client's error."""
    try:
        image.load()
    except _BOMB as exc:
        raise ImageError(field, f"{field} has too many pixels to decode: {exc}", 413) from exc
    except _UNREADABLE as exc:
        raise ImageError(field, f"{field} could not be decoded (corrupt or truncated {image.format} data: {exc})") \
            from exc
    return image


def _with_alpha(image: Image.Image) -> Image.Image | None:
    """The image as RGBA if it carries transparency (an alpha band or a transparent palette entry), else None."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return image.convert("RGBA")
    return None


def _convert(image: Image.Image, mode: str, field: str) -> Image.Image:
    try:
        return image.convert(mode)
    except (ValueError, OSError) as exc:
        raise ImageError(field, f"{field} has pixel mode {image.mode}, which cannot be converted to {mode}") from exc


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=_PNG_LEVEL)
    return buf.getvalue()


def _rgb(image: Image.Image, field: str) -> Image.Image:
    rgba = _with_alpha(image)
    return _convert(rgba if rgba is not None else image, "RGB", field)


def _checked_image(data: bytes, field: str, settings: Settings) -> Image.Image:
    image = _open(data, field, settings)
    _check_size(image, field, settings)
    return _load(image, field)


def _as_input(image: Image.Image, field: str) -> DecodedImage:
    rgb = _rgb(image, field)
    return DecodedImage(rgb, _png(rgb))


def decode_image(data: bytes, settings: Settings, *, field: str = "image") -> DecodedImage:
    """Check and decode an input image; RGB, re-encoded as PNG. Raises ImageError."""
    return _as_input(_checked_image(data, field, settings), field)


def decode_resizable(data: bytes, settings: Settings, *, field: str = "image", mode: str = "RGB") -> Image.Image:
    """An input that will be resized before use (AUTOMATIC1111's img2img resizes to the asked size): bytes and
    pixels bounded as for any input, decoded fully, converted to `mode`; its size is not checked here, the resized
    one is (admission checks the request's width and height). Raises ImageError."""
    image = _load(_open(data, field, settings), field)
    if mode == "L":  # a mask: an alpha channel that is not all opaque is the mask (as A1111 reads masks)
        rgba = _with_alpha(image)
        alpha = rgba.getchannel("A") if rgba is not None else None
        if alpha is not None and alpha.getextrema() != (255, 255):
            return alpha
    return _convert(_rgb(image, field), mode, field)


def encoded(image: Image.Image) -> DecodedImage:
    """An image made here (resized, inverted) as the queue takes it: PNG."""
    return DecodedImage(image, _png(image))


def png_text(data: bytes, settings: Settings, *, field: str = "image") -> dict[str, str]:
    """The text chunks of a PNG (bytes and pixels bounded, decoded fully so chunks after the pixels count too).
    Raises ImageError."""
    image = _load(_open(data, field, settings, ("PNG",), "PNG"), field)
    return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def _same_size(mask: Image.Image, image: DecodedImage, field: str) -> None:
    if mask.size != image.size:
        raise ImageError(field, f"{field} is {mask.width}x{mask.height} pixels but the image is "
                         f"{image.size[0]}x{image.size[1]}; they must be the same size")


def decode_mask(data: bytes, image: DecodedImage, settings: Settings, *, field: str = "mask") -> DecodedImage:
    """A mask in our convention (white = repaint; read as luminance, alpha ignored), the image's size; L PNG."""
    mask = _open(data, field, settings)
    _same_size(mask, image, field)
    gray = _convert(_rgb(_load(mask, field), field), "L", field)
    return DecodedImage(gray, _png(gray))


def _transparent_to_white(rgba: Image.Image) -> Image.Image:
    """OpenAI mask (transparent = edit) -> ours (white = repaint): 255 - alpha."""
    return ImageChops.invert(rgba.getchannel("A"))


def decode_openai_mask(data: bytes, image: DecodedImage, settings: Settings, *, field: str = "mask") -> DecodedImage:
    """An OpenAI mask (fully transparent pixels = the area to edit; it must have an alpha channel), the image's
    size, converted to ours (white = repaint)."""
    mask = _open(data, field, settings)
    _same_size(mask, image, field)
    rgba = _with_alpha(_load(mask, field))
    if rgba is None:
        raise ImageError(field, f"{field} has no alpha channel (mode {mask.mode}): an OpenAI mask is a PNG whose "
                         "transparent pixels mark the area to edit")
    white = _transparent_to_white(rgba)
    return DecodedImage(white, _png(white))


def openai_image_and_mask(image_data: bytes, mask_data: bytes | None,
                          settings: Settings) -> tuple[DecodedImage, DecodedImage]:
    """The image and our mask for an OpenAI edit: from `mask_data` when given, else from the image's own
    transparency (as OpenAI does), which must then exist."""
    original = _checked_image(image_data, "image", settings)
    image = _as_input(original, "image")
    if mask_data is not None:
        return image, decode_openai_mask(mask_data, image, settings)
    rgba = _with_alpha(original)
    white = _transparent_to_white(rgba) if rgba is not None else None
    if white is None or white.getextrema()[1] == 0:
        raise ImageError("mask", "mask is required: the image has no transparent pixels to edit; send a mask whose "
                         "transparent pixels mark the area to edit, or an image with transparent areas")
    return image, DecodedImage(white, _png(white))


@dataclass(frozen=True)
class DecodedLabelMap:
    """A checked label map: the mode-L PNG that goes on the queue, its size and the labels it holds."""

    png: bytes
    size: tuple[int, int]
    labels: tuple[int, ...]


def decode_label_map(data: bytes, settings: Settings, *, field: str = "label_map") -> DecodedLabelMap:
    """Check and decode a semantic job's label map: a single-channel PNG (mode L, or P whose palette indices are the
    labels) within the size bounds; re-encoded as mode L. Raises ImageError."""
    image = _open(data, field, settings, LABEL_MAP_FORMATS, "PNG")
    if image.mode not in LABEL_MAP_MODES:
        raise ImageError(field, f"{field} is a mode {image.mode} PNG; a label map is a single-channel PNG (mode L, "
                         "or P whose palette indices are the labels) whose pixel values are labels, 0 = background")
    _check_size(image, field, settings)
    image = _load(image, field)
    labels = Image.frombytes("L", image.size, image.tobytes())  # P: the indices, not the palette's colours
    present = tuple(value for value, count in enumerate(labels.histogram()) if count)
    return DecodedLabelMap(_png(labels), labels.size, present)


# --------------------------------------------------------------------------------------- queued inputs (worker)

def _decode_queued(data: bytes, what: str, max_pixels: int, formats: tuple[str, ...], mode: str | None,
                   hint: str = "") -> Image.Image:
    """Open `data` with `formats` only, check the pixel count from the header, then decode (and convert to
    `mode`); Pillow's decompression-bomb warning is an error here. Raises ImageError, message "the <what> ..."."""
    field = what.replace(" ", "_")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            if image.width * image.height > max_pixels:
                raise ImageError(field, f"the {what} has {image.width}x{image.height} pixels; the limit is "
                                 f"{max_pixels} pixels", 413)
            image.load()
            return image.convert(mode) if mode is not None else image
    except ImageError:
        raise
    except (*_UNREADABLE, *_BOMB) as exc:
        raise ImageError(field, f"the {what} cannot be decoded{hint}: {exc}") from exc


def decode_queued_image(data: bytes, what: Literal["image", "mask"], max_pixels: int) -> Image.Image:
    """A job's input image -> RGB, or its mask -> luminance (L). Raises ImageError."""
    return _decode_queued(data, what, max_pixels, FORMATS, "L" if what == "mask" else "RGB")


def decode_queued_label_map(data: bytes, max_pixels: int) -> Image.Image:
    """A semantic job's label map, decoded as stored (PNG only: a lossy format would change labels); which labels
    it holds is the model's check (models.conditioning.label_map_array). Raises ImageError."""
    return _decode_queued(data, "label map", max_pixels, LABEL_MAP_FORMATS, None, " (a PNG is needed)")
