"""Sample indexes: a loader process reads exactly its planned samples' bytes, locally and on object storage, and
anything wrong with an index falls back to the sequential read, reported, never to a wrong sample."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import replace

import numpy as np
import pytest
import webdataset as wds

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data import index as sample_index
from pipeline.data import shard_reader
from pipeline.data.loader import ShardStream, build_loader
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.errors import DataError
from tests.conftest import copy_to_memory, write_split

SMALL = dict(train_image_size=32, eval_image_size=32, shuffle_buffer=4)


@pytest.fixture(autouse=True)
def fresh_loader_caches():
    """The loader caches indexes and says each warning once per process: each test starts afresh."""
    shard_reader._INDEXES.clear()
    shard_reader._SAID.clear()


def _tar(keys, sizes):
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for key, size in zip(keys, sizes):
            writer.write({"__key__": key, "jpg": b"j" * size, "cls": b"1"})
    return buffer.getvalue()


def test_the_index_tiles_the_tar_by_sample_and_each_range_reads_exactly_that_sample():
    data = _tar([f"k{i}" + "x" * (130 if i == 2 else 0) for i in range(4)], [100, 700, 3000, 5])  # k2: a long name
    entries = sample_index.build_index(io.BytesIO(data))
    assert len(entries) == 4 and entries[0, 0] == 0
    assert (entries[1:, 0] == entries[:-1, 0] + entries[:-1, 1]).all()
    for number in range(4):
        offset, length = sample_index.segment_range(entries, number, number + 1)
        stream = io.BytesIO(data[offset:offset + length] + bytes(1024))
        (sample,) = shard_reader.tar_samples(stream, "t.tar")
        assert sample["__key__"].startswith(f"k{number}") and len(sample["jpg"]) == [100, 700, 3000, 5][number]
    assert sample_index.decode(sample_index.encode(entries), "t.idx").tolist() == entries.tolist()


@pytest.mark.parametrize(("data", "message"), [
    (b"NOTANIDX" + bytes(8), "not a sample index"),
    (sample_index.MAGIC + np.uint64(3).tobytes() + bytes(16), "says 3 samples but holds 1"),
    (sample_index.encode(np.array([[0, 512], [1024, 512]], dtype=np.uint64)), "do not tile the shard"),
    (sample_index.encode(np.array([[512, 512]], dtype=np.uint64)), "do not tile the shard"),
])
def test_a_malformed_index_is_refused_naming_it(data, message):
    with pytest.raises(DataError, match=f"t.idx: .*{message}"):
        sample_index.decode(data, "t.idx")


def _indexed_split(root, sizes, split="train"):
    return write_split(root / split, sizes, split=split, indexed=True)


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
    entries = [sample_index.decode((tmp_path / "val" / (s.name + ".idx")).read_bytes(), s.name) for s in manifest.shards]
    for rank in range(world):
        stream = build_loader(DataConfig(root=root, loader_workers=workers, **SMALL), "val", rank=rank,
                              world_size=world, batch_size=2, seed=0).dataset
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
        stream = build_loader(DataConfig(root=tmp_path / name, loader_workers=0, **SMALL), "train", rank=1,
                              world_size=2, batch_size=2, seed=0).dataset
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
        stream: ShardStream = build_loader(DataConfig(root=root, loader_workers=0, **SMALL), "train", rank=rank,
                                           world_size=3, batch_size=2, seed=0).dataset
        keys += [sample.key for sample in stream._read(stream.plan().segments)]
    return keys


def test_index_writes_and_verify_checks_the_sample_indexes(tmp_path):
    from pipeline.data.verify import index_shards, verify_split

    write_split(tmp_path / "val", [5, 4])
    manifest = index_shards(tmp_path / "val", "val", progress=False)
    assert all(shard.index_sha256 for shard in manifest.shards)
    assert read_manifest(tmp_path / "val").shards[0].index_sha256 == manifest.shards[0].index_sha256
    assert verify_split(tmp_path / "val") == []
    index_file = tmp_path / "val" / (manifest.shards[0].name + ".idx")
    index_file.write_bytes(index_file.read_bytes()[:-1])
    assert verify_split(tmp_path / "val") == [f"{manifest.shards[0].name}: sample index sha256 differs from the "
                                               "manifest's"]
    index_file.unlink()
    assert "sample index val-000000.tar.idx is missing" in verify_split(tmp_path / "val")[0]


def test_a_manifest_index_sha256_that_is_not_a_digest_is_refused(tmp_path):
    manifest = write_split(tmp_path / "val", [3])
    write_manifest(replace(manifest, shards=[replace(manifest.shards[0], index_sha256="$(rm -rf /)")]), tmp_path / "val")
    with pytest.raises(DataError, match=r"index_sha256 '\$\(rm -rf /\)', not a sha256 hex digest"):
        read_manifest(tmp_path / "val")


def test_shard_writes_an_index_beside_every_shard_and_the_loader_uses_it(tmp_path):
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder
    from pipeline.data.verify import verify_dataset

    generate_imagenet_folder(tmp_path / "src", num_classes=2, train_per_class=6, val_per_class=2, width=48, height=40)
    shard_imagenet(tmp_path / "src", tmp_path / "out", val_per_class=2, samples_per_shard=5, progress=False)
    manifest = read_manifest(tmp_path / "out" / "train")
    for shard in manifest.shards:
        data = (tmp_path / "out" / "train" / (shard.name + ".idx")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.index_sha256
        assert len(sample_index.decode(data, shard.name)) == shard.num_samples
    assert all(problems == [] for problems in verify_dataset(tmp_path / "out").values())
    stream = build_loader(DataConfig(root=tmp_path / "out", loader_workers=0, **SMALL), "train", rank=1,
                          world_size=2, batch_size=2, seed=0).dataset
    assert all(shard_reader.shard_index(stream.locations[s.shard], manifest.shards[s.shard]) is not None
               for s in stream.plan().segments)
    keys = [sample.key for sample in stream._read(stream.plan().segments)]
    assert len(keys) == sum(s.length for s in stream.plan().segments) and all(keys)
