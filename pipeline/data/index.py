"""Per-shard sample index: where each sample's tar members begin and end, so a loader reads only its own bytes.

    train-000042.tar.idx   beside train-000042.tar, written by `shard` and `index`, checked by `verify`

Format: the 8 bytes `WDSIDX01`, a little-endian uint64 sample count, then per sample two little-endian uint64s:
the offset of its first member's tar header and the size up to the next sample's (the last: to the end of its
padded data, or of any member webdataset skips after it). Samples are grouped as webdataset groups them
(consecutive members sharing the name before the basename's first dot), tile the file from byte 0 and end where
the tar's end-of-archive blocks begin, which `decode` checks (the shard's size comes from its manifest).
The manifest records each index's sha256 (`ShardInfo.index_sha256`): an index that does not match is not used.
Parsed with numpy from bytes: data only, nothing in it can run. An index holds no sample keys, so a reader
checks what it can as it reads (`SampleStarts`): within each ranged read, samples begin at the index's boundaries
and nowhere else.

A loader process whose plan starts in the middle of a shard then seeks to its first sample (a ranged read on
object storage) instead of reading the shard from its start and skipping (`pipeline.data.shard_reader`).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path
from typing import IO

import numpy as np

from pipeline import storage
from pipeline.errors import DataError

MAGIC = b"WDSIDX01"
SUFFIX = ".idx"
_HEADER = len(MAGIC) + 8
_ENTRY = 16  # bytes per sample: offset and size, two uint64
_BLOCK = 512
# After the last member a tar holds two zero blocks, then (Python's tarfile, GNU tar, bsdtar) zeros up to a whole
# 10 KiB record; some writers stop after the two blocks.
_END_BLOCKS = 2 * _BLOCK
_RECORD = 20 * _BLOCK
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then extension


def index_location(shard_location: str) -> str:
    return shard_location + SUFFIX


class SampleStarts:
    """Which tar members begin a sample, as webdataset's grouping decides: the first `key.extension` file, then
    each whose key differs from the one before or repeats an extension. Other members (directories, names
    without a dot) belong to no sample: `starts` gives None for them."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.extensions: set[str] = set()

    def starts(self, member: tarfile.TarInfo) -> bool | None:
        match = _KEY.match(member.name) if member.isfile() else None
        if match is None:
            return None  # webdataset skips members that are not `key.extension` files
        key, extension = match.groups()
        begins = key != self.key or extension in self.extensions
        if begins:
            self.key, self.extensions = key, set()
        self.extensions.add(extension)
        return begins


def build_index(stream: IO[bytes]) -> np.ndarray:
    """(n, 2) uint64 array of (offset, size) per sample of a tar opened for random access (headers only)."""
    entries: list[list[int]] = []
    grouping, archive_end = SampleStarts(), 0
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for member in archive:
            archive_end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
            begins = grouping.starts(member)
            if begins:
                entries.append([member.offset, 0])
    # The samples tile the file from byte 0 to the end-of-archive blocks (a member webdataset skips counts with
    # the sample before it), so an index that decodes is the tar's own layout: no other valid boundaries give
    # the same tiling.
    for this, following in zip(entries, entries[1:]):
        this[1] = following[0] - this[0]
    if entries:
        entries[-1][1] = archive_end - entries[-1][0]
        entries[0] = [0, entries[0][0] + entries[0][1]]
    return np.array(entries, dtype=np.uint64).reshape(-1, 2)


def encode(entries: np.ndarray) -> bytes:
    return MAGIC + np.uint64(len(entries)).astype("<u8").tobytes() + entries.astype("<u8").tobytes()


def index_bytes(num_samples: int) -> int:
    """The size of the index of a shard of `num_samples` samples: what a reader reads at most."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise DataError(f"a shard of {num_samples!r} samples has no sample index (a count is an integer >= 0)")
    return _HEADER + _ENTRY * num_samples


def decode(data: bytes, where: str, shard_bytes: int | None = None) -> np.ndarray:
    """The entries of an index file's bytes; a DataError naming `where` for anything malformed. With the shard's
    size (`shard_bytes`), the last entry must also end where the shard's end-of-archive blocks can begin (the
    bytes after it are at most two blocks and a record's padding); `check_trailer` then checks those bytes."""
    if len(data) < _HEADER or data[: len(MAGIC)] != MAGIC:
        raise DataError(f"{where}: not a sample index (no {MAGIC.decode()} header)")
    count = int(np.frombuffer(data, dtype="<u8", count=1, offset=len(MAGIC))[0])
    if len(data) != index_bytes(count):
        raise DataError(f"{where}: sample index says {count} samples but holds {(len(data) - _HEADER) // _ENTRY}")
    entries = np.frombuffer(data, dtype="<u8", offset=_HEADER).reshape(count, 2).astype(np.uint64)
    ends = entries[:, 0] + entries[:, 1]
    if count and (
        (entries[:, 1] == 0).any()
        or entries[0, 0] != 0
        or (entries[1:, 0] != ends[:-1]).any()
        or (ends < entries[:, 0]).any()
    ):  # a size that wraps past 2**64
        raise DataError(f"{where}: sample index entries do not tile the shard from its start")
    end = end_of_samples(entries)
    if shard_bytes is not None and shard_bytes not in (end + _END_BLOCKS, -(-(end + _END_BLOCKS) // _RECORD) * _RECORD):
        raise DataError(
            f"{where}: sample index ends at byte {end}, not where the shard's end-of-archive blocks "
            f"begin (the shard has {shard_bytes} bytes)"
        )
    return entries


def end_of_samples(entries: np.ndarray) -> int:
    return int(entries[-1].sum()) if len(entries) else 0


def check_trailer(trailer: bytes, shard_bytes: int, entries: np.ndarray, where: str) -> None:
    """The shard's bytes after the index's last sample (a few KiB, bounded by `decode`) are zeros: the tar's
    end-of-archive, so no member lies past the index (record padding could otherwise hide small samples)."""
    if len(trailer) != shard_bytes - end_of_samples(entries) or trailer.count(0) != len(trailer):
        raise DataError(f"{where}: the shard holds more than zero blocks after the sample index's last sample")


def write_index(shard: Path, target: Path | None = None) -> tuple[str, int]:
    """Write `shard`'s index to `target` (default: beside it), atomically: a reader never sees half of it.
    Returns (sha256 of the index file, samples)."""
    with open(shard, "rb") as handle:
        data = encode(build_index(handle))
    with storage.atomic_write(target or index_location(str(shard))) as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest(), (len(data) - _HEADER) // _ENTRY


def segment_range(entries: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """(offset, length) of the bytes holding samples [start, stop)."""
    offset = int(entries[start, 0])
    return offset, int(entries[stop - 1, 0] + entries[stop - 1, 1]) - offset
