"""Run bookkeeping files on local storage and on storage URIs (pyarrow, the layer Ray Train writes through)."""

from __future__ import annotations

import pytest

from pipeline import run_storage


@pytest.fixture(params=["local", "file-uri"])
def storage(request, tmp_path):
    # Glob characters in a local path are taken literally; a URI cannot hold them unencoded (pyarrow, like Ray,
    # refuses to parse it), so there the run name below carries them only on local storage.
    return str(tmp_path / "st[1]") if request.param == "local" else f"file://{tmp_path}/st"


def test_a_small_file_is_written_read_and_removed(storage):
    note = run_storage.join(storage, "run", ".placement_group")
    assert not run_storage.exists(note)
    run_storage.write_text(note, "abc123")  # parents created
    assert run_storage.exists(note) and run_storage.read_text(note) == "abc123"
    run_storage.remove(note)
    assert not run_storage.exists(note)
    run_storage.remove(note)  # already gone: no error


def test_checkpoint_names_are_listed_literally_and_sorted(storage):
    run = "a[1]" if "://" not in storage else "a-1"
    assert run_storage.checkpoint_names(storage, run) == []  # no run yet
    for name in ("checkpoint_2026-11-30_05-37-03", "checkpoint_2026-11-30_05-36-54", "other"):
        run_storage.write_text(run_storage.join(storage, run, name, "meta.json"), "{}")
    run_storage.write_text(run_storage.join(storage, "a1", "checkpoint_2026-12-01_00-00-00", "meta.json"), "{}")
    assert run_storage.checkpoint_names(storage, run) == [
        "checkpoint_2026-11-30_05-36-54", "checkpoint_2026-11-30_05-37-03"]  # not "a1"'s, not "other"


def test_an_unusable_uri_is_one_line():
    with pytest.raises(ValueError, match="cannot use nope://x/y") as caught:
        run_storage.read_text("nope://x/y")
    assert "\n" not in str(caught.value)
