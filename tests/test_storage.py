"""Storage: shard locations (local paths, fsspec URLs and shard commands read the same bytes; writing stays local),
and run bookkeeping files on local storage and on storage URIs."""

from pathlib import Path

import fsspec
import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest
from pipeline.errors import ConfigError, StorageError
from tests.conftest import copy_to_memory, write_split


def test_join_builds_split_and_file_locations_for_paths_and_urls():
    assert storage.join("s3://bucket/imagenet/", "train", "manifest.json") == "s3://bucket/imagenet/train/manifest.json"
    assert storage.join("/data/shards", "val") == "/data/shards/val"
    assert storage.join(Path("data/shards"), "val") == "data/shards/val"


def test_shard_names_that_are_urls_are_kept_and_pipes_are_refused(tmp_path):
    assert storage.shard_location("/data/shards/train", "train-000000.tar") == "/data/shards/train/train-000000.tar"
    assert storage.shard_location("memory://x/train", "gs://other/a.tar") == "gs://other/a.tar"
    marker = tmp_path / "ran"
    with pytest.raises(StorageError, match="never run"):
        storage.shard_location("/data/shards/train", f"pipe:touch {marker}")
    with pytest.raises(StorageError, match="never run"):
        storage.open_shard(f"pipe:touch {marker}")
    assert not marker.exists()


def test_a_shard_command_gets_the_shard_location_as_one_argument_without_a_shell():
    assert storage.shard_argv("aws s3 cp {url} -", "s3://b/x.tar") == ["aws", "s3", "cp", "s3://b/x.tar", "-"]
    assert storage.shard_argv("cat '{url}'", "/a b/x.tar") == ["cat", "/a b/x.tar"]  # quotes are the template's


@pytest.mark.parametrize(
    "template", ["sh -c 'cat {url}'", "cat {url} {url}", "cat {url}.tar", "{url} -", "cat", "cat 'x"]
)
def test_a_shard_command_that_could_splice_the_location_into_a_shell_is_refused(template):
    with pytest.raises(StorageError):
        storage.check_shard_command(template)
    with pytest.raises(ConfigError, match="data.shard_command"):
        load_config(overrides=[f"data.shard_command={template}"])


@pytest.mark.parametrize("template", ["cat '{url}'", 'cat "{url}"', "cat {url}"])
def test_a_crafted_shard_location_runs_nothing_with_any_quoting_of_the_template(tmp_path, template):
    marker = tmp_path / "pwned"
    crafted = f"x'; touch {marker}; echo '\"; touch {marker}; echo \"$(touch {marker})"
    with pytest.raises(StorageError, match="exited with status"):
        with storage.open_shard(crafted, template) as stream:
            stream.read()
    assert not marker.exists()


def test_every_way_of_opening_a_shard_reads_the_same_bytes(tmp_path):
    write_split(tmp_path / "two words" / "val", [3])  # a space in the path: the pipe must quote it
    shard = tmp_path / "two words" / "val" / "val-000000.tar"
    memory_root = copy_to_memory(tmp_path / "two words", "open-shard")
    expected = shard.read_bytes()
    try:
        opened = {
            "local path": storage.open_shard(str(shard)),
            "file:// URL": storage.open_shard(f"file://{shard}"),  # fsspec takes the path literally, no %20
            "memory:// URL": storage.open_shard(f"{memory_root}/val/val-000000.tar"),
            "shard command": storage.open_shard(str(shard), "cat {url}"),
        }
        for how, handle in opened.items():
            with handle as stream:
                assert stream.read() == expected, how
    finally:
        fsspec.filesystem("memory").rm(memory_root, recursive=True)


def test_manifests_are_read_from_a_url_split(tiny_shards, memory_shards):
    assert storage.is_file(f"{memory_shards}/train/manifest.json")
    assert not storage.is_file(f"{memory_shards}/train/missing.json")
    assert read_manifest(f"{memory_shards}/train") == read_manifest(tiny_shards / "train")
    with pytest.raises(ValueError, match="no manifest.json in memory://.*/nothing"):
        read_manifest(f"{memory_shards}/nothing")


def test_train_evaluate_and_predict_find_their_manifests_under_a_url_root(tiny_shards, memory_shards):
    from pipeline.inference.evaluate import split_manifest
    from pipeline.inference.predict import class_wnids
    from pipeline.train.driver import check_inputs  # imports Ray, does not start it

    config = load_config(overrides=[f"data.root={memory_shards}"])
    assert check_inputs(config)[0] == read_manifest(tiny_shards / "train")
    assert split_manifest(config, "test") == read_manifest(tiny_shards / "test")
    names = [f"class {index}" for index in range(4)]
    assert class_wnids(config, names) == [f"n{index:08d}" for index in range(4)]


