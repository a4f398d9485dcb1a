"""Reading shards by sample index: a loader process reads exactly its planned samples' bytes, locally and on
object storage, and anything wrong with an index falls back to the sequential read, reported, never to a wrong
sample."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import replace

import numpy as np
import pytest

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data import index as sample_index
from pipeline.data import shard_reader
from pipeline.data.loader import ShardStream, build_loader
from pipeline.data.manifest import read_manifest, write_manifest
from tests.conftest import copy_to_memory, write_split
from tests.data.test_index import SMALL, _indexed_split, _tar, fresh_loader_caches  # noqa: F401 - autouse fixture


class _Counted:
    """Bytes read through every file object `storage` opens (local files) or fetches (fsspec cat_file)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        counter = self

        class Handle(io.FileIO):
            def read(self, size=-1):
                chunk = super().read(size)
                counter.bytes += len(chunk)
                return chunk

            def readinto(self, buffer):
                count = super().readinto(buffer)
                counter.bytes += count or 0
                return count

        # Unbuffered: every byte asked for is a byte read from the file.
        monkeypatch.setattr(storage, "open", lambda path, mode="rb": Handle(path), raising=False)
        import fsspec.implementations.memory as memory

        original = memory.MemoryFileSystem.cat_file

        def cat_file(fs, path, start=None, end=None, **kwargs):
            chunk = original(fs, path, start=start, end=end, **kwargs)
            counter.bytes += len(chunk)
            return chunk

        monkeypatch.setattr(memory.MemoryFileSystem, "cat_file", cat_file)


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 1)])
def test_every_loader_process_reads_exactly_its_planned_samples_bytes(tmp_path, monkeypatch, where, world, workers):
    manifest = _indexed_split(tmp_path, [7, 11, 6], split="val")
    root = str(tmp_path) if where == "local" else copy_to_memory(tmp_path, f"idx-{tmp_path.name}")
    counted = _Counted(monkeypatch)
    entries = [
        sample_index.decode((tmp_path / "val" / (s.name + ".idx")).read_bytes(), s.name) for s in manifest.shards
    ]
    for rank in range(world):
        stream = build_loader(
            DataConfig(root=root, loader_workers=workers, **SMALL),
            "val",
            rank=rank,
            world_size=world,
            batch_size=2,
            seed=0,
        ).dataset
        for worker in range(workers):
            plan = stream.plan(worker, workers)
            before = counted.bytes
            samples = list(stream._read(plan.segments))
            planned = sum(sample_index.segment_range(entries[s.shard], s.start, s.stop)[1] for s in plan.segments)
            assert counted.bytes - before == planned  # not a byte before its first sample or after its last
            assert len(samples) == sum(s.length for s in plan.segments) and all(s.image for s in samples)


def test_without_an_index_the_same_samples_come_from_the_sequential_read_with_a_hint(tmp_path, caplog):
    _indexed_split(tmp_path / "a", [7, 11])
    write_split(tmp_path / "b" / "train", [7, 11], split="train")  # as older versions wrote them: no index
    keys = {}
    for name in ("a", "b"):
        stream = build_loader(
            DataConfig(root=tmp_path / name, loader_workers=0, **SMALL),
            "train",
            rank=1,
            world_size=2,
            batch_size=2,
            seed=0,
        ).dataset
        keys[name] = [sample.key for sample in stream._read(stream.plan().segments)]
    assert keys["a"] == keys["b"] and keys["a"]
    assert "re-run `imagenet-pipeline index` on the split to add them" in caplog.text


@pytest.mark.parametrize("damage", ["bytes", "entries"])
def test_a_damaged_index_falls_back_to_the_sequential_read_and_says_so(tmp_path, caplog, damage):
    manifest = _indexed_split(tmp_path, [9, 9])
    expected = _keys_of(tmp_path)
    index_file = tmp_path / "train" / (manifest.shards[1].name + ".idx")
    entries = sample_index.decode(index_file.read_bytes(), "x")
    if damage == "bytes":  # not the index the manifest vouches for
        index_file.write_bytes(index_file.read_bytes()[:-16] + bytes(16))
    else:  # vouched for (its sha256 in the manifest), but its boundaries fall inside members
        shifted = entries.copy()
        shifted[1:, 0] += 512
        shifted[:-1, 1] += np.diff(shifted[:, 0]) - shifted[:-1, 1]
        index_file.write_bytes(sample_index.encode(shifted))
        vouched = replace(manifest.shards[1], index_sha256=hashlib.sha256(index_file.read_bytes()).hexdigest())
        write_manifest(replace(manifest, shards=[manifest.shards[0], vouched]), tmp_path / "train")
    shard_reader._INDEXES.clear()
    with caplog.at_level(logging.WARNING):
        assert _keys_of(tmp_path) == expected
    assert "sample index unusable" in caplog.text or "indexed read stopped" in caplog.text


def _keys_of(root):
    """Every rank's samples, in order, of a world of 3 (segments that start in the middle of both shards)."""
    shard_reader._INDEXES.clear()
    keys = []
    for rank in range(3):
        stream: ShardStream = build_loader(
            DataConfig(root=root, loader_workers=0, **SMALL), "train", rank=rank, world_size=3, batch_size=2, seed=0
        ).dataset
        keys += [sample.key for sample in stream._read(stream.plan().segments)]
    return keys


