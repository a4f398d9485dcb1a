"""Checkpoint checks: every damaged or planted form of a checkpoint's files is one CheckpointError line naming
the checkpoint and the problem, found before any of it is applied."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.train import checkpoint_checks as checks
from pipeline.train.checkpoints import STATE_FILE, load_checkpoint, read_meta
from tests.train.test_checkpoints import edit_state, write_checkpoint


def _resume(directory, steps_per_epoch=None):
    """What a resuming worker does with a checkpoint folder: its meta.json, then everything in state.pt."""
    read_meta(directory)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return load_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
        steps_per_epoch=steps_per_epoch,
    )


_DAMAGE = {
    "truncated state.pt": (
        lambda d: (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:700]),
        "state.pt is truncated or damaged, not a readable torch checkpoint",
    ),
    "empty state.pt": (lambda d: (d / STATE_FILE).write_bytes(b""), "state.pt is truncated or damaged"),
    "garbage state.pt": (
        lambda d: (d / STATE_FILE).write_bytes(b"\x80\x02" + bytes(range(256)) * 4),
        "state.pt is truncated or damaged",
    ),
    "missing state.pt": (lambda d: (d / STATE_FILE).unlink(), "state.pt is missing"),
    "missing meta.json": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text('{"model": "linear", '), "meta.json is not JSON"),
    "meta.json not an object": (
        lambda d: (d / "meta.json").write_text("[1, 2]"),
        "meta.json holds a JSON list, not an object",
    ),
    "meta.json without a key": (
        lambda d: (d / "meta.json").write_text('{"model": "linear"}'),
        "meta.json has no 'num_classes'",
    ),
    "meta.json wrong type": (
        lambda d: (d / "meta.json").write_text('{"model": "linear", "num_classes": "2"}'),
        r"meta.json has num_classes = '2', not a class count >= 1",
    ),
    "negative step_in_epoch": (
        lambda d: edit_state(d, step_in_epoch=-4),
        r"state.pt's training state has step_in_epoch = -4, not a count >= 0",
    ),
    "negative epoch": (
        lambda d: edit_state(d, epoch=-1),
        r"state.pt's training state has epoch = -1, not a count >= 0",
    ),
    "epoch as text": (lambda d: edit_state(d, epoch="2"), r"state.pt's training state has epoch = '2', not a count"),
    "history not metrics": (
        lambda d: edit_state(d, history=[{"epoch": "x"}]),
        "state.pt's training state has history = .*, not a list of per-epoch metrics",
    ),
    "no optimizer": (lambda d: edit_state(d, optimizer=None), r"state.pt has no optimizer \(each a mapping\)"),
    "wrong weights": (
        lambda d: edit_state(d, model={"weight": torch.zeros(5, 5), "bias": torch.zeros(5)}),
        r"state.pt does not load into this run \(RuntimeError: Error\(s\) in loading state_dict",
    ),
    "broken random streams": (
        lambda d: edit_state(d, rng={"python": 3}, rng_by_rank=[]),
        r"state.pt does not load into this run \((TypeError|KeyError): ",
    ),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_every_damaged_checkpoint_is_one_checkpoint_error_line_naming_the_folder_and_the_problem(tmp_path, damage):
    directory = tmp_path / "checkpoint_000003"
    write_checkpoint(directory)
    plant, problem = _DAMAGE[damage]
    plant(directory)
    with pytest.raises(CheckpointError, match=f"^checkpoint {directory}: {problem}") as caught:
        _resume(directory)
    assert "\n" not in str(caught.value)


def test_a_checkpoint_within_an_epoch_must_be_at_one_of_this_runs_steps(tmp_path):
    directory = tmp_path / "checkpoint_000004"
    write_checkpoint(directory)
    edit_state(directory, step_in_epoch=7, global_step=7, partial_epoch=[1.0, 2.0, 0.0])
    assert _resume(directory, steps_per_epoch=8).step_in_epoch == 7
    with pytest.raises(
        CheckpointError,
        match=f"checkpoint {directory}: taken at step 7 of an epoch, but this run's epochs have 5 steps",
    ):
        _resume(directory, steps_per_epoch=5)
    edit_state(directory, step_in_epoch=9, global_step=7)
    with pytest.raises(CheckpointError, match="step_in_epoch = 9, past global_step = 7"):
        _resume(directory, steps_per_epoch=10)


def test_a_json_file_larger_than_this_project_writes_is_refused_unread(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoint_000005"
    write_checkpoint(directory)
    monkeypatch.setattr(checks, "JSON_LIMIT", 64)  # the real limit (16 MiB) at a size a test writes quickly
    (directory / "meta.json").write_text('{"model": "linear", "num_classes": 2, "pad": "' + "x" * 64 + '"}')
    with pytest.raises(CheckpointError, match=f"^checkpoint {directory}: meta.json is larger than 0 MiB"):
        read_meta(directory)
    (directory / "meta.json").write_text('{"model": "linear", "num_classes": 2}')
    assert read_meta(directory)["num_classes"] == 2


def test_a_training_state_with_fields_this_project_never_saves_is_refused_naming_them():
    saved = {"epoch": 1, "global_step": 4, "history": [], "__class__": "os.system"}
    with pytest.raises(
        CheckpointError, match=r"^here: state.pt's training state is not one this project saves .*; has __class__\)$"
    ):
        checks.training_state(saved, "here")
    with pytest.raises(CheckpointError, match=r"needs epoch, global_step, history\)$"):
        checks.training_state({"epoch": 1}, "here")
    del saved["__class__"]
    assert checks.training_state(saved, "here") == saved


def test_a_state_file_must_hold_tensors_for_weights_and_a_mapping_for_each_part():
    parts = {"optimizer": {}, "scheduler": {}, "training_state": {}, "rng": {}}
    good = {"model": {"weight": torch.zeros(2)}, **parts}
    assert checks.state_payload(good, "here") is good
    with pytest.raises(CheckpointError, match=r"^here: state.pt's model weights are not all tensors$"):
        checks.state_payload({"model": {"weight": [0.0, 0.0]}, **parts}, "here")
    with pytest.raises(CheckpointError, match=r"^here: state.pt holds a list, not a checkpoint's state$"):
        checks.state_payload([good], "here")
