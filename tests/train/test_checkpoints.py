"""Checkpoint contents and where they are read from: local disk, NFS, or a storage URI."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.checkpoints import (
    STATE_FILE,
    TrainingState,
    load_weights,
    local_checkpoint,
    read_meta,
    save_checkpoint,
)


def write_checkpoint(directory, seed: int = 0, epoch: int = 2, exist_ok: bool = False):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    directory.mkdir(parents=True, exist_ok=exist_ok)
    save_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        state=TrainingState(epoch=epoch),
        meta={"model": "linear", "num_classes": 2},
    )
    return model


def test_a_local_checkpoint_directory_is_used_in_place(tmp_path):
    model = write_checkpoint(tmp_path / "checkpoint_000001")
    with local_checkpoint(str(tmp_path / "checkpoint_000001"), storage_path=str(tmp_path)) as directory:
        assert directory == tmp_path / "checkpoint_000001"
        restored = load_weights(directory, torch.nn.Linear(3, 2))
    assert torch.equal(restored.weight, model.weight)


def test_a_checkpoint_uri_is_read_through_rays_filesystem_layer(tmp_path):
    model = write_checkpoint(tmp_path / "run" / "checkpoint_000002", seed=1)
    uri = f"file://{tmp_path}/run/checkpoint_000002"  # what s3:// and gs:// go through, minus the network
    with local_checkpoint(uri, storage_path=f"file://{tmp_path}") as directory:
        assert (directory / STATE_FILE).is_file() and read_meta(directory)["num_classes"] == 2
        restored = load_weights(directory, torch.nn.Linear(3, 2))
    assert torch.equal(restored.weight, model.weight)


def test_a_missing_local_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_000009': no such directory"):
        with local_checkpoint(str(tmp_path / "checkpoint_000009"), storage_path=str(tmp_path)):
            pass


def test_a_path_ray_reported_for_uri_storage_gets_the_storages_scheme():
    from pipeline.train.checkpoints import checkpoint_uri

    assert checkpoint_uri("bucket/run/checkpoint_1", "s3://bucket/results") == "s3://bucket/run/checkpoint_1"
    assert checkpoint_uri("/mnt/x/run/checkpoint_1", "file:///mnt/x") == "file:///mnt/x/run/checkpoint_1"
    assert checkpoint_uri("gs://b/run/checkpoint_1", "gs://b") == "gs://b/run/checkpoint_1"
    assert checkpoint_uri("/nfs/run/checkpoint_1", "/nfs") == "/nfs/run/checkpoint_1"


@pytest.mark.parametrize("as_url", [False, True], ids=["local", "file-url"])
def test_the_latest_checkpoint_of_a_run_is_found_on_any_storage(tmp_path, as_url):
    from pipeline.train.checkpoints import latest_run_checkpoint

    storage = f"file://{tmp_path}" if as_url else str(tmp_path)
    assert latest_run_checkpoint(storage, "r1") is None
    for stamp in ("2026-11-30_05-36-54.789035", "2026-11-30_05-37-03.304209", "2026-11-30_05-36-59.000001"):
        write_checkpoint(tmp_path / "r1" / f"checkpoint_{stamp}")
    latest = latest_run_checkpoint(storage, "r1")
    assert latest == f"{storage}/r1/checkpoint_2026-11-30_05-37-03.304209"  # Ray names them by time
    assert read_meta(latest)["model"] == "linear"


def test_a_resume_of_another_architecture_is_refused_on_uri_storage_too(tmp_path, tiny_shards):
    from pipeline.config import ConfigError, load_config
    from pipeline.data.manifest import read_manifest
    from pipeline.train.driver import check_resume_compatible

    write_checkpoint(tmp_path / "r2" / "checkpoint_2026-11-30_05-36-54.789035")  # meta: model "linear"
    config = load_config(overrides=[f"data.root={tiny_shards}"])
    with pytest.raises(ConfigError, match="holds a linear checkpoint with 2 classes, but the config asks for resnet18"):
        check_resume_compatible(f"file://{tmp_path}", "r2", config, read_manifest(tiny_shards / "train"))


class _Payload:
    """What an attacker with write access to checkpoint storage would plant: code that runs when unpickled."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("reader", ["read_state", "load_weights", "load_checkpoint"])
def test_a_checkpoint_with_a_pickle_payload_is_refused_and_the_payload_never_runs(tmp_path, reader):
    from pipeline.train import checkpoints

    write_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    payload = torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)
    payload["training_state"]["history"] = [_Payload(marker)]
    torch.save(payload, tmp_path / "ckpt" / STATE_FILE)
    calls = {
        "read_state": lambda: checkpoints.read_state(tmp_path / "ckpt"),
        "load_weights": lambda: checkpoints.load_weights(tmp_path / "ckpt", torch.nn.Linear(3, 2)),
        "load_checkpoint": lambda: checkpoints.load_checkpoint(tmp_path / "ckpt", model=torch.nn.Linear(3, 2)),
    }
    with pytest.raises(checkpoints.CheckpointError, match="refused: it needs full unpickling.*can run code"):
        calls[reader]()
    assert not marker.exists()


