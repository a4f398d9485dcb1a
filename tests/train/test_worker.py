"""The per-worker training function, run in this process with Ray Train's few calls stubbed out (no Ray)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import metrics as m
from pipeline.train import worker as train_loop
from pipeline.config import load_config


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
        context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0,
                                  get_node_rank=lambda: 0)
        monkeypatch.setattr(ray.train, "get_context", lambda: context)
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: self.checkpoint)
        monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: self.reports.append(
            (dict(metrics), checkpoint)))


def run_worker(monkeypatch, config, checkpoint_root: Path, val_top1: float, checkpoint=None) -> FakeRayTrain:
    fake = FakeRayTrain(checkpoint)
    fake.install(monkeypatch)
    # Validation stands still, so only the schedule decides the rate (the real evaluate is tested elsewhere).
    monkeypatch.setattr(train_loop, "evaluate", lambda model, loader, worker, prefix: {
        m.VAL_LOSS: 1.0, m.VAL_TOP1: val_top1, m.VAL_TOP5: 100.0, m.VAL_CORRUPT_SAMPLES: 0})
    train_loop.train_worker({"config": config, "wiring": train_loop.RunWiring(local_checkpoint_root=str(checkpoint_root))})
    return fake


def test_a_plateau_run_divides_the_logged_lr_and_a_resumed_run_keeps_counting(tiny_shards, tmp_path, monkeypatch):
    overrides = [
        f"data.root={tiny_shards}", "data.train_image_size=32", "data.eval_image_size=32", "data.loader_workers=0",
        "data.shuffle_buffer=16", "model.name=resnet18", "optim.batch_size=16", "optim.lr=0.4",
        "optim.schedule=plateau", "optim.plateau_patience=2", "scaling.num_workers=0",
    ]
    rate = 0.4 * 16 / 256
    # Epoch 1 sets the best; epochs 2 and 3 bring no gain, so epoch 4 trains at a tenth.
    first = run_worker(monkeypatch, load_config(overrides=[*overrides, "optim.epochs=4"]), tmp_path / "run",
                       val_top1=50.0)
    logged = [metrics[m.TRAIN_LR] for metrics, _ in first.reports]
    assert logged == pytest.approx([rate, rate, rate, rate / 10])

    # Resuming from epoch 4's checkpoint: the scheduler remembers the best and epoch 4's flat result, so
    # epoch 5 (one more without a gain) divides again. A fresh scheduler would have kept rate / 10 for epoch 6.
    last_checkpoint = first.reports[-1][1]
    second = run_worker(monkeypatch, load_config(overrides=[*overrides, "optim.epochs=6"]), tmp_path / "run",
                        val_top1=50.0, checkpoint=last_checkpoint)
    assert [metrics[m.EPOCH] for metrics, _ in second.reports] == [5, 6]
    assert [metrics[m.TRAIN_LR] for metrics, _ in second.reports] == pytest.approx([rate / 10, rate / 100])


def test_two_epochs_straight_equal_one_epoch_then_a_resume_then_one_more(tiny_shards, tmp_path, monkeypatch):
    """Same weights bit for bit: the resumed run continues every random stream (dropout masks, crops) instead of
    re-seeding, so an interruption changes nothing."""
    import torch

    from pipeline.train.checkpoints import read_state

    overrides = [
        f"data.root={tiny_shards}", "data.train_image_size=32", "data.eval_image_size=32", "data.loader_workers=0",
        "data.shuffle_buffer=16", "model.name=resnet18", "model.dropout=0.5", "optim.batch_size=16",
        "optim.lr=0.4", "optim.schedule=step", "scaling.num_workers=0", "data.max_corrupt_fraction=1",
    ]

    def final_weights(reports):
        with reports[-1][1].as_directory() as directory:
            return read_state(directory)["model"]

    straight = run_worker(monkeypatch, load_config(overrides=[*overrides, "optim.epochs=2"]), tmp_path / "straight",
                          val_top1=50.0)
    first = run_worker(monkeypatch, load_config(overrides=[*overrides, "optim.epochs=1"]), tmp_path / "split",
                       val_top1=50.0)
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed = run_worker(monkeypatch, load_config(overrides=[*overrides, "optim.epochs=2"]), tmp_path / "split",
                         val_top1=50.0, checkpoint=first.reports[-1][1])
    expected, got = final_weights(straight.reports), final_weights(resumed.reports)
    assert [metrics[m.EPOCH] for metrics, _ in resumed.reports] == [2]
    assert all(torch.equal(expected[key], got[key]) for key in expected)
