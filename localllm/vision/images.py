"""Decoding the images a user sends: bytes, a path, a PIL image or a ``data:`` URI -> an RGB PIL image.

The bytes are untrusted. ``load_image`` accepts PNG, JPEG, WebP and GIF (its first frame) only, refuses a
payload over ``max_bytes`` before decoding it, and refuses a decompression bomb from its header alone, before
the pixels are decoded: Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, which Pillow only warns about
below twice the limit) is an error here, and so is our ``max_pixels`` (both checked on the size in the
header, without touching the process-wide warning filters, so that threads decoding at once do not race).
The EXIF orientation is applied (a phone photo taken upright comes out upright) and the image is converted
to RGB the way the Hugging Face image processors do it: transparency composited onto white. Every failure
is an ``ImageError`` saying what was wrong. Fetching http(s) URLs is the caller's business (the server has
its own limits for that).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")      # Pillow's names of the formats load_image decodes
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024         # width * height, 8192 x 8192
DEFAULT_MAX_BYTES = 20 * 1024 * 1024          # the encoded file (the decoded bytes of a data: URI)


class ImageError(ValueError):
    """An image that cannot be used: undecodable, of a format not accepted, too large, a bad ``data:`` URI."""


def load_image(source, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """The image ``source`` names as an RGB ``PIL.Image.Image``, EXIF orientation applied.

    ``source``: the encoded bytes (``bytes``, ``bytearray``, ``memoryview``), a ``data:`` URI (``str``,
    base64 or percent-encoded), a file path (``str`` or ``os.PathLike``), or a ``PIL.Image.Image`` (used
    as it is: only its size is checked, its orientation applied and its mode converted).
    Raises ``ImageError`` for anything it cannot decode or refuses (see the module docstring).
    """
    if max_pixels <= 0 or max_bytes <= 0:
        raise ValueError(f"max_pixels and max_bytes must be positive, got {max_pixels} and {max_bytes}")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return _upright_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str) and source[:5].lower() == "data:":
        data = _data_uri_bytes(source, max_bytes)
    elif isinstance(source, (str, os.PathLike)):
        data = _file_bytes(Path(source), max_bytes)
    else:
        raise ImageError(f"an image must be bytes, a path, a data: URI or a PIL image, not {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, more than the {max_bytes} allowed")
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    return _decode(data, max_pixels)


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded bytes -> an RGB image; the header is checked before any pixel is decoded."""
    image = None
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # header only; may warn of a bomb, refused next
        _check_bomb(image.size)
        _check_pixels(image.size, max_pixels)
        image.seek(0)                                   # a GIF's (or animated WebP's) first frame
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode safely (a decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode the image: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file "
                         f"(it starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:   # truncated or corrupt data, bad chunks
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"cannot decode the {getattr(image, 'format', None) or 'image'} data: {exc}") from None
    return _upright_rgb(image)


def _check_bomb(size: tuple[int, int]) -> None:
    """Pillow's own limit as an error (Pillow only warns between ``MAX_IMAGE_PIXELS`` and twice that)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise ImageError(f"the image is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over Pillow's "
                         f"decompression bomb limit of {limit}")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels, more than the {max_pixels} "
                         "allowed")


def _upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB with any transparency composited onto white (as transformers'
    ``convert_to_rgb`` does, so the encoders see the pixels their image processors would)."""
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:  # an EXIF block Pillow cannot parse
        raise ImageError(f"cannot read the image's EXIF orientation: {exc}") from None
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _file_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"the image file {path} is {size} bytes, more than the {max_bytes} allowed")
        return path.read_bytes()
    except ImageError:
        raise
    except OSError as exc:
        raise ImageError(f"cannot read the image file {path}: {exc.strerror or exc}") from None


def _data_uri_bytes(uri: str, max_bytes: int) -> bytes:
    """The payload of ``data:[<media type>][;base64],<data>`` (RFC 2397); the media type, when given, must be
    an image type."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageError("a data: URI needs a comma before its data (data:image/png;base64,...)")
    params = header[5:].split(";")
    media_type, is_base64 = params[0].strip().lower(), params[-1].strip().lower() == "base64"
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"the data: URI holds '{media_type}', not an image")
    if is_base64:
        payload = "".join(payload.split())                     # line breaks and spaces are allowed in base64
        if len(payload) // 4 * 3 > max_bytes:
            raise ImageError(f"the data: URI holds about {len(payload) // 4 * 3} bytes, more than the {max_bytes} "
                             "allowed")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data: URI's base64 data is invalid: {exc}") from None
    if len(payload) > 3 * max_bytes:
        raise ImageError(f"the data: URI is longer than {3 * max_bytes} characters")
    return urllib.parse.unquote_to_bytes(payload)
