"""The training benchmarks' parts: the torchrun DDP reference really trains, inputs are checked before any work,
and the figures are computed as documented. No timing is asserted (this is not a speed test); the full
benchmarks start Ray several times and run for minutes, so they are run by hand (`imagenet-pipeline bench-train`).
"""

from __future__ import annotations

import pytest

from pipeline import ddp_reference
from pipeline.benchmark_train import (
    OUTPUT_EVENTS, benchmark_overrides, controller_events, run_overhead_benchmark, run_reference,
    run_startup_benchmark, startup_phases, steady_state, timeline_from_lines,
)
from pipeline.config import load_config


def write_reference_config(shards, tmp_path, num_workers: int, epochs: int = 1):
    """The benchmark's own overrides at test size: 32 px, batch 16, no DataLoader processes."""
    config = load_config(overrides=benchmark_overrides(
        shards, tmp_path / "store", model="resnet18", image_size=32, global_batch=16, epochs=epochs,
        num_workers=num_workers, loader_workers=0, run_name="test"))
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


@pytest.mark.parametrize(("arguments", "named"), [
    ({"model": "vgg16"}, "model = 'vgg16'"),
    ({"image_size": 8}, "image_size = 8"),
    ({"model": "alexnet", "image_size": 32}, "image_size = 32: alexnet needs at least 63"),
    ({"global_batch": 31}, "global_batch = 31 is not divisible by num_workers = 2"),
    ({"global_batch": 0}, "global_batch = 0"),
    ({"num_workers": 0}, "num_workers = 0"),
    ({"train_images": 16}, "train_images = 16 must be at least global_batch = 32"),
    ({"loader_workers": -1}, "loader_workers = -1"),
    ({"rounds": 0}, "rounds = 0"),
    ({"epochs": 2, "warmup_epochs": 2}, "warmup_epochs = 2 must be >= 0 and below epochs = 2"),
])
def test_overhead_benchmark_rejects_bad_arguments_before_any_work(arguments, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        run_overhead_benchmark(tmp_path / "work", **arguments)
    assert not (tmp_path / "work").exists()


def test_startup_benchmark_rejects_bad_arguments_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="global_batch = 15 is not divisible by num_workers = 2"):
        run_startup_benchmark(tmp_path / "work", global_batch=15)
    with pytest.raises(ValueError, match="timeout_seconds = 0"):
        run_startup_benchmark(tmp_path / "work", timeout_seconds=0)
    assert not (tmp_path / "work").exists()


def test_steady_state_drops_warmup_epochs_and_weights_epochs_by_time():
    assert steady_state([5.0, 20.0, 20.0], warmup_epochs=1) == pytest.approx(20.0)
    # Equal images per epoch: 10 and 30 images/s take 3 and 1 time units for 30 images each, 60 / 4 = 15.
    assert steady_state([99.0, 10.0, 30.0], warmup_epochs=1) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="warmup_epochs = 2 leaves none of 2 epochs"):
        steady_state([1.0, 2.0], warmup_epochs=2)


def test_startup_timeline_finds_each_event_in_the_jobs_output_and_orders_the_phases():
    lines = [
        (1.5, "# resolved config"),
        (4.0, "2026-01-01 00:00:00,000\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard"),
        (5.0, "MLflow run 0123abcd (new) in sqlite:////tmp/mlflow.db; Ray run 'x' in /tmp/ray"),
        (12.0, "\x1b[36m(RayTrainWorker pid=7)\x1b[0m [rank 0] world size 2, device cpu, global batch 16"),
        (12.5, "\x1b[36m(RayTrainWorker pid=8)\x1b[0m [rank 0] world size 2, device cpu (a repeat is ignored)"),
        # Forwarded at 13.9 s, but the line carries rank 0's own clock: 12.75 s after the start.
        (13.9, "\x1b[36m(RayTrainWorker pid=7)\x1b[0m [rank 0] first training step finished at unix time 1000012.75"),
        (20.0, "run 'x' finished in 18 s; best epoch 1: val top-1 50.00 %"),
    ]
    events = timeline_from_lines(lines, started=1_000_000.0)
    assert events == pytest.approx({"config_printed": 1.5, "ray_started": 4.0, "mlflow_run_ready": 5.0,
                                    "loop_ready": 12.0, "first_step": 12.75, "finished_line": 20.0})
    assert set(events) == {name for name, _ in OUTPUT_EVENTS} | {"first_step"}
    events.update(epoch1_logged=14.0, publish_started=15.0, model_registered=19.0, exit=21.0)
    phases = startup_phases(events)
    assert [phase["ends_at"] for phase in phases] == pytest.approx(
        [1.5, 4.0, 5.0, 12.0, 12.75, 14.0, 15.0, 19.0, 20.0, 21.0])
    assert sum(phase["seconds"] for phase in phases) == pytest.approx(21.0)


def test_startup_phases_join_unseen_events_to_the_next_phase_and_never_go_negative():
    # No Ray line (joined a running cluster); epoch-1 metrics logged before its forwarded line arrived.
    phases = startup_phases({"config_printed": 2.0, "loop_ready": 10.0, "epoch1_logged": 9.5, "exit": 12.0})
    assert [phase["seconds"] for phase in phases] == [2.0, 8.0, 0.0, 2.0]
    assert phases[1]["phase"].startswith("Ray start") and phases[1]["phase"].endswith("DDP wrap")


def test_controller_events_read_ray_trains_json_log_in_local_time():
    import json
    import time

    def record(clock: str, message: str) -> str:
        return json.dumps({"asctime": f"2026-01-01 {clock}", "levelname": "INFO", "message": message})

    started = time.mktime(time.strptime("2026-01-01 10:00:00", "%Y-%m-%d %H:%M:%S"))
    log = [
        record("10:00:03,250", "Requesting resources: {'CPU': 1.0} * 2"),
        "not json",
        record("10:00:05,000", "[Worker Group Initialization] 2 worker actors created in 1.50s."),
        record("10:00:07,500", "[Worker Group Initialization] Train context initialized on workers in 2.46s."),
        record("10:00:09,000", "[Worker Group Initialization] Train function launched on workers in 1.50s."),
        record("10:00:30,125", "Shutting down 2 workers."),
    ]
    assert controller_events(log, started) == pytest.approx({
        "controller_started": 3.25, "workers_created": 5.0, "context_ready": 7.5, "train_fn_started": 9.0,
        "workers_stopped": 30.125,
    })
