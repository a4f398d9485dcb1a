"""An image's declared size, read from its header before any pixel is decoded; oversized images are refused.

A 140 KB PNG can declare 12000x12000 pixels: decoding it takes seconds and gigabytes (a decompression bomb), and
a few in DataLoader processes get one killed for memory. PIL only warns up to 2 x `Image.MAX_IMAGE_PIXELS` (179 MP),
and torchvision's `decode_jpeg` (libjpeg on the CPU, nvJPEG on a GPU) has no limit at all. So whatever decodes
images it did not make reads their size first and refuses more than `data.max_image_pixels`:

    image = open_header(data, max_image_pixels)   # PIL with the header read, no pixels; too large: refused
    width, height = checked_size(data, max_image_pixels)   # bytes only: before decode_jpeg on a GPU

`declared_size` reads JPEG (SOF), PNG (IHDR) and WebP (VP8, VP8L, VP8X) headers by hand, because nothing in the
libraries gives a size without side effects: PIL's header open warns past its own global threshold before it
hands back the size, its WebP open allocates the whole canvas, and torchvision has no header-only call. Each read
is bounded by the bytes given and stops where the first JPEG scan begins, as decoders do.
"""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS

# What the pipeline decodes from shards and from the user's image files: PIL format names. "JPEG" also opens
# camera JPEGs with a multi-picture segment (PIL names those "MPO"); `index` accepts shards keyed png and webp.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Start-of-frame markers: baseline, extended, progressive and lossless, Huffman or arithmetic coded. (0xC4 is
# DHT, 0xC8 JPG and 0xCC DAC: not frames.)
_JPEG_FRAME_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_START_OF_SCAN, _JPEG_END_OF_IMAGE = 0xDA, 0xD9
_JPEG_STANDALONE_MARKERS = frozenset((0x00, 0x01, *range(0xD0, 0xD9)))  # no length field: TEM, RSTn, SOI (00: none)
# A marker: 0xFF and a code other than 0xFF. Searching for it skips fill 0xFFs and stray bytes, as libjpeg and PIL
# do; a regular expression that never backtracks, so megabytes of junk cost one linear scan at C speed.
_JPEG_MARKER = re.compile(rb"\xff([^\xff])")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What PIL and torchvision raise for bytes they cannot decode (truncated, malformed, unsupported, too large).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """The bytes are not an image that can be decoded (garbage, truncated, unsupported or too large)."""


def declared_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) as a JPEG, PNG or WebP header declares it; None for other formats or no size found.

    A JPEG with several frame headers (hierarchical mode, which no decoder here supports) gives its largest.
    """
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


def check_pixels(width: int, height: int, max_image_pixels: int) -> None:
    """Refuse a declared size above the limit, in one line naming both."""
    if width * height > max_image_pixels:
        raise CorruptImageError(
            f"declares {width}x{height} = {width * height:,} pixels, more than "
            f"data.max_image_pixels = {max_image_pixels:,}; refused before decoding"
        )


def checked_size(data: bytes | memoryview, max_image_pixels: int) -> tuple[int, int]:
    """(width, height) of a JPEG, PNG or WebP within the limit; CorruptImageError when too large or unknown."""
    size = declared_size(data)
    if size is None:
        raise CorruptImageError("no JPEG, PNG or WebP header with an image size")
    check_pixels(*size, max_image_pixels)
    return size


def open_header(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """PIL's image of a JPEG, PNG or WebP with only the header parsed (size, mode, format: ~20 µs), refused when
    it declares more than `max_image_pixels`. Other formats are not opened: fewer decoders face outside bytes."""
    size = declared_size(data)
    if size is not None:
        check_pixels(*size, max_image_pixels)  # before PIL, which warns on its own threshold at open
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:  # its message names the buffer's address: no two runs would say the same
        raise CorruptImageError("not a JPEG, PNG or WEBP image") from None
    except DECODE_ERRORS as error:
        raise CorruptImageError(f"cannot read an image header: {error}") from error
    check_pixels(*image.size, max_image_pixels)  # in case PIL reads a header otherwise than `declared_size`
    return image


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """The largest frame a JPEG declares before its first scan, walking the marker segments."""
    sizes: list[tuple[int, int]] = []
    position = 2  # after SOI
    while (found := _JPEG_MARKER.search(data, position)) is not None:
        marker, position = found.group(1)[0], found.end()  # `position`: the segment's length field
        if marker in (_JPEG_START_OF_SCAN, _JPEG_END_OF_IMAGE):
            break
        if marker in _JPEG_STANDALONE_MARKERS or position + 2 > len(data):
            continue
        length = int.from_bytes(data[position : position + 2], "big")  # counts itself, not the marker
        if marker in _JPEG_FRAME_MARKERS and length >= 7 and position + 7 <= len(data):
            height = int.from_bytes(data[position + 3 : position + 5], "big")
            width = int.from_bytes(data[position + 5 : position + 7], "big")
            sizes.append((width, height))
        position += max(length, 2)
    return max(sizes, key=lambda size: size[0] * size[1]) if sizes else None


def _webp_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """The canvas (VP8X) or frame (VP8 lossy, VP8L lossless) size: the bitstream headers of RFC 9649."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None
