"""Reading samples out of webdataset shards: exactly the samples asked for, and only their bytes where it can.

A loader process asks for positions in its stream of shard segments (`read_positions`). A shard with a sample
index (`pipeline.data.index`, vouched for by the manifest's sha256, sized by its sample count and ending where
the shard does) is read run by run: a seek, or a ranged read on object storage, per run of wanted samples, each
checked as it is read to begin its samples at the index's boundaries. Other shards, `pipe:` streams included,
are read once from their start. Whatever cannot be read becomes an unreadable sample, never a missing or a
wrong one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import tarfile
from collections.abc import Iterator
from typing import IO, NamedTuple

import numpy as np
from webdataset import tariterators

from pipeline import storage
from pipeline.data import index as sample_index
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.data.plan import Segment
from pipeline.errors import DataError, StorageError, first_line


class Sample(NamedTuple):
    image: bytes | None  # None: unreadable or padding, becomes a masked slot
    label: int
    key: str = ""
    shard: int = -1  # manifest index of the shard it came from (-1: eval padding)


UNREADABLE = -1  # label of a sample whose bytes could not be read (counted as corrupt)


def read_whole_shard(
    split_dir: str, manifest: Manifest, shard: int, shard_command: str | None = None
) -> Iterator[tuple[bytes | None, int, str]]:
    """(image bytes, label, key) for each of the shard's manifest-counted samples, in order; what cannot be read
    comes as (None, -1, ""). Exactly `num_samples` items, like every pass of the loader."""
    url = storage.shard_location(split_dir, manifest.shards[shard].name)
    segment = Segment(shard, 0, manifest.shards[shard].num_samples)
    for sample in read_segment(url, segment, manifest, shard_command):
        yield sample.image, sample.label if sample.image is not None else UNREADABLE, sample.key


def shard_index(location: str, shard: ShardInfo) -> np.ndarray | None:
    """The shard's sample index if its manifest vouches for it (sha256), it counts the shard's samples (and is no
    larger than that count implies) and its last sample ends where the shard's end-of-archive begins; None (read
    from the shard's start) otherwise, said once per shard and process. Cached per process."""
    key = (location, shard.index_sha256)
    if key not in _INDEXES:
        _INDEXES[key] = _load_index(location, shard)
    return _INDEXES[key]


_INDEXES: dict[tuple[str, str | None], np.ndarray | None] = {}


def _load_index(location: str, shard: ShardInfo) -> np.ndarray | None:
    if shard.index_sha256 is None:
        _say_once(
            "shards without a sample index (written before indexes existed): a loader reads each from its "
            "start and skips to its samples; re-run `imagenet-pipeline index` on the split to add them"
        )
        return None
    where = sample_index.index_location(location)
    try:
        # At most the size the manifest's sample count implies: an oversized file is refused unread.
        data = storage.read_bytes(where, limit=sample_index.index_bytes(shard.num_samples))
        if hashlib.sha256(data).hexdigest() != shard.index_sha256:
            raise DataError(f"{where}: sha256 differs from the manifest's")
        shard_bytes = shard.bytes if shard.bytes is not None else storage.size(location)
        entries = sample_index.decode(data, where, shard_bytes)
        if len(entries) != shard.num_samples:
            raise DataError(f"{where}: {len(entries)} samples, the manifest says {shard.num_samples}")
        end = sample_index.end_of_samples(entries)  # the shard's last few KiB: its end-of-archive blocks
        trailer = storage.read_bytes(location, limit=shard_bytes - end, offset=end)
        sample_index.check_trailer(trailer, shard_bytes, entries, where)
    except (DataError, StorageError, OSError) as error:
        _say_once(f"sample index unusable ({first_line(error, with_type=False)}); reading {location} from its start")
        return None
    return entries


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger(__name__).warning(message)


_SAID: set[str] = set()


def read_segment(
    url: str, segment: Segment, manifest: Manifest, shard_command: str | None, index: np.ndarray | None = None
) -> Iterator[Sample]:
    """Yield exactly `segment.length` samples; what cannot be read becomes an unreadable sample. With the shard's
    `index`, only the segment's own bytes are read (a seek, or a ranged read); if that read fails partway, the
    rest of the segment is read from the shard's start, so no sample is lost, repeated or wrong."""
    produced = 0
    if index is not None:
        try:
            offset, length = sample_index.segment_range(index, segment.start, segment.stop)
            with storage.open_range(url, offset, length) as stream:
                for raw in indexed_tar_samples(stream, url, index, segment.start, segment.stop):
                    if produced == segment.length:
                        break
                    yield _parse(raw, manifest, segment.shard)
                    produced += 1
        except Exception as error:  # tar and storage errors alike: the sequential read takes over
            if isinstance(error, DataError):  # the index is not the tar's layout: not used again by this process
                _INDEXES.update({key: None for key in _INDEXES if key[0] == url})
            logging.getLogger(__name__).warning(
                "%s: indexed read stopped after %d of %d samples (%s); reading the rest from the shard's start",
                url,
                produced,
                segment.length,
                first_line(error),
            )
        if produced == segment.length:
            return
        segment = Segment(segment.shard, segment.start + produced, segment.stop)
        produced = 0
    try:
        with storage.open_shard(url, shard_command) as stream:
            for index, raw in enumerate(tar_samples(stream, url)):
                if index < segment.start:
                    continue  # skipping costs a read, not a decode
                if index >= segment.stop:
                    break
                yield _parse(raw, manifest, segment.shard)
                produced += 1
    except Exception as error:  # a damaged shard must not change this rank's step count
        # Stopping early closes a `pipe:` mid-stream and its command may then exit with an error: harmless
        # once every sample of the segment is in hand, so only a shortfall is worth a warning.
        if produced < segment.length:
            logging.getLogger(__name__).warning(
                "%s on %s: %s; %d samples masked", url, socket.gethostname(), error, segment.length - produced
            )
    for _ in range(segment.length - produced):
        yield Sample(None, UNREADABLE, shard=segment.shard)


