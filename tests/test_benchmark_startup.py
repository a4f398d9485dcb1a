"""The start-up benchmark's parts: inputs are checked before any work, and the job's output lines and Ray Train's
controller log become the documented timeline of phases. No timing is asserted (this is not a speed test); the
full benchmark runs a real `imagenet-pipeline train` job, so it is run by hand
(`imagenet-pipeline bench-train --only startup`).
"""

from __future__ import annotations

import pytest

from pipeline.benchmark_startup import (
    OUTPUT_EVENTS, controller_events, run_startup_benchmark, startup_phases, timeline_from_lines,
)


def test_startup_benchmark_rejects_bad_arguments_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="global_batch = 15 is not divisible by num_workers = 2"):
        run_startup_benchmark(tmp_path / "work", global_batch=15)
    with pytest.raises(ValueError, match="timeout_seconds = 0"):
        run_startup_benchmark(tmp_path / "work", timeout_seconds=0)
    assert not (tmp_path / "work").exists()


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