def test_every_rng_stream_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from pipeline.train.checkpoints import load_checkpoint

    write_checkpoint(tmp_path / "ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123), np.random.seed(123), torch.manual_seed(123)  # disturb every stream
    load_checkpoint(tmp_path / "ckpt", model=torch.nn.Linear(3, 2))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _epoch_checkpoint(root, stamp, epoch, top1s, stopped_early=False):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = [{"epoch": index + 1, "val/top1": top1} for index, top1 in enumerate(top1s[:epoch])]
    directory = root / f"checkpoint_{stamp}"
    directory.mkdir(parents=True)
    save_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
        scaler=None,
        state=TrainingState(epoch=epoch, history=history),
        meta={"model": "linear", "num_classes": 2},
        stopped_early=stopped_early,
    )
    return directory


@pytest.mark.parametrize("as_url", [False, True], ids=["local", "file-url"])
def test_a_runs_record_is_its_newest_history_and_the_kept_checkpoint_of_each_epoch(tmp_path, as_url):
    from pipeline.train.checkpoints import read_run_record

    storage = f"file://{tmp_path}" if as_url else str(tmp_path)
    top1s = [35.0, 64.5, 56.5]
    # Ray kept epochs 2 and 3 (num_to_keep=2 by score deleted epoch 1); epoch 3 was reported twice (a resumed
    # trial that had already finished reports its end again), and a half-written checkpoint has no meta.json.
    _epoch_checkpoint(tmp_path / "s-t1", "2026-12-04_01-00-02.000000", 2, top1s)
    first = _epoch_checkpoint(tmp_path / "s-t1", "2026-12-04_01-00-03.000000", 3, top1s)
    _epoch_checkpoint(tmp_path / "s-t1", "2026-12-04_01-09-00.000000", 3, top1s)
    (_epoch_checkpoint(tmp_path / "s-t1", "2026-12-04_01-09-30.000000", 4, top1s + [99.0]) / "meta.json").unlink()
    record = read_run_record(storage, "s-t1")
    assert [row["epoch"] for row in record.history] == [1, 2, 3] and record.epochs == 3
    assert set(record.checkpoints) == {2, 3}
    assert record.checkpoints[3] == f"{storage}/s-t1/{first.name}"
    row, checkpoint = record.best_kept("val/top1")
    assert row == {"epoch": 2, "val/top1": 64.5} and checkpoint.endswith("checkpoint_2026-12-04_01-00-02.000000")
    assert record.finished(3) and not record.finished(4) and not record.stopped_early
    assert read_run_record(storage, "no-such-run") is None


def test_an_early_stop_is_recorded_and_an_older_checkpoint_reads_from_its_state(tmp_path):
    from pipeline.train.checkpoints import PROGRESS_FILE, read_run_record

    _epoch_checkpoint(tmp_path / "s-t2", "2026-12-04_01-00-01.000000", 2, [50.0, 40.0], stopped_early=True)
    assert read_run_record(str(tmp_path), "s-t2").finished(10)
    older = _epoch_checkpoint(tmp_path / "s-t3", "2026-12-04_01-00-01.000000", 2, [50.0, 40.0])
    (older / PROGRESS_FILE).unlink()  # written before progress.json existed
    record = read_run_record(str(tmp_path), "s-t3")
    # Epoch 1 scored better, but only epoch 2's checkpoint is left: the best *kept* epoch is what can be published.
    assert record.epochs == 2 and record.best_kept("val/top1")[0] == {"epoch": 2, "val/top1": 40.0}


@pytest.mark.parametrize(
    "text",
    [
        '{"epoch": "3", "history": [], "stopped_early": false}',
        '{"epoch": 1, "history": [{"epoch": "__import__"}], "stopped_early": false}',
        "[1, 2]",
        "not json",
    ],
)
def test_a_malformed_progress_record_is_refused_naming_the_file(tmp_path, text):
    from pipeline.errors import CheckpointError
    from pipeline.train.checkpoints import PROGRESS_FILE, read_run_record

    directory = _epoch_checkpoint(tmp_path / "s-t4", "2026-12-04_01-00-01.000000", 1, [50.0])
    (directory / PROGRESS_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=r"checkpoint .*progress\.json: not a progress record"):
        read_run_record(str(tmp_path), "s-t4")


