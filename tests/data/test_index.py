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
        stream = io.BytesIO(data[offset : offset + length] + bytes(1024))
        (sample,) = shard_reader.tar_samples(stream, "t.tar")
        assert sample["__key__"].startswith(f"k{number}") and len(sample["jpg"]) == [100, 700, 3000, 5][number]
    assert sample_index.decode(sample_index.encode(entries), "t.idx").tolist() == entries.tolist()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOTANIDX" + bytes(8), "not a sample index"),
        (sample_index.MAGIC + np.uint64(3).tobytes() + bytes(16), "says 3 samples but holds 1"),
        (sample_index.encode(np.array([[0, 512], [1024, 512]], dtype=np.uint64)), "do not tile the shard"),
        (sample_index.encode(np.array([[512, 512]], dtype=np.uint64)), "do not tile the shard"),
    ],
)
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


def test_index_writes_and_verify_checks_the_sample_indexes(tmp_path):
    from pipeline.data.verify import index_shards, verify_split

    write_split(tmp_path / "val", [5, 4])
    manifest = index_shards(tmp_path / "val", "val", progress=False)
    assert all(shard.index_sha256 for shard in manifest.shards)
    assert read_manifest(tmp_path / "val").shards[0].index_sha256 == manifest.shards[0].index_sha256
    assert verify_split(tmp_path / "val") == []
    index_file = tmp_path / "val" / (manifest.shards[0].name + ".idx")
    index_file.write_bytes(index_file.read_bytes()[:-1])
    assert verify_split(tmp_path / "val") == [
        f"{manifest.shards[0].name}: sample index sha256 differs from the manifest's"
    ]
    index_file.unlink()
    assert "sample index val-000000.tar.idx is missing" in verify_split(tmp_path / "val")[0]


def test_a_manifest_index_sha256_that_is_not_a_digest_is_refused(tmp_path):
    manifest = write_split(tmp_path / "val", [3])
    write_manifest(
        replace(manifest, shards=[replace(manifest.shards[0], index_sha256="$(rm -rf /)")]), tmp_path / "val"
    )
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
    stream = build_loader(
        DataConfig(root=tmp_path / "out", loader_workers=0, **SMALL),
        "train",
        rank=1,
        world_size=2,
        batch_size=2,
        seed=0,
    ).dataset
    assert all(
        shard_reader.shard_index(stream.locations[s.shard], manifest.shards[s.shard]) is not None
        for s in stream.plan().segments
    )
    keys = [sample.key for sample in stream._read(stream.plan().segments)]
    assert len(keys) == sum(s.length for s in stream.plan().segments) and all(keys)


def test_the_index_ends_where_the_tars_end_of_archive_begins_and_a_shorter_one_is_refused():
    import tarfile

    data = _tar(["k0", "k1", "k2"], [100, 700, 3000])
    entries = sample_index.build_index(io.BytesIO(data))
    decoded = sample_index.decode(sample_index.encode(entries), "t.idx", shard_bytes=len(data))
    assert decoded.tolist() == entries.tolist()
    # Samples split so that three entries tile only the first two samples: k2 would be read by no one.
    members = [member.offset for member in tarfile.open(fileobj=io.BytesIO(data))]
    prefix = np.array(
        [[0, members[1]], [members[1], members[2] - members[1]], [members[2], members[4] - members[2]]], dtype=np.uint64
    )
    with pytest.raises(
        DataError,
        match=rf"t.idx: sample index ends at byte {members[4]}, not where the shard's "
        rf"end-of-archive blocks begin \(the shard has {len(data)} bytes\)",
    ):
        sample_index.decode(sample_index.encode(prefix), "t.idx", shard_bytes=len(data))
    # A member webdataset skips after the last sample still belongs to it: the index reaches the archive's end.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("k0.jpg", "k0.cls", "README"):
            archive.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    with_trailer = sample_index.build_index(io.BytesIO(buffer.getvalue()))
    assert with_trailer.tolist() == [[0, 3 * 512]]
    sample_index.decode(sample_index.encode(with_trailer), "t.idx", shard_bytes=len(buffer.getvalue()))


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
