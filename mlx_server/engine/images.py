"""Bounded image decoding for vision requests: pure code (Pillow, no trio, quart or mlx).

Every image a client sends passes through `decode_image_source` (a data URL or bare base64, as
the OpenAI, Anthropic and Responses APIs carry them) or `decode_image_bytes` (bytes a fetcher
got). Anything that is not a readable PNG, JPEG, WebP or GIF within the byte and pixel limits
raises `ImageError`, an `InvalidRequest` (400) whose message can go straight to the client.

Limits are checked as early as they can be: the base64 text's length before decoding it, the
declared width x height (read from the header alone) before any pixel is decompressed, so a
decompression bomb costs a header parse. Pillow's own bomb guard stays on underneath (its
warning is turned into the same error rather than printed).

The result is RGB (EXIF orientation applied, alpha composited onto white, palettes expanded,
GIFs cut to their first frame) with a content hash of its pixels and size: the same picture sent
again, even re-encoded losslessly or in another container, gets the same hash, which keys the
prefix cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from typing import Literal

import attrs
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidRequest

ImageFormat = Literal["PNG", "JPEG", "WEBP", "GIF"]
SUPPORTED_FORMATS: tuple[ImageFormat, ...] = ("PNG", "JPEG", "WEBP", "GIF")

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
"""20 MiB of encoded image, the size the hosted APIs accept."""
DEFAULT_MAX_PIXELS = 40_000_000
"""40 megapixels: an 8K screenshot fits; Pillow's own bomb threshold is ~89 megapixels."""


class ImageError(InvalidRequest):
    """An image the server will not read. `code` says why (for the error body):
    invalid_image_data, image_too_large, unsupported_image_format, invalid_image,
    image_fetch_disabled, invalid_image_url."""

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


