"""Shard locations: local paths, fsspec URLs and shard commands read the same bytes; writing stays local."""

from pathlib import Path

import fsspec
import pytest

from pipeline import locations
from pipeline.config import load_config
from pipeline.manifest import read_manifest
from tests.conftest import copy_to_memory, write_split


def test_join_builds_split_and_file_locations_for_paths_and_urls():
    assert locations.join("s3://bucket/imagenet/", "train", "manifest.json") == "s3://bucket/imagenet/train/manifest.json"
    assert locations.join("/data/shards", "val") == "/data/shards/val"
    assert locations.join(Path("data/shards"), "val") == "data/shards/val"


def test_shard_names_that_are_urls_or_pipes_are_kept_as_they_are():
    assert locations.shard_location("/data/shards/train", "train-000000.tar") == "/data/shards/train/train-000000.tar"
    assert locations.shard_location("memory://x/train", "gs://other/a.tar") == "gs://other/a.tar"
    assert locations.shard_location("/data/shards/train", "pipe:cat /a.tar") == "pipe:cat /a.tar"


def test_a_shard_command_gets_the_shard_location_shell_quoted():
    assert locations.pipe_command("aws s3 cp {url} -", "s3://b/x.tar") == "pipe:aws s3 cp s3://b/x.tar -"
    assert locations.pipe_command("cat {url}", "/a b/x.tar") == "pipe:cat '/a b/x.tar'"


def test_every_way_of_opening_a_shard_reads_the_same_bytes(tmp_path):
    write_split(tmp_path / "two words" / "val", [3])  # a space in the path: the pipe must quote it
    shard = tmp_path / "two words" / "val" / "val-000000.tar"
    memory_root = copy_to_memory(tmp_path / "two words", "open-shard")
    expected = shard.read_bytes()
    try:
        opened = {
            "local path": locations.open_shard(str(shard)),
            "file:// URL": locations.open_shard(f"file://{shard}"),  # fsspec takes the path literally, no %20
            "memory:// URL": locations.open_shard(f"{memory_root}/val/val-000000.tar"),
            "shard command": locations.open_shard(str(shard), "cat {url}"),
            "pipe: name": locations.open_shard(f"pipe:cat '{shard}'"),
        }
        for how, handle in opened.items():
            with handle as stream:
                assert stream.read() == expected, how
    finally:
        fsspec.filesystem("memory").rm(memory_root, recursive=True)


def test_manifests_are_read_from_a_url_split(tiny_shards, memory_shards):
    assert locations.is_file(f"{memory_shards}/train/manifest.json")
    assert not locations.is_file(f"{memory_shards}/train/missing.json")
    assert read_manifest(f"{memory_shards}/train") == read_manifest(tiny_shards / "train")
    with pytest.raises(ValueError, match="no manifest.json in memory://.*/nothing"):
        read_manifest(f"{memory_shards}/nothing")


def test_train_evaluate_and_predict_find_their_manifests_under_a_url_root(tiny_shards, memory_shards):
    from pipeline.evaluate import split_manifest
    from pipeline.predict import class_wnids
    from pipeline.trainer import check_inputs  # imports Ray, does not start it

    config = load_config(overrides=[f"data.root={memory_shards}"])
    assert check_inputs(config) == read_manifest(tiny_shards / "train")
    assert split_manifest(config, "test") == read_manifest(tiny_shards / "test")
    names = [f"class {index}" for index in range(4)]
    assert class_wnids(config, names) == [f"n{index:08d}" for index in range(4)]


@pytest.mark.parametrize("given", ["s3://bucket/shards", Path("s3://bucket/shards")])  # a Path collapses '//'
def test_writing_to_a_url_is_refused_with_the_upload_hint(given):
    with pytest.raises(ValueError, match=r"^--output = 's3://bucket/shards': only a local or NFS path .*aws s3 sync"):
        locations.require_local(given, "--output")


def test_shard_index_and_verify_refuse_urls_before_touching_anything(tmp_path):
    from pipeline.sharding import shard_imagenet
    from pipeline.verify import index_shards, verify_dataset

    with pytest.raises(ValueError, match="shard --output = 's3://b/x': only a local or NFS path"):
        shard_imagenet(tmp_path / "no-source", Path("s3://b/x"))
    with pytest.raises(ValueError, match="index folder = 'gs://b/x/train': only a local or NFS path"):
        index_shards(Path("gs://b/x/train"), "train")
    with pytest.raises(ValueError, match="verify folder = 's3://b/x': only a local or NFS path"):
        verify_dataset(Path("s3://b/x"))
