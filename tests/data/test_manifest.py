"""The manifest as untrusted input: shard entries are plain file names, a `pipe:` entry never runs, and a manifest
of the wrong shape is one line naming the file and the entry."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.data.loader import build_loader
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError
from tests.conftest import write_split


def rewrite(split_dir, change) -> None:
    path = split_dir / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_pipe_entry_is_refused_and_never_runs_in_any_reader(tmp_path):
    marker = tmp_path / "payload-ran"
    split = tmp_path / "shards" / "val"
    write_split(split, [4])
    rewrite(split, lambda data: data["shards"][0].update(name=f"pipe:touch {marker}"))
    with pytest.raises(DataError, match=r"manifest\.json: shard entry 'pipe:touch .*' is a pipe: command"):
        read_manifest(split)
    config = load_config(overrides=[f"data.root={tmp_path / 'shards'}", "data.loader_workers=0"])
    with pytest.raises(DataError, match="never run"):
        build_loader(config.data, "val", rank=0, world_size=1, batch_size=2, seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../train/train-000000.tar", "/etc/passwd", "sub/val-000000.tar", "..", "~x.tar"])
def test_an_entry_outside_its_split_folder_is_refused(tmp_path, name):
    write_split(tmp_path / "val", [4])
    rewrite(tmp_path / "val", lambda data: data["shards"][0].update(name=name))
    with pytest.raises(DataError, match="is not a plain file name in its split folder") as caught:
        read_manifest(tmp_path / "val")
    assert "\n" not in str(caught.value)


def test_a_url_entry_needs_the_users_own_allowance(tmp_path):
    write_split(tmp_path / "val", [4])
    rewrite(tmp_path / "val", lambda data: data["shards"][0].update(name="s3://elsewhere/val-000000.tar"))
    with pytest.raises(DataError, match=r"s3:// URL, and data\.shard_url_schemes = \[\] does not allow it"):
        read_manifest(tmp_path / "val")
    assert read_manifest(tmp_path / "val", ["s3"]).shards[0].name == "s3://elsewhere/val-000000.tar"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda data: data.pop("classes"), r"has no 'classes' entry"),
        (lambda data: data.update(classes={"a": 1}), r"'classes' must be a JSON list, not dict"),
        (lambda data: data.update(shards="val-000000.tar"), r"'shards' must be a JSON list, not str"),
        (lambda data: data["shards"][0].update(num_samples=None, extra=1), r"an entry has the wrong JSON type"),
        (lambda data: data.update(converted_files="many"), r"'converted_files' must be a count of files"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_one_line(tmp_path, change, message):
    write_split(tmp_path / "val", [4])
    rewrite(tmp_path / "val", change)
    with pytest.raises(DataError, match=message) as caught:
        read_manifest(tmp_path / "val")
    assert "manifest.json" in str(caught.value) and "\n" not in str(caught.value)


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    write_split(tmp_path / "val", [4])
    (tmp_path / "val" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="a manifest is a JSON object, not list"):
        read_manifest(tmp_path / "val")


def test_a_manifest_with_per_file_records_reads_as_counts(tmp_path):
    """Manifests written before counts listed every skipped and converted file; they still load."""
    write_split(tmp_path / "val", [4])

    def as_before(data):
        del data["skipped_files"], data["converted_files"]
        data.update(
            skipped=[{"file": "a.JPEG", "reason": "cannot be decoded"}],
            converted=[{"file": f"{n}.JPEG", "reason": "resized"} for n in range(3)],
        )

    rewrite(tmp_path / "val", as_before)
    manifest = read_manifest(tmp_path / "val")
    assert (manifest.skipped_files, manifest.converted_files) == (1, 3)
