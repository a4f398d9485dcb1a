"""The ray#54305 workaround frees exactly the placement group a trial noted, and never ends a sweep over a note."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline import storage
from pipeline.upstream import ray_54305

pytestmark = pytest.mark.ray


def _state(group_id: str) -> str | None:
    import ray

    return ray.util.placement_group_table().get(group_id, {}).get("state")


def test_a_noted_placement_group_is_removed_and_its_note_with_it(ray_session, tmp_path):
    import ray

    group = ray.util.placement_group([{"CPU": 0.01}])
    ray.get(group.ready(), timeout=60)
    note = ray_54305.note_location(str(tmp_path), "sweep-t1")
    storage.write_text(note, group.id.hex())
    ray_54305.release_placement_group(note)
    deadline = time.time() + 30
    while _state(group.id.hex()) != "REMOVED" and time.time() < deadline:
        time.sleep(0.1)
    assert _state(group.id.hex()) == "REMOVED"
    assert not storage.is_file(note)


def test_no_note_means_nothing_to_free_and_a_foreign_note_is_a_warning(ray_session, tmp_path, caplog):
    ray_54305.release_placement_group(ray_54305.note_location(str(tmp_path), "never-ran"))  # no note: no-op
    note = ray_54305.note_location(str(tmp_path), "sweep-t2")
    storage.write_text(note, "not a placement group id")
    with caplog.at_level(logging.WARNING, logger=ray_54305.__name__):
        ray_54305.release_placement_group(note)
    assert "holds no placement group id" in caplog.text