def _vouched(root, manifest, entries_or_bytes, shard=0):
    """Write a planted index for `shard` and a manifest that vouches for it (its sha256), as an attacker with write
    access to the shard storage could; returns the manifest read back and the shard's location."""
    index_file = root / "train" / (manifest.shards[shard].name + ".idx")
    data = entries_or_bytes if isinstance(entries_or_bytes, bytes) else sample_index.encode(entries_or_bytes)
    index_file.write_bytes(data)
    shards = list(manifest.shards)
    shards[shard] = replace(shards[shard], index_sha256=hashlib.sha256(data).hexdigest())
    write_manifest(replace(manifest, shards=shards), root / "train")
    shard_reader._INDEXES.clear()
    return read_manifest(root / "train"), str(root / "train" / manifest.shards[shard].name)


def test_a_vouched_index_that_tiles_only_part_of_the_shard_falls_back_with_the_hint(tmp_path, caplog):
    import tarfile

    manifest = _indexed_split(tmp_path, [6, 5])
    expected = _keys_of(tmp_path)
    shard_file = tmp_path / "train" / manifest.shards[0].name
    with tarfile.open(shard_file) as archive:
        offsets = [member.offset for member in archive]  # two members per sample
    # Six entries over five samples (sample 0 split in two), so the last sample is indexed by none of them; it
    # is small enough to sit where the tar's record padding would be, so only the shard's last bytes tell.
    starts = [0, offsets[1], *offsets[2:10:2]]
    ends = [*starts[1:], offsets[10]]
    planted = np.array([[start, end - start] for start, end in zip(starts, ends)], dtype=np.uint64)
    vouched, location = _vouched(tmp_path, manifest, planted)
    with caplog.at_level(logging.WARNING):
        assert shard_reader.shard_index(location, vouched.shards[0]) is None
        assert _keys_of(tmp_path) == expected
    assert "sample index unusable" in caplog.text
    assert "the shard holds more than zero blocks after the sample index's last sample" in caplog.text
    assert f"reading {location} from its start" in caplog.text


def test_an_index_larger_than_its_sample_count_implies_is_not_read(tmp_path, caplog, monkeypatch):
    manifest = _indexed_split(tmp_path, [4])
    index_file = tmp_path / "train" / (manifest.shards[0].name + ".idx")
    oversized = index_file.read_bytes() + bytes(1 << 20)  # vouched for, yet 1 MiB more than 4 samples need
    vouched, location = _vouched(tmp_path, manifest, oversized)
    read = []
    original = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda where, limit=None: read.append(limit) or original(where, limit))
    with caplog.at_level(logging.WARNING):
        assert shard_reader.shard_index(location, vouched.shards[0]) is None
    assert read == [sample_index.index_bytes(4)] == [16 + 16 * 4]
    assert f"larger than the {16 + 16 * 4} bytes expected" in caplog.text and "reading" in caplog.text


def test_an_index_whose_boundaries_split_samples_is_caught_as_it_is_read_never_giving_a_wrong_sample(tmp_path, caplog):
    import tarfile

    from pipeline.data.plan import Segment

    manifest = _indexed_split(tmp_path, [5])
    shard_file = tmp_path / "train" / manifest.shards[0].name
    with tarfile.open(shard_file) as archive:
        offsets = [member.offset for member in archive]
    entries = sample_index.decode((tmp_path / "train" / (manifest.shards[0].name + ".idx")).read_bytes(), "x")
    # Tiles the shard, ends where it ends, counts 5: but entry 1 starts at sample 0's second member and holds
    # all of sample 1, so a read of entries 1-2 would give sample 1 for position 2.
    planted = entries.copy()
    planted[1, 0] = offsets[1]
    planted[:, 1] = np.append(planted[1:, 0], entries[-1].sum()) - planted[:, 0]
    vouched, location = _vouched(tmp_path, manifest, planted)
    index = shard_reader.shard_index(location, vouched.shards[0])
    assert index is not None  # nothing in the file itself gives it away
    with caplog.at_level(logging.WARNING):
        samples = list(shard_reader.read_segment(location, Segment(0, 1, 3), vouched, None, index))
    assert [sample.key for sample in samples] == ["s000001", "s000002"] and all(s.image for s in samples)
    assert "is not where the sample index puts sample boundaries" in caplog.text
    assert shard_reader.shard_index(location, vouched.shards[0]) is None  # not trusted again by this process


def test_a_checked_indexed_read_of_a_sound_index_gives_every_range_its_own_samples(tmp_path):

    manifest = _indexed_split(tmp_path, [7])
    location = str(tmp_path / "train" / manifest.shards[0].name)
    index = shard_reader.shard_index(location, manifest.shards[0])
    for start, stop in [(0, 7), (0, 1), (3, 4), (2, 6), (6, 7)]:
        with storage.open_range(location, *sample_index.segment_range(index, start, stop)) as stream:
            keys = [raw["__key__"] for raw in shard_reader.indexed_tar_samples(stream, location, index, start, stop)]
        assert keys == [f"s{number:06d}" for number in range(start, stop)]
