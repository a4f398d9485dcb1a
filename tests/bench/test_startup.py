"""The start-up benchmark's parts: inputs are checked before any work, and the job's recorded events and Ray Train's
controller log become the documented timeline of phases. No timing is asserted (this is not a speed test); the
full benchmark runs a real `imagenet-pipeline train` job, so it is run by hand
(`imagenet-pipeline bench-train --only startup`).
"""

from __future__ import annotations

import time

import pytest

from pipeline import events
from pipeline.bench.startup import JOB_EVENTS, controller_events, job_timeline, run_startup_benchmark, startup_phases


def test_startup_benchmark_rejects_bad_arguments_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="global_batch = 15 is not divisible by num_workers = 2"):
        run_startup_benchmark(tmp_path / "work", global_batch=15)
    with pytest.raises(ValueError, match="timeout_seconds = 0"):
        run_startup_benchmark(tmp_path / "work", timeout_seconds=0)
    assert not (tmp_path / "work").exists()


def test_startup_timeline_comes_from_the_jobs_recorded_events_and_orders_the_phases(tmp_path, monkeypatch):
    started = 1_000_000.0
    clock = iter([1.5, 4.0, 5.0, 12.0, 12.5, 12.75, 12.9, 15.0, 19.0, 20.0])
    monkeypatch.setattr(time, "time", lambda: started + next(clock))
    events_file = tmp_path / "job.events.jsonl"
    events.use_file(str(events_file))
    try:
        for name, fields in [
            ("config_resolved", {}),
            ("ray_started", {}),
            ("mlflow_run_ready", {}),
            ("loop_ready", {"rank": 0}),
            ("loop_ready", {"rank": 1}),  # rank 1's is not rank 0's
            ("first_step", {"rank": 0}),
            ("first_step", {"rank": 0}),  # only the first counts
            ("publish_started", {}),
            ("model_registered", {}),
            ("run_finished", {}),
        ]:
            events.record(name, **fields)
    finally:
        monkeypatch.delenv(events.ENV_VAR)
    timeline = job_timeline(events.read(events_file), started)
    assert timeline == pytest.approx(
        {
            "config_resolved": 1.5,
            "ray_started": 4.0,
            "mlflow_run_ready": 5.0,
            "loop_ready": 12.0,
            "first_step": 12.75,
            "publish_started": 15.0,
            "model_registered": 19.0,
            "run_finished": 20.0,
        }
    )
    assert set(timeline) == set(JOB_EVENTS)
    timeline.update(epoch1_logged=14.0, exit=21.0)
    phases = startup_phases(timeline)
    assert [phase["ends_at"] for phase in phases] == pytest.approx(
        [1.5, 4.0, 5.0, 12.0, 12.75, 14.0, 15.0, 19.0, 20.0, 21.0]
    )
    assert sum(phase["seconds"] for phase in phases) == pytest.approx(21.0)


def test_no_events_file_means_nothing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv(events.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    events.record("first_step", rank=0)
    assert list(tmp_path.iterdir()) == []


def test_startup_phases_join_unseen_events_to_the_next_phase_and_never_go_negative():
    # No Ray line (joined a running cluster); epoch-1 metrics logged before its forwarded line arrived.
    phases = startup_phases({"config_resolved": 2.0, "loop_ready": 10.0, "epoch1_logged": 9.5, "exit": 12.0})
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
    assert controller_events(log, started) == pytest.approx(
        {
            "controller_started": 3.25,
            "workers_created": 5.0,
            "context_ready": 7.5,
            "train_fn_started": 9.0,
            "workers_stopped": 30.125,
        }
    )