def tar_samples(stream: IO[bytes], url: str) -> Iterator[dict]:
    """webdataset's own tar expansion and grouping by key, over a stream we opened (file, fsspec or pipe)."""
    files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
    return tariterators.group_by_keys(files)


def indexed_tar_samples(stream: IO[bytes], url: str, index: np.ndarray, start: int, stop: int) -> Iterator[dict]:
    """`tar_samples` of a ranged read of samples [start, stop) of an indexed shard, checked against the index as
    it is read: a sample must begin at each of the index's boundaries in the range and nowhere else, so an index
    whose boundaries split, join or skip samples (crafted, or of another tar) raises a DataError before a sample
    it misplaces is yielded (webdataset yields a sample when the next one begins or the read ends).

    An index holds no keys: a read that is consistent in itself but shifted by whole samples cannot be told from
    a right one here; `imagenet-pipeline verify` compares every index with its tar's layout."""
    return tariterators.group_by_keys(_checked_members(stream, url, index, start, stop))


# webdataset's tar_file_iterator skips these metadata members; it gives no member offsets, hence this loop.
_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")


def _checked_members(stream: IO[bytes], url: str, index: np.ndarray, start: int, stop: int) -> Iterator[dict]:
    offset = int(index[start, 0])
    first_ends = offset + int(index[start, 1])
    boundaries = {int(value) for value in index[start + 1 : stop, 0]}
    grouping, begun = sample_index.SampleStarts(), 0
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            at = offset + member.offset  # the member's header, in the shard
            begins = grouping.starts(member)
            if begins and not begun:  # the read's first sample: at its entry's offset (entry 0: before entry 1)
                placed = (at == offset or start == 0) and at < first_ends
            else:  # every later sample begins exactly at a boundary, and only there
                placed = begins is None or begins == (at in boundaries)
            if not placed:
                raise DataError(
                    f"{sample_index.index_location(url)}: a tar member ({member.name!r} at byte {at}) "
                    "is not where the sample index puts sample boundaries"
                )
            begun += bool(begins)
            name = member.name
            if (
                not member.isreg()
                or ("/" not in name and name.startswith("__") and name.endswith("__"))
                or _WEBDATASET_META.match(name)
            ):
                continue
            yield {"fname": name, "data": archive.extractfile(member).read(), "__url__": url}
            archive.members = []  # a stream read keeps no list of the members it passed (as webdataset does)
    if begun != stop - start:
        raise DataError(
            f"{sample_index.index_location(url)}: {begun} samples where the sample index puts {stop - start}"
        )


def _parse(raw: dict, manifest: Manifest, shard: int) -> Sample:
    image = raw.get(manifest.image_key)
    try:
        label = int(raw[manifest.label_key])
    except (KeyError, ValueError):
        return Sample(None, UNREADABLE, shard=shard)
    if image is None or not 0 <= label < manifest.num_classes:
        return Sample(None, UNREADABLE, shard=shard)
    return Sample(image, label, raw.get("__key__", ""), shard)


def read_positions(
    locations: list[str],
    manifest: Manifest,
    shard_command: str | None,
    segments: tuple[Segment, ...],
    wanted: list[int] | range,
) -> Iterator[tuple[int, Sample]]:
    """(position, sample) for each wanted position of a stream of `segments`, in increasing position order.
    Indexed shards are read run by run (only wanted bytes); others once from the first wanted sample."""
    needed = np.zeros(sum(segment.length for segment in segments), dtype=bool)
    needed[np.asarray(wanted, dtype=np.int64)] = True
    position = 0
    for segment in segments:
        mask = needed[position : position + segment.length]
        location = locations[segment.shard]
        index = None if shard_command or not mask.any() else shard_index(location, manifest.shards[segment.shard])
        runs = _coalesced(_runs(mask), index) if index is not None else _span(mask)
        for lo, hi in runs:
            part = Segment(segment.shard, segment.start + lo, segment.start + hi)
            for offset, sample in enumerate(read_segment(location, part, manifest, shard_command, index), lo):
                if mask[offset]:
                    yield position + offset, sample
        position += segment.length


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[::2], edges[1::2])]


# A pass resumed within an epoch wants the samples its shuffle has not yet given: scattered single samples, each
# its own ranged read (an HTTP request on object storage). Runs closer than this are read as one and the samples
# between them dropped: a request costs about as much as reading a MiB.
MAX_GAP_BYTES = 1 << 20


def _coalesced(runs: list[tuple[int, int]], index: np.ndarray) -> list[tuple[int, int]]:
    """`runs` with those separated by fewer than MAX_GAP_BYTES of unwanted samples joined."""
    joined: list[tuple[int, int]] = []
    for lo, hi in runs:
        if joined:
            gap = int(index[lo, 0]) - int(index[joined[-1][1] - 1, 0] + index[joined[-1][1] - 1, 1])
            if gap < MAX_GAP_BYTES:
                joined[-1] = (joined[-1][0], hi)
                continue
        joined.append((lo, hi))
    return joined


def _span(mask: np.ndarray) -> list[tuple[int, int]]:
    """One read from the first to the last True of `mask` (none if it has none): a shard without an index is
    read from its start anyway, so skipping within it costs no extra opening."""
    hits = np.flatnonzero(mask)
    return [(int(hits[0]), int(hits[-1]) + 1)] if len(hits) else []
