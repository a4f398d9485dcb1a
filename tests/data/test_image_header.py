"""Reading an image's declared size from its header, and refusing oversized ones before any decode (issue 23).

The hostile images here are shared with the tests of everything that decodes: the transforms, the loader, shard,
verify, predict and the contact sheet.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_header import CorruptImageError, checked_size, declared_size, open_header

BOMB_SIDE = 12000  # 144 MP: over the 40 MP default, and over PIL's own warning threshold (89 MP)


@lru_cache(maxsize=None)
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A real, valid greyscale PNG of side x side black pixels: ~140 KB that decode to 144 MB (576 MB as PIL's RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    rows = b"".join(compressor.compress(bytes(side + 1)) for _ in range(side))  # filter byte 0 + the row
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows + compressor.flush()) + chunk(b"IEND", b"")
    )


@lru_cache(maxsize=None)
def bomb_jpeg(side: int = BOMB_SIDE) -> bytes:
    """A real 16 x 16 JPEG whose frame header (SOF0) is rewritten to declare side x side: under a kilobyte
    that makes a decoder allocate 3 x side^2 bytes before it finds the data short."""
    data = bytearray(saved("JPEG", size=(16, 16)))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", side, side)  # height, then width
    return bytes(data)


def exif_jpeg() -> bytes:
    """A JPEG with a ~60 KB EXIF segment before its frame header, as camera files have."""
    image = Image.fromarray(picture(40, 30))
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def multi_picture_jpeg() -> bytes:
    """A camera JPEG with a second picture appended (PIL opens it as MPO)."""
    first, second = (Image.fromarray(picture(48, 32, seed)) for seed in (0, 1))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    return buffer.getvalue()


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field, (height, width, 3) uint8."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.BILINEAR))


def saved(format: str, mode: str | None = None, size: tuple[int, int] = (70, 50), **options) -> bytes:
    """An image of `size` (width, height) encoded as `format`, optionally converted to `mode` first."""
    image = Image.fromarray(picture(*size))
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: saved("JPEG"),
        lambda: saved("JPEG", "L"),
        lambda: saved("JPEG", "CMYK"),
        lambda: saved("JPEG", progressive=True),
        lambda: saved("JPEG", size=(3000, 7)),
        exif_jpeg,
        multi_picture_jpeg,
        lambda: saved("PNG"),
        lambda: saved("PNG", "P"),
        lambda: saved("PNG", "RGBA"),
        lambda: saved("PNG", "I;16"),
        lambda: saved("WEBP"),
        lambda: saved("WEBP", lossless=True),
        lambda: saved("WEBP", "RGBA"),
        lambda: saved("WEBP", size=(16383, 2), lossless=True),
    ],
    ids=[
        "jpeg",
        "jpeg-grey",
        "jpeg-cmyk",
        "jpeg-progressive",
        "jpeg-wide",
        "jpeg-exif",
        "mpo",
        "png",
        "png-palette",
        "png-alpha",
        "png-16bit",
        "webp",
        "webp-lossless",
        "webp-alpha",
        "webp-widest",
    ],
)
def test_the_header_gives_the_size_pil_reads(make):
    data = make()
    with Image.open(io.BytesIO(data)) as image:
        assert declared_size(data) == image.size
        assert declared_size(memoryview(np.frombuffer(data, np.uint8))) == image.size  # the device route's view


@pytest.mark.parametrize("format", ["BMP", "GIF", "TIFF", "PPM"])
def test_formats_the_pipeline_does_not_expect_are_not_opened(format):
    # PIL reads these, but no shard or ImageNet file holds them: fewer decoders face bytes from outside.
    data = saved(format)
    assert Image.open(io.BytesIO(data)).format == format
    with pytest.raises(CorruptImageError, match="^not a JPEG, PNG or WEBP image$"):
        open_header(data)


def test_reading_a_jpeg_header_is_bounded_on_hostile_bytes():
    good = saved("JPEG")
    started = time.perf_counter()
    # Megabytes of fill bytes or junk before any frame header: one linear scan, no size, no error.
    for junk in (b"\xff" * 5_000_000, bytes(5_000_000), b"\xff\x00" * 2_500_000):
        assert declared_size(b"\xff\xd8" + junk) is None
    # Every truncation of a real JPEG: the size once the frame header is complete, else None; never an exception.
    frame_end = good.index(b"\xff\xc0") + 9
    for length in range(2, len(good)):
        assert declared_size(good[:length]) == ((70, 50) if length >= frame_end else None)
    assert time.perf_counter() - started < 5.0  # a scan that backtracked would take hours


def test_open_header_refuses_a_bomb_before_pil_sees_it_and_names_the_limit(recwarn):
    for bomb in (bomb_png(), bomb_jpeg()):
        with pytest.raises(CorruptImageError) as caught:
            open_header(bomb)
        assert str(caught.value) == (
            "declares 12000x12000 = 144,000,000 pixels, more than data.max_image_pixels "
            "= 40,000,000; refused before decoding"
        )
    assert not [warning for warning in recwarn if issubclass(warning.category, Image.DecompressionBombWarning)]
    with open_header(saved("PNG"), max_image_pixels=70 * 50) as image:  # the limit itself is allowed
        assert image.size == (70, 50)


def test_checked_size_needs_a_size_it_can_read():
    assert checked_size(saved("WEBP"), 70 * 50) == (70, 50)
    for data in (b"", b"\xff\xd8\xff\xd9", saved("GIF")):  # nothing, a JPEG without a frame, another format
        with pytest.raises(CorruptImageError, match="no JPEG, PNG or WebP header"):
            checked_size(data, 10**6)
