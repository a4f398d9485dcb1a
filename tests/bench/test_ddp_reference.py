"""The plain-PyTorch DDP baseline of `bench-train` (pipeline/bench/ddp_reference.py): it really trains, under
torchrun or in one process, and refuses a setup that would not be comparable. No timing is asserted."""

from __future__ import annotations

import pytest

from pipeline.bench import ddp_reference
from pipeline.bench.overhead import benchmark_overrides, run_reference
from pipeline.config import load_config
from pipeline.errors import BenchmarkError


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
    ("overrides", "named"),
    [
        (["scaling.use_gpu=true"], "scaling.use_gpu = True"),
        (["scaling.mixed_precision=bf16"], "mixed_precision = 'bf16': the reference is the CPU float32 baseline"),
    ],
)
def test_reference_refuses_a_gpu_or_reduced_precision_config(overrides, named):
    config = load_config(overrides=["scaling.num_workers=1", *overrides])
    with pytest.raises(BenchmarkError, match=named):
        ddp_reference.check_reference_config(config, world_size=1)
