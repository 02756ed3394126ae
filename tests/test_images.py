"""Bounded image decoding (mlx_server/engine/images.py): good images of every supported format
decode to RGB with a content hash; each bad image in the table is a clean `ImageError` (a 400)
with its own code."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from mlx_server.engine.images import (
    ImageError,
    ImageLimits,
    decode_image_bytes,
    decode_image_source,
)
from mlx_server.errors import InvalidRequest


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(size: tuple[int, int] = (7, 5), mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, size)
    for x in range(size[0]):
        for y in range(size[1]):
            v = (x * 37 + y * 11) % 256
            img.putpixel((x, y), (v, 255 - v, (v * 3) % 256, 128)[: len(mode)])
    return img


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height over a few bytes of data: what a
    decompression bomb looks like before anything is inflated."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_decodes_to_rgb(fmt: str) -> None:
    data = _encode(_picture(), fmt)
    out = decode_image_source(_data_url(data, f"image/{fmt.lower()}"))
    assert out.source_format == fmt
    assert (out.width, out.height) == (7, 5)
    assert out.image.mode == "RGB"
    assert out.nbytes == len(data)
    assert len(out.digest) == 64


def test_raw_base64_and_data_url_agree_and_hash_follows_pixels() -> None:
    pic = _picture()
    png = _encode(pic, "PNG")
    a = decode_image_source(base64.b64encode(png).decode())
    b = decode_image_source(_data_url(png))
    # Wrapped lines and the URL-safe alphabet without padding are accepted too.
    wrapped = base64.b64encode(png).decode()
    wrapped = "\n".join(wrapped[i : i + 76] for i in range(0, len(wrapped), 76))
    c = decode_image_source(wrapped)
    d = decode_image_source(base64.urlsafe_b64encode(png).decode().rstrip("="))
    # Same pixels in another lossless container: same key.
    e = decode_image_bytes(_encode(pic, "WEBP", lossless=True))
    assert a.digest == b.digest == c.digest == d.digest == e.digest
    other = decode_image_bytes(_encode(_picture((5, 7)), "PNG"))
    assert other.digest != a.digest


def test_alpha_is_composited_onto_white() -> None:
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    out = decode_image_bytes(_encode(img, "PNG"))
    assert out.image.getpixel((0, 0)) == (255, 0, 0)
    assert out.image.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    img = _picture((8, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image_bytes(_encode(img, "JPEG", exif=exif.tobytes()))
    assert (out.width, out.height) == (3, 8)
    plain = decode_image_bytes(_encode(img, "JPEG"))
    assert (plain.width, plain.height) == (8, 3)


def test_gif_uses_its_first_frame() -> None:
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    blue = Image.new("RGB", (4, 4), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, format="GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 2
    out = decode_image_bytes(data)
    assert out.source_format == "GIF"
    assert out.image.getpixel((1, 1)) == (255, 0, 0)


_PNG = _encode(_picture((32, 32)), "PNG")
_JPEG = _encode(_picture((32, 32)), "JPEG")
_SMALL = ImageLimits(max_bytes=200, max_pixels=10_000)

BAD_IMAGES = [
    ("not base64", lambda: decode_image_source("this is not base64!!"), "invalid_image_data"),
    ("empty", lambda: decode_image_source(""), "invalid_image_data"),
    ("non-ascii", lambda: decode_image_source("iVBOR\u00e9w0KGgo="), "invalid_image_data"),
    ("truncated png", lambda: decode_image_bytes(_PNG[: len(_PNG) // 2]), "invalid_image"),
    ("truncated jpeg", lambda: decode_image_bytes(_JPEG[: len(_JPEG) // 2]), "invalid_image"),
    ("png header only", lambda: decode_image_bytes(_PNG[:40]), "invalid_image"),
    (
        "decompression bomb (pixel limit)",
        lambda: decode_image_bytes(_png_header_only(100_000, 100_000)),
        "image_too_large",
    ),
    (
        "decompression bomb (Pillow's guard under lax limits)",
        lambda: decode_image_bytes(
            _png_header_only(100_000, 100_000), ImageLimits(max_pixels=10**12)
        ),
        "image_too_large",
    ),
    (
        "oversized bytes",
        lambda: decode_image_bytes(_PNG, ImageLimits(max_bytes=len(_PNG) - 1)),
        "image_too_large",
    ),
    (
        "oversized base64 (refused before decoding)",
        lambda: decode_image_source("A" * 10_000, _SMALL),
        "image_too_large",
    ),
    (
        "too many pixels",
        lambda: decode_image_bytes(
            _encode(Image.new("RGB", (200, 100)), "PNG"), ImageLimits(max_pixels=10_000)
        ),
        "image_too_large",
    ),
    (
        "unsupported format (BMP)",
        lambda: decode_image_bytes(_encode(_picture(), "BMP")),
        "unsupported_image_format",
    ),
    (
        "unsupported format (text)",
        lambda: decode_image_source(base64.b64encode(b"hello, world").decode()),
        "unsupported_image_format",
    ),
    (
        "png magic, jpeg body",
        lambda: decode_image_bytes(b"\x89PNG\r\n\x1a\n" + _JPEG),
        "invalid_image",
    ),
    (
        "data URL of another media type",
        lambda: decode_image_source(_data_url(_PNG, "text/plain")),
        "unsupported_image_format",
    ),
    (
        "data URL not base64",
        lambda: decode_image_source("data:image/png,%89PNG"),
        "invalid_image_url",
    ),
    (
        "http URL without the fetch flag",
        lambda: decode_image_source("https://example.com/cat.png"),
        "image_fetch_disabled",
    ),
    ("file URL", lambda: decode_image_source("file:///etc/passwd"), "invalid_image_url"),
]


@pytest.mark.parametrize(
    ("case", "decode", "code"), BAD_IMAGES, ids=[case for case, _, _ in BAD_IMAGES]
)
def test_bad_images_are_clean_400s(case: str, decode, code: str) -> None:
    with pytest.raises(ImageError) as info:
        decode()
    err = info.value
    assert isinstance(err, InvalidRequest)
    assert err.status == 400
    assert err.code == code, (case, err.message)
    assert err.message and len(err.message) < 200
    assert "\\x" not in err.message  # never echoes binary data


def test_param_is_carried() -> None:
    with pytest.raises(ImageError) as info:
        decode_image_source("!!", param="messages.0.content.1.image_url.url")
    assert info.value.param == "messages.0.content.1.image_url.url"
