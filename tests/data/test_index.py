"""Sample indexes: written beside every shard, recorded in the manifest, checked by verify, and refused when
malformed; reading shards through them is tested in test_shard_reader.py."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace

import numpy as np
import pytest
import webdataset as wds

from pipeline.config import DataConfig
from pipeline.data import index as sample_index
from pipeline.data import shard_reader
from pipeline.data.loader import build_loader
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.errors import DataError
from tests.conftest import write_split

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
