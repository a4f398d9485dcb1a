"""Workaround for ray#54305: Ray 2.60 can keep a Ray Train placement group reserved after its Tune trial ends.

https://github.com/ray-project/ray/issues/54305 — the next trials then wait for CPUs that never come back. Rank 0
of each trial notes its worker group's placement group id beside the run's checkpoints; the sweep driver's Tune
callback removes that group when Tune reports the trial finished or failed. This is the only module that touches
private Ray APIs (`ray._raylet.PlacementGroupID`); when Ray fixes the bug, delete this file and its two uses
(`pipeline.train.worker` records, `pipeline.tune.search` releases).
"""

from __future__ import annotations

import logging

from pipeline import storage
from pipeline.errors import StorageError

NOTE_NAME = ".placement_group"
_log = logging.getLogger(__name__)


def note_location(storage_root: str, run_name: str) -> str:
    """Where rank 0 notes its placement group id, on the run's storage."""
    return storage.join(storage_root, run_name, NOTE_NAME)


def record_placement_group(rank: int, note: str | None) -> None:
    """On rank 0 of a trial's worker group: write the group's id where the sweep driver can release it."""
    import ray

    group = ray.util.get_current_placement_group()
    if rank != 0 or not note or group is None:
        return
    try:
        storage.write_text(note, group.id.hex())
    except StorageError as error:  # bookkeeping: a storage hiccup must not fail the training run
        _log.warning("placement group id not recorded (%s); the sweep cannot free it", error)


def release_placement_group(note: str) -> None:
    """Remove the placement group noted at `note`, if it is still reserved; the note is removed either way."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    try:
        if not storage.is_file(note):
            return
        group_id = storage.read_text(note).strip()
        storage.remove(note)
    except StorageError as error:  # bookkeeping: a storage hiccup must not end the sweep
        _log.warning("placement group not freed (%s)", error)
        return
    try:
        placement_group_id = PlacementGroupID(bytes.fromhex(group_id))
    except ValueError:  # not an id this module wrote: nothing of ours to free
        _log.warning("placement group not freed (%s holds no placement group id)", note)
        return
    state = ray.util.placement_group_table().get(group_id, {}).get("state")
    if state not in (None, "REMOVED"):
        ray.util.remove_placement_group(PlacementGroup(placement_group_id))


def release_callback(storage_root: str, sweep_name: str):
    """A Tune callback freeing each finished or failed trial's group (trial runs are `<sweep>-<trial id>`)."""
    from ray import tune

    class ReleaseTrialPlacementGroups(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            release_placement_group(note_location(storage_root, f"{sweep_name}-{trial.trial_id}"))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            release_placement_group(note_location(storage_root, f"{sweep_name}-{trial.trial_id}"))

    return ReleaseTrialPlacementGroups()