@attrs.frozen(kw_only=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@attrs.frozen(kw_only=True)
class DecodedImage:
    """One decoded picture, ready for a vision model's image processor."""

    image: Image.Image = attrs.field(eq=False, repr=False)
    """RGB, fully loaded (no file handle behind it)."""
    source_format: ImageFormat
    width: int
    height: int
    digest: str
    """sha256 (hex) of the RGB pixels and the size: the content key for the prefix cache."""
    nbytes: int
    """Size of the encoded image as received."""


_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


def decode_image_source(
    source: str, limits: ImageLimits | None = None, *, param: str | None = None
) -> DecodedImage:
    """Decode a `data:image/...;base64,...` URL or bare base64 text. http(s) URLs are refused
    here: fetching is the caller's decision (behind a flag), then `decode_image_bytes`."""
    limits = limits or ImageLimits()
    text = source.strip()
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise ImageError(
            "image URLs are not fetched by this server (start it with --allow-image-urls); "
            "send the image as a base64 data URL",
            code="image_fetch_disabled",
            param=param,
        )
    if lowered.startswith("data:"):
        match = _DATA_URL.match(text)
        if match is None:
            raise ImageError(
                "image data URL must be base64-encoded (data:image/png;base64,...)",
                code="invalid_image_url",
                param=param,
            )
        media_type = match.group("type").strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise ImageError(
                f"data URL media type {media_type!r} is not an image",
                code="unsupported_image_format",
                param=param,
            )
        text = text[match.end() :]
    elif ":" in text[:12] and "://" in text[:16]:
        raise ImageError(
            "image URL scheme not supported; send a base64 data URL",
            code="invalid_image_url",
            param=param,
        )
    data = decode_base64(text, limits, param=param)
    return decode_image_bytes(data, limits, param=param)


def decode_base64(
    text: str, limits: ImageLimits | None = None, *, param: str | None = None
) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, line breaks allowed), refusing text whose
    decoded size would already exceed the byte limit without decoding it."""
    limits = limits or ImageLimits()
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ImageError(
            "image data is not valid base64", code="invalid_image_data", param=param
        ) from None
    raw = _WHITESPACE.sub(b"", raw)
    if len(raw) * 3 // 4 > limits.max_bytes + 2:
        raise ImageError(
            f"image is larger than the {limits.max_bytes}-byte limit",
            code="image_too_large",
            param=param,
        )
    if not raw:
        raise ImageError("image data is empty", code="invalid_image_data", param=param)
    if b"-" in raw or b"_" in raw:
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    if len(raw) % 4:
        raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(
            "image data is not valid base64", code="invalid_image_data", param=param
        ) from None


def sniff_format(data: bytes) -> ImageFormat | None:
    """The container by its magic bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image_bytes(
    data: bytes, limits: ImageLimits | None = None, *, param: str | None = None
) -> DecodedImage:
    """Decode encoded image bytes within the limits into an RGB `DecodedImage`."""
    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is larger than the {limits.max_bytes}-byte limit",
            code="image_too_large",
            param=param,
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            "unsupported image format: PNG, JPEG, WebP or GIF expected",
            code="unsupported_image_format",
            param=param,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ImageError("image has no pixels", code="invalid_image", param=param)
                if width * height > limits.max_pixels:
                    raise _too_many_pixels(width, height, limits, param)
                if fmt == "GIF":
                    img.seek(0)
                rgb = _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            "image is too large when decompressed", code="image_too_large", param=param
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated or corrupt data (Pillow raises OSError, SyntaxError or ValueError from its
        # decoders): the message names the cause without echoing the data.
        raise ImageError(
            f"image could not be decoded as {fmt}: {_short(e)}", code="invalid_image", param=param
        ) from None
    return DecodedImage(
        image=rgb,
        source_format=fmt,
        width=rgb.width,
        height=rgb.height,
        digest=pixel_digest(rgb),
        nbytes=len(data),
    )


def pixel_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    img.load()
    # Photos from phones store their orientation in EXIF: the model sees them upright, as the
    # client's own viewer shows them.
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _too_many_pixels(width: int, height: int, limits: ImageLimits, param: str | None) -> ImageError:
    return ImageError(
        f"image is {width}x{height} pixels, over the limit of {limits.max_pixels} pixels",
        code="image_too_large",
        param=param,
    )


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def fetch_image(
    url: str,
    limits: ImageLimits | None = None,
    *,
    timeout: float = 10.0,
    param: str | None = None,
) -> DecodedImage:
    """Fetch an http(s) image URL (only when the server allows it: `--allow-image-urls`) and
    decode it. The body is read in pieces up to the byte limit, within `timeout` seconds in
    all (not per read); anything else is a 400 (`image_fetch_failed`). Blocking: call it from
    a worker thread."""
    import time
    import urllib.error
    import urllib.request

    limits = limits or ImageLimits()
    if not url.lower().startswith(("http://", "https://")):
        raise ImageError("image URL must be http(s)", code="invalid_image_url", param=param)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-server", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageError(
                    f"image is larger than the {limits.max_bytes}-byte limit",
                    code="image_too_large",
                    param=param,
                )
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fetching the image took over {timeout:g} s")
                piece = response.read(64 * 1024)
                if not piece:
                    break
                size += len(piece)
                if size > limits.max_bytes:
                    raise ImageError(
                        f"image is larger than the {limits.max_bytes}-byte limit",
                        code="image_too_large",
                        param=param,
                    )
                chunks.append(piece)
    except ImageError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise ImageError(
            f"image URL could not be fetched: {_short(Exception(str(reason)))}",
            code="image_fetch_failed",
            param=param,
        ) from None
    return decode_image_bytes(b"".join(chunks), limits, param=param)


@attrs.frozen(kw_only=True)
class ImagePolicy:
    """What the server accepts (`--max-image-bytes`, `--max-image-pixels`,
    `--allow-image-urls`, `--image-fetch-timeout`), applied to each image of a request."""

    limits: ImageLimits = ImageLimits()
    allow_urls: bool = False
    fetch_timeout: float = 10.0

    def decode(self, source: str, *, param: str | None = None) -> DecodedImage:
        """An image as a client sent it (data URL, bare base64, or an http(s) URL, fetched
        only when allowed), decoded. Blocking: call it from a worker thread."""
        source = source.strip()
        if self.allow_urls and source[:8].lower().startswith(("http://", "https://")):
            return fetch_image(source, self.limits, timeout=self.fetch_timeout, param=param)
        return decode_image_source(source, self.limits, param=param)