def test_a_checkpoint_is_written_file_by_file_whole_with_meta_json_last(tmp_path, monkeypatch):
    import os

    from pipeline import storage
    from pipeline.train.checkpoints import META_FILE, PROGRESS_FILE, latest_run_checkpoint

    renamed = []
    original = os.replace
    monkeypatch.setattr(
        os, "replace", lambda source, target: renamed.append(os.path.basename(target)) or original(source, target)
    )
    directory = tmp_path / "r" / "checkpoint_epoch_0002"
    write_checkpoint(directory)
    assert renamed == [STATE_FILE, PROGRESS_FILE, META_FILE]  # each written whole, meta.json (completeness) last
    good = (directory / STATE_FILE).read_bytes()

    # Local mode rewrites an epoch's folder: killed while writing state.pt, it leaves the old state.pt whole and
    # no meta.json, so the folder no longer counts as a checkpoint rather than pairing old and new files.
    def killed(payload, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(directory, exist_ok=True)
    assert (directory / STATE_FILE).read_bytes() == good and not (directory / META_FILE).exists()
    assert not list(directory.glob("*.partial")) and latest_run_checkpoint(str(tmp_path), "r") is None
    assert storage.checkpoint_names(str(tmp_path), "r") == ["checkpoint_epoch_0002"]


def edit_state(directory, **changes):
    """Rewrite state.pt with training-state fields or top-level parts changed (None: a part removed)."""
    payload = torch.load(directory / STATE_FILE, weights_only=True)
    for key, value in changes.items():
        if key in payload["training_state"]:
            payload["training_state"][key] = value
        elif value is None:
            del payload[key]
        else:
            payload[key] = value
    torch.save(payload, directory / STATE_FILE)


def _run_of_three(tmp_path):
    """A run folder with the checkpoints of epochs 1, 2 and 3 (Ray's names: by the time they were written)."""
    models = {}
    for epoch in (1, 2, 3):
        directory = tmp_path / "r" / f"checkpoint_2026-12-04_01-00-0{epoch}.000000"
        models[epoch] = write_checkpoint(directory, seed=epoch, epoch=epoch)
    return [tmp_path / "r" / f"checkpoint_2026-12-04_01-00-0{epoch}.000000" for epoch in (1, 2, 3)], models


def test_a_resume_whose_latest_checkpoint_is_damaged_continues_from_the_newest_sound_one(tmp_path):
    from pipeline.train.checkpoints import load_checkpoint, restore_newest_sound

    (first, second, latest), models = _run_of_three(tmp_path)
    (latest / STATE_FILE).write_bytes((latest / STATE_FILE).read_bytes()[:500])  # a copy cut short
    (tmp_path / "r" / "checkpoint_2026-12-04_01-00-09.000000").mkdir()  # newer, never completed: not a candidate
    model = torch.nn.Linear(3, 2)

    def restore(directory):
        read_meta(directory)
        return load_checkpoint(directory, model=model)

    state, used, problem = restore_newest_sound(str(latest), str(tmp_path), restore)
    assert used == str(second) and state.epoch == 2 and torch.equal(model.weight, models[2].weight)
    assert problem.startswith(f"checkpoint {latest}: state.pt is truncated or damaged") and "\n" not in problem

    (second / "meta.json").write_text("{")  # the one before is damaged too: the next older one
    state, used, _ = restore_newest_sound(str(latest), str(tmp_path), restore)
    assert used == str(first) and state.epoch == 1 and torch.equal(model.weight, models[1].weight)


def test_a_resume_with_no_sound_checkpoint_left_stops_with_the_latests_problem(tmp_path):
    from pipeline.errors import CheckpointError
    from pipeline.train.checkpoints import load_checkpoint, restore_newest_sound

    checkpoints, _ = _run_of_three(tmp_path)
    for directory in checkpoints:
        (directory / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"^checkpoint {checkpoints[-1]}: state.pt is missing"):
        restore_newest_sound(
            str(checkpoints[-1]), str(tmp_path), lambda d: load_checkpoint(d, model=torch.nn.Linear(3, 2))
        )


def test_a_workers_resume_says_once_that_it_passed_over_a_damaged_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import ray.train

    from pipeline.config import load_config
    from pipeline.train import worker
    from pipeline.train.step import Trainee

    (_, second, latest), models = _run_of_three(tmp_path)
    for directory in (second, latest):  # meta.json as a training run writes it
        (directory / "meta.json").write_text('{"model": "resnet18", "num_classes": 2, "manifest_hash": "x"}')
    edit_state(latest, step_in_epoch=-1)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(latest)))
    lines = []
    log = SimpleNamespace(
        info=lambda line: lines.append(("info", line)), warning=lambda line: lines.append(("warning", line))
    )
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainee = Trainee(
        model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), torch.amp.GradScaler("cpu", enabled=False)
    )
    config = load_config(overrides=[f"tracking.storage_path={tmp_path}"])
    worker.restore(trainee, config, 2, 10, SimpleNamespace(rank=0, world_size=1), log)
    assert trainee.state.epoch == 2 and torch.equal(model.weight, models[2].weight)
    assert lines == [
        (
            "warning",
            f"checkpoint {latest}: state.pt's training state has step_in_epoch = -1, not a "
            f"count >= 0; resuming from the checkpoint before it, {second}",
        ),
        ("info", f"resumed from {second} after epoch 2"),
    ]


def test_the_driver_checks_a_resume_against_the_newest_sound_checkpoint(tmp_path):
    from pipeline.train.checkpoints import latest_run_checkpoint

    (_, second, latest), _ = _run_of_three(tmp_path)
    (latest / "meta.json").write_text('{"model": 3}')
    assert latest_run_checkpoint(str(tmp_path), "r") == str(second)
    (second / "progress.json").write_text('{"epoch": -2, "history": [], "stopped_early": false}')
    assert latest_run_checkpoint(str(tmp_path), "r").endswith("checkpoint_2026-12-04_01-00-01.000000")
