"""The per-worker training function, run in this process with Ray Train's few calls stubbed out (no Ray)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import metrics as m
from pipeline.config import load_config
from pipeline.train import worker as train_loop


class FakeRayTrain:
    """Stands in for `ray.train.get_context/get_checkpoint/report` in a single-process run."""

    def __init__(self, checkpoint=None) -> None:
        self.checkpoint, self.reports = checkpoint, []

    def install(self, monkeypatch) -> None:
        import ray

        def refuse(*args, **kwargs):
            raise AssertionError("this test must not start Ray")

        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.setattr(ray.util, "get_current_placement_group", lambda: None)
        context = SimpleNamespace(
            get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0, get_node_rank=lambda: 0
        )
        monkeypatch.setattr(ray.train, "get_context", lambda: context)
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: self.checkpoint)
        monkeypatch.setattr(
            ray.train, "report", lambda metrics, checkpoint=None: self.reports.append((dict(metrics), checkpoint))
        )


def run_worker(monkeypatch, config, checkpoint_root: Path, val_top1: float, checkpoint=None) -> FakeRayTrain:
    fake = FakeRayTrain(checkpoint)
    fake.install(monkeypatch)
    # Validation stands still, so only the schedule decides the rate (the real evaluate is tested elsewhere).
    monkeypatch.setattr(
        train_loop,
        "evaluate",
        lambda model, loader, worker, prefix: {
            m.VAL_LOSS: 1.0,
            m.VAL_TOP1: val_top1,
            m.VAL_TOP5: 100.0,
            m.VAL_CORRUPT_SAMPLES: 0,
        },
    )
    train_loop.train_worker(
        {"config": config, "wiring": train_loop.RunWiring(local_checkpoint_root=str(checkpoint_root))}
    )
    return fake


def test_a_plateau_run_divides_the_logged_lr_and_a_resumed_run_keeps_counting(tiny_shards, tmp_path, monkeypatch):
    overrides = [
        f"data.root={tiny_shards}",
        "data.train_image_size=32",
        "data.eval_image_size=32",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "model.name=resnet18",
        "optim.batch_size=16",
        "optim.lr=0.4",
        "optim.schedule=plateau",
        "optim.plateau_patience=2",
        "scaling.num_workers=0",
    ]
    rate = 0.4 * 16 / 256
    # Epoch 1 sets the best; epochs 2 and 3 bring no gain, so epoch 4 trains at a tenth.
    first = run_worker(
        monkeypatch, load_config(overrides=[*overrides, "optim.epochs=4"]), tmp_path / "run", val_top1=50.0
    )
    logged = [metrics[m.TRAIN_LR] for metrics, _ in first.reports]
    assert logged == pytest.approx([rate, rate, rate, rate / 10])

    # Resuming from epoch 4's checkpoint: the scheduler remembers the best and epoch 4's flat result, so
    # epoch 5 (one more without a gain) divides again. A fresh scheduler would have kept rate / 10 for epoch 6.
    last_checkpoint = first.reports[-1][1]
    second = run_worker(
        monkeypatch,
        load_config(overrides=[*overrides, "optim.epochs=6"]),
        tmp_path / "run",
        val_top1=50.0,
        checkpoint=last_checkpoint,
    )
    assert [metrics[m.EPOCH] for metrics, _ in second.reports] == [5, 6]
    assert [metrics[m.TRAIN_LR] for metrics, _ in second.reports] == pytest.approx([rate / 10, rate / 100])


def test_two_epochs_straight_equal_one_epoch_then_a_resume_then_one_more(tiny_shards, tmp_path, monkeypatch):
    """Same weights bit for bit: the resumed run continues every random stream (dropout masks, crops) instead of
    re-seeding, so an interruption changes nothing."""
    import torch

    from pipeline.train.checkpoints import read_state

    overrides = _resume_run(tiny_shards)

    def final_weights(reports):
        with reports[-1][1].as_directory() as directory:
            return read_state(directory)["model"]

    straight = run_worker(
        monkeypatch, load_config(overrides=[*overrides, "optim.epochs=2"]), tmp_path / "straight", val_top1=50.0
    )
    first = run_worker(
        monkeypatch, load_config(overrides=[*overrides, "optim.epochs=1"]), tmp_path / "split", val_top1=50.0
    )
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed = run_worker(
        monkeypatch,
        load_config(overrides=[*overrides, "optim.epochs=2"]),
        tmp_path / "split",
        val_top1=50.0,
        checkpoint=first.reports[-1][1],
    )
    expected, got = final_weights(straight.reports), final_weights(resumed.reports)
    assert [metrics[m.EPOCH] for metrics, _ in resumed.reports] == [2]
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def _resume_run(shards) -> list[str]:
    """A tiny local-mode run whose dropout, shuffle and step schedule all draw randomness a resume must restore."""
    return [
        f"data.root={shards}",
        "data.train_image_size=32",
        "data.eval_image_size=32",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "model.name=resnet18",
        "model.dropout=0.5",
        "optim.batch_size=16",
        "optim.lr=0.4",
        "optim.schedule=step",
        "scaling.num_workers=0",
        "data.max_corrupt_fraction=1",
    ]


class Killed(Exception):
    """Stands for a SIGKILL right after a checkpoint was handed over."""


def test_a_run_killed_after_a_checkpoint_within_an_epoch_resumes_at_its_next_step(tiny_shards, tmp_path, monkeypatch):
    """tracking.checkpoint_every_steps: killed after step 1 of epoch 2, the resumed run trains steps 2 and 3 of
    epoch 2 on exactly the samples the uninterrupted run gave them, and ends with the same weights bit for bit and
    the same epoch-2 train loss (the epoch's sums so far travel in the checkpoint)."""
    import json

    import torch

    from pipeline.train.checkpoints import read_state

    config = load_config(overrides=[*_resume_run(tiny_shards), "optim.epochs=2", "tracking.checkpoint_every_steps=1"])

    def final_weights(reports):
        with reports[-1][1].as_directory() as directory:
            return read_state(directory)["model"]

    def steps_logged(path):
        return [(row["epoch"], row["step"], row["keys"]) for row in map(json.loads, path.read_text().splitlines())]

    monkeypatch.setenv("PIPELINE_SAMPLE_LOG", str(tmp_path / "straight.jsonl"))
    straight = run_worker(monkeypatch, config, tmp_path / "straight", val_top1=50.0)
    assert [metrics.get(m.STEP_IN_EPOCH) for metrics, _ in straight.reports] == [1, 2, None, 1, 2, None]
    # Local mode keeps no checkpoint history: a checkpoint within an epoch goes once a newer one is written.
    assert sorted(path.name for path in (tmp_path / "straight").iterdir()) == [
        "checkpoint_epoch_0001",
        "checkpoint_epoch_0002",
    ]

    monkeypatch.setenv("PIPELINE_SAMPLE_LOG", str(tmp_path / "split.jsonl"))
    killed = FakeRayTrain()
    killed.install(monkeypatch)
    monkeypatch.setattr(
        train_loop,
        "evaluate",
        lambda model, loader, worker, prefix: {
            m.VAL_LOSS: 1.0,
            m.VAL_TOP1: 50.0,
            m.VAL_TOP5: 100.0,
            m.VAL_CORRUPT_SAMPLES: 0,
        },
    )

    def report_then_die(metrics, checkpoint=None):
        killed.reports.append((dict(metrics), checkpoint))
        if metrics[m.EPOCH] == 1 and metrics.get(m.STEP_IN_EPOCH) == 1:
            raise Killed

    import ray

    monkeypatch.setattr(ray.train, "report", report_then_die)
    with pytest.raises(Killed):
        train_loop.train_worker(
            {"config": config, "wiring": train_loop.RunWiring(local_checkpoint_root=str(tmp_path / "split"))}
        )
    within = killed.reports[-1][1]
    assert Path(within.path).name == "checkpoint_epoch_0001_step_0000001"

    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed = run_worker(monkeypatch, config, tmp_path / "split", val_top1=50.0, checkpoint=within)
    assert [(metrics[m.EPOCH], metrics.get(m.STEP_IN_EPOCH)) for metrics, _ in resumed.reports] == [(1, 2), (2, None)]
    expected, got = final_weights(straight.reports), final_weights(resumed.reports)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert resumed.reports[-1][0][m.TRAIN_LOSS] == straight.reports[-1][0][m.TRAIN_LOSS]
    # Every step of epoch 2 once across the two attempts, on the uninterrupted run's samples.
    assert steps_logged(tmp_path / "split.jsonl") == steps_logged(tmp_path / "straight.jsonl")
