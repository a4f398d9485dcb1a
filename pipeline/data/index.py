"""Per-shard sample index: where each sample's tar members begin and end, so a loader reads only its own bytes.

    train-000042.tar.idx   beside train-000042.tar, written by `shard` and `index`, checked by `verify`

Format: the 8 bytes `WDSIDX01`, a little-endian uint64 sample count, then per sample two little-endian uint64s:
the offset of its first member's tar header and the size up to the next sample's (the last: to the end of its
padded data). Samples are grouped as webdataset groups them (consecutive members sharing the name before the
basename's first dot) and tile the file from byte 0, which `decode` checks.
The manifest records each index's sha256 (`ShardInfo.index_sha256`): an index that does not match is not used.
Parsed with numpy from bytes: data only, nothing in it can run.

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

from pipeline.errors import DataError

MAGIC = b"WDSIDX01"
SUFFIX = ".idx"
_HEADER = len(MAGIC) + 8
_BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then extension


def index_location(shard_location: str) -> str:
    return shard_location + SUFFIX


def build_index(stream: IO[bytes]) -> np.ndarray:
    """(n, 2) uint64 array of (offset, size) per sample of a tar opened for random access (headers only)."""
    entries: list[list[int]] = []
    key, extensions = None, set()
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for member in archive:
            match = _KEY.match(member.name) if member.isfile() else None
            if match is None:
                continue  # webdataset skips members that are not `key.extension` files
            end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
            member_key, extension = match.groups()
            if member_key != key or extension in extensions:
                entries.append([member.offset, end - member.offset])
                key, extensions = member_key, set()
            else:
                entries[-1][1] = end - entries[-1][0]
            extensions.add(extension)
    # The samples tile the file from byte 0 (a member webdataset skips counts with the sample before it), so an
    # index that decodes is the tar's own layout: no other valid boundaries give the same tiling.
    for this, following in zip(entries, entries[1:]):
        this[1] = following[0] - this[0]
    if entries:
        entries[0] = [0, entries[0][0] + entries[0][1]]
    return np.array(entries, dtype=np.uint64).reshape(-1, 2)


def encode(entries: np.ndarray) -> bytes:
    return MAGIC + np.uint64(len(entries)).astype("<u8").tobytes() + entries.astype("<u8").tobytes()


def decode(data: bytes, where: str) -> np.ndarray:
    """The entries of an index file's bytes; a DataError naming `where` for anything malformed."""
    if len(data) < _HEADER or data[:len(MAGIC)] != MAGIC:
        raise DataError(f"{where}: not a sample index (no {MAGIC.decode()} header)")
    count = int(np.frombuffer(data, dtype="<u8", count=1, offset=len(MAGIC))[0])
    if len(data) != _HEADER + 16 * count:
        raise DataError(f"{where}: sample index says {count} samples but holds {(len(data) - _HEADER) // 16}")
    entries = np.frombuffer(data, dtype="<u8", offset=_HEADER).reshape(count, 2).astype(np.uint64)
    ends = entries[:, 0] + entries[:, 1]
    if count and ((entries[:, 1] == 0).any() or entries[0, 0] != 0 or (entries[1:, 0] != ends[:-1]).any()):
        raise DataError(f"{where}: sample index entries do not tile the shard from its start")
    return entries


def write_index(shard: Path, target: Path | None = None) -> tuple[str, int]:
    """Write `shard`'s index to `target` (default: beside it), atomically: a reader never sees half of it.
    Returns (sha256 of the index file, samples)."""
    with open(shard, "rb") as handle:
        data = encode(build_index(handle))
    target = target or Path(index_location(str(shard)))
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return hashlib.sha256(data).hexdigest(), (len(data) - _HEADER) // 16


def segment_range(entries: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """(offset, length) of the bytes holding samples [start, stop)."""
    offset = int(entries[start, 0])
    return offset, int(entries[stop - 1, 0] + entries[stop - 1, 1]) - offset
