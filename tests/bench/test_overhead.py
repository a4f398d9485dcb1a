"""The overhead benchmark's parts: the torchrun DDP reference really trains, inputs are checked before any work,
and the steady-state figure is computed as documented. No timing is asserted (this is not a speed test); the full
benchmark starts Ray several times and runs for minutes, so it is run by hand
(`imagenet-pipeline bench-train --only overhead`).
"""

from __future__ import annotations

import pytest

from pipeline.bench import ddp_reference
from pipeline.bench.overhead import benchmark_overrides, run_overhead_benchmark, run_reference, steady_state
from pipeline.config import load_config


def write_reference_config(shards, tmp_path, num_workers: int, epochs: int = 1):
    """The benchmark's own overrides at test size: 32 px, batch 16, no DataLoader processes."""
    config = load_config(
        overrides=benchmark_overrides(
            shards,
            tmp_path / "store",
            model="resnet18",
            image_size=32,
            global_batch=16,
            epochs=epochs,
            num_workers=num_workers,
            loader_workers=0,
            run_name="test",
        )
    )
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    return path


@pytest.mark.slow
def test_torchrun_reference_trains_an_epoch_on_two_ranks_and_reports_images_per_second(learnable_shards, tmp_path):
    config_file = write_reference_config(learnable_shards, tmp_path, num_workers=2)
    figures = run_reference(config_file, num_workers=2, output=tmp_path / "reference.json")
    assert figures["world_size"] == 2 and figures["per_worker_batch_size"] == 8
    (epoch,) = figures["epochs"]
    assert epoch["images"] == figures["steps_per_epoch"] * 16 == 80  # 80 train samples: 5 global batches
    assert epoch["images_per_second"] == pytest.approx(epoch["images"] / epoch["seconds"])
    assert epoch["images_per_second"] > 0 and 0 <= epoch["data_wait_share"] < 1


def test_reference_runs_in_one_process_when_the_config_has_one_worker(learnable_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config_file = write_reference_config(learnable_shards, tmp_path, num_workers=1, epochs=2)
    figures = ddp_reference.main(["--config", str(config_file), "--output", str(tmp_path / "out.json")])
    assert [epoch["epoch"] for epoch in figures["epochs"]] == [1, 2]
    assert all(epoch["images"] == 80 and epoch["images_per_second"] > 0 for epoch in figures["epochs"])
    assert (tmp_path / "out.json").is_file()


def test_reference_refuses_a_process_count_other_than_the_configs_workers(learnable_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process, as plain `python -m` starts it
    config_file = write_reference_config(learnable_shards, tmp_path, num_workers=2)
    with pytest.raises(ValueError, match="scaling.num_workers = 2 .* --nproc_per_node 2"):
        ddp_reference.main(["--config", str(config_file)])


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"model": "vgg16"}, "model = 'vgg16'"),
        ({"image_size": 8}, "image_size = 8"),
        ({"model": "alexnet", "image_size": 32}, "image_size = 32: alexnet needs at least 63"),
        ({"global_batch": 31}, "global_batch = 31 is not divisible by num_workers = 2"),
        ({"global_batch": 0}, "global_batch = 0"),
        ({"num_workers": 0}, "num_workers = 0"),
        ({"train_images": 16}, "train_images = 16 must be at least global_batch = 32"),
        ({"loader_workers": -1}, "loader_workers = -1"),
        ({"rounds": 0}, "rounds = 0"),
        ({"rounds": 2}, "--rounds 2: at least 3 interleaved rounds"),
        ({"epochs": 2, "warmup_epochs": 2}, "warmup_epochs = 2 must be >= 0 and below epochs = 2"),
    ],
)
def test_overhead_benchmark_rejects_bad_arguments_before_any_work(arguments, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        run_overhead_benchmark(tmp_path / "work", **arguments)
    assert not (tmp_path / "work").exists()


def test_the_steady_state_length_is_counted_per_run():
    from pipeline.bench.overhead import side_steady_seconds

    assert side_steady_seconds({"epoch_images_per_second": [50.0, 100.0, 200.0]}, 1, 2000) == pytest.approx(30.0)


def test_steady_state_drops_warmup_epochs_and_weights_epochs_by_time():
    assert steady_state([5.0, 20.0, 20.0], warmup_epochs=1) == pytest.approx(20.0)
    # Equal images per epoch: 10 and 30 images/s take 3 and 1 time units for 30 images each, 60 / 4 = 15.
    assert steady_state([99.0, 10.0, 30.0], warmup_epochs=1) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="warmup_epochs = 2 leaves none of 2 epochs"):
        steady_state([1.0, 2.0], warmup_epochs=2)