@pytest.mark.parametrize("given", ["s3://bucket/shards", Path("s3://bucket/shards")])  # a Path collapses '//'
def test_writing_to_a_url_is_refused_with_the_upload_hint(given):
    with pytest.raises(ValueError, match=r"^--output = 's3://bucket/shards': only a local or NFS path .*aws s3 sync"):
        storage.require_local(given, "--output")


def test_shard_index_and_verify_refuse_urls_before_touching_anything(tmp_path):
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.verify import index_shards, verify_dataset

    with pytest.raises(ValueError, match="shard --output = 's3://b/x': only a local or NFS path"):
        shard_imagenet(tmp_path / "no-source", Path("s3://b/x"))
    with pytest.raises(ValueError, match="index folder = 'gs://b/x/train': only a local or NFS path"):
        index_shards(Path("gs://b/x/train"), "train")
    with pytest.raises(ValueError, match="verify folder = 's3://b/x': only a local or NFS path"):
        verify_dataset(Path("s3://b/x"))


# Run bookkeeping files beside the checkpoints (local paths and file:// URIs).


@pytest.fixture(params=["local", "file-uri"])
def storage_root(request, tmp_path):
    # Glob characters in a local path are taken literally; a URI cannot hold them unencoded (pyarrow, like Ray,
    # refuses to parse it), so there the run name below carries them only on local storage.
    return str(tmp_path / "st[1]") if request.param == "local" else f"file://{tmp_path}/st"


def test_a_small_file_is_written_read_and_removed(storage_root):
    note = storage.join(storage_root, "run", ".placement_group")
    assert not storage.is_file(note)
    storage.write_text(note, "abc123")  # parents created
    assert storage.is_file(note) and storage.read_text(note) == "abc123"
    storage.remove(note)
    assert not storage.is_file(note)
    storage.remove(note)  # already gone: no error


def test_checkpoint_names_are_listed_literally_and_sorted(storage_root):
    run = "a[1]" if "://" not in storage_root else "a-1"
    assert storage.checkpoint_names(storage_root, run) == []  # no run yet
    for name in ("checkpoint_2026-11-30_05-37-03", "checkpoint_2026-11-30_05-36-54", "other"):
        storage.write_text(storage.join(storage_root, run, name, "meta.json"), "{}")
    storage.write_text(storage.join(storage_root, "a1", "checkpoint_2026-12-01_00-00-00", "meta.json"), "{}")
    assert storage.checkpoint_names(storage_root, run) == [
        "checkpoint_2026-11-30_05-36-54",
        "checkpoint_2026-11-30_05-37-03",
    ]  # not "a1"'s, not "other"


def test_an_unusable_uri_is_one_line():
    with pytest.raises(ValueError, match="cannot use nope://x/y") as caught:
        storage.read_text("nope://x/y")
    assert "\n" not in str(caught.value)


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "run" / "state.pt"
    with storage.atomic_write(target) as handle:  # parents created
        handle.write(b"first")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_write(target) as handle:
            handle.write(b"second, half of it")
            raise RuntimeError("disk full")  # what a crash or a failed write does mid-file
    assert target.read_bytes() == b"first"  # the old file, never a half-written new one
    assert sorted(path.name for path in target.parent.iterdir()) == ["state.pt"]  # and no partial left behind
    storage.write_text(target, "third")
    assert target.read_text() == "third"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_bounded_read_refuses_an_oversized_file_without_reading_it_whole(tmp_path, where):
    import tracemalloc

    size = 64 << 20
    if where == "local":
        location = str(tmp_path / "planted.idx")
        with open(location, "wb") as handle:
            handle.truncate(size)  # sparse: 64 MiB that cost no disk
    else:
        location = f"memory://bounded-{tmp_path.name}/planted.idx"
        fsspec.filesystem("memory").pipe_file(location, bytes(size))
    tracemalloc.start()
    try:
        with pytest.raises(StorageError, match="planted.idx: larger than the 80 bytes expected"):
            storage.read_bytes(location, limit=80)
        peak = tracemalloc.get_traced_memory()[1]
        assert storage.read_bytes(location, limit=16, offset=size - 16) == bytes(16)  # a file's last bytes
    finally:
        tracemalloc.stop()
        if where == "memory":
            fsspec.filesystem("memory").rm(location)
    assert peak < 1 << 20  # read at most limit + 1 bytes, not 64 MiB
