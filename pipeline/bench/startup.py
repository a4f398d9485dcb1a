"""Benchmark of a training job's start-up time: the real console script, `imagenet-pipeline train` for one epoch
on tiny data, as a subprocess.

    imagenet-pipeline bench-train --only startup --work-dir data/bench_train

(options: see `run_startup_benchmark`.)

The job records its own timeline (`pipeline.events`: the driver, rank 0 and the publisher write named moments to
the JSON-lines file named by PIPELINE_EVENTS_FILE); with MLflow's timestamp of epoch 1's metrics and Ray Train's
own controller log (JSON records) they split the wall time into phases. No printed line is parsed.
Nothing here asserts a speed. The MLflow run, registry version and Ray checkpoints go to a fresh SQLite store and
folder inside `work_dir`. Data, overrides and argument checks are shared with `pipeline.bench.overhead`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline import events
from pipeline import metrics as m
from pipeline.bench.overhead import (
    CLASSES,
    EXPERIMENT,
    benchmark_overrides,
    check_benchmark_arguments,
    check_positive,
    images_per_epoch,
    make_benchmark_shards,
)
from pipeline.errors import BenchmarkError

TARGET_STARTUP_SECONDS = 30.0  # one-epoch tiny job, command start to exit, on 2 cores

# Events the job records (pipeline.events) that mark a phase's end.
JOB_EVENTS = (
    "config_resolved",
    "ray_started",
    "mlflow_run_ready",
    "loop_ready",
    "first_step",
    "publish_started",
    "model_registered",
    "run_finished",
)


def run_startup_benchmark(
    work_dir: Path,
    model: str = "resnet18",
    image_size: int = 32,
    global_batch: int = 16,
    train_images: int = 64,
    num_workers: int = 2,
    loader_workers: int = 1,
    timeout_seconds: float = 600.0,
    echo: bool = False,
) -> dict:
    """Wall time of a 1-epoch `imagenet-pipeline train` job from command start to exit, split into phases; print
    a table. `echo` also prints the job's output lines with their arrival times."""
    check_benchmark_arguments(model, image_size, global_batch, train_images, num_workers, loader_workers)
    check_positive(timeout_seconds=timeout_seconds)
    script = Path(sys.executable).parent / "imagenet-pipeline"
    if not script.is_file():
        raise BenchmarkError(f"console script {script} not found: install the project into this environment")
    work_dir = Path(work_dir).resolve()
    shards = make_benchmark_shards(work_dir / "data", train_images)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    store = work_dir / f"startup-{stamp}"  # a fresh MLflow store: the first job's cost, migrations included
    run_name = f"startup-{stamp}"
    overrides = benchmark_overrides(
        shards,
        store,
        model=model,
        image_size=image_size,
        global_batch=global_batch,
        epochs=1,
        num_workers=num_workers,
        loader_workers=loader_workers,
        run_name=run_name,
    )
    command = [str(script), "train", *[part for override in overrides for part in ("--set", override)]]
    # Ray workers inherit the environment: unbuffered output gives honest line times. A fresh local Ray, as on
    # a laptop: the job must not join a cluster named in RAY_ADDRESS.
    events_file = work_dir / f"startup-{stamp}.events.jsonl"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
        "PYTHONUNBUFFERED": "1",
        events.ENV_VAR: str(events_file),
    }

    started = time.time()
    lines, exit_code = _run_timed(command, env, work_dir, timeout_seconds, echo)
    exit_seconds = time.time() - started
    if exit_code != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise RuntimeError(f"the train job failed (exit status {exit_code}):\n{tail}")

    timeline = job_timeline(events.read(events_file) if events_file.is_file() else [], started)
    timeline.update(_mlflow_events(store, run_name, started))
    timeline.update(_ray_train_events(run_name, started))
    train_seconds = images_per_epoch(shards, global_batch) / timeline.pop("epoch1_images_per_second")
    timeline["exit"] = exit_seconds
    result = {
        "command": shlex.join(command),
        "wall_seconds": exit_seconds,
        "target_seconds": TARGET_STARTUP_SECONDS,
        "meets_target": exit_seconds <= TARGET_STARTUP_SECONDS,
        "events": timeline,
        "phases": startup_phases(timeline),
        "epoch1_train_seconds": train_seconds,
        # Without the first-step event: the loop starts after `loop_ready`, and epoch 1's training ends before its
        # metrics are logged, so it started at most its training time before then.
        "first_step_window": (
            (timeline["first_step"],) * 2
            if "first_step" in timeline
            else (timeline.get("loop_ready"), timeline["epoch1_logged"] - train_seconds)
        ),
        "model_build_seconds": _time_model_build(model),
        "output": [f"{at:7.2f}  {text}" for at, text in lines],
    }
    print(format_startup_table(result))
    return result


def job_timeline(records: list[dict], started: float) -> dict[str, float]:
    """Seconds since `started` (the command's unix start time) of the first record of each of JOB_EVENTS;
    rank 0's records only, where a record names its rank (every rank records its own loop and first step)."""
    ours = [record for record in records if record["event"] in JOB_EVENTS and record.get("rank", 0) == 0]
    return events.first_times(ours, started)


# Ray Train's controller log (JSON lines in the job's Ray session): the worker group's start-up steps.
CONTROLLER_EVENTS = (
    ("controller_started", re.compile(r"Requesting resources")),
    ("workers_created", re.compile(r"worker actors created in")),
    ("context_ready", re.compile(r"Train context initialized on workers")),
    ("train_fn_started", re.compile(r"Train function launched on workers")),
    ("workers_stopped", re.compile(r"Shutting down \d+ workers")),
)

# Phases in the order they happen. When an event was not seen, its phase joins the next one.
PHASE_ORDER = (
    ("config_resolved", "interpreter start, imports (pipeline.cli: typer, pydantic), config"),
    ("ray_started", "Ray start (ray.init: GCS, raylet, dashboard)"),
    (
        "mlflow_run_ready",
        "imports (pipeline.train.driver: torch, ray.train, mlflow), driver checks, "
        "MLflow store (created, migrated) and run",
    ),
    ("controller_started", "TorchTrainer + Ray Train controller actor start"),
    ("workers_created", "worker actors created (placement group, processes)"),
    ("context_ready", "train context and gloo process group on the workers"),
    ("train_fn_started", "train function shipped and started (imports on the workers)"),
    ("loop_ready", "train_worker set-up: loaders, model build, optimiser, DDP wrap"),
    ("first_step", "first step: worker MLflow attach, DataLoader start, first batch, forward/backward"),
    ("epoch1_logged", "epoch 1: train, validate, checkpoint report"),
    ("workers_stopped", "Ray Train notices the end (health-check poll) and stops the workers"),
    ("publish_started", "fit() returns, history read, learning curve"),
    ("model_registered", "model logging (pt2 export, artifacts) and registration"),
    ("run_finished", "champion alias, tags, run end"),
    ("exit", "Ray shutdown and interpreter exit"),
)


def startup_phases(events: dict[str, float]) -> list[dict]:
    phases, previous, skipped = [], 0.0, []
    for name, label in PHASE_ORDER:
        if name not in events:
            skipped.append(label)
            continue
        # Worker lines reach the driver through Ray's log monitor, a fraction of a second late: clamp at 0.
        phases.append(
            {
                "phase": " + ".join([*skipped, label]),
                "ends_at": events[name],
                "seconds": max(0.0, events[name] - previous),
            }
        )
        previous, skipped = max(previous, events[name]), []
    return phases


def controller_events(log_lines: list[str], started: float) -> dict[str, float]:
    """Seconds since `started` of the first controller log record matching each of CONTROLLER_EVENTS."""
    events: dict[str, float] = {}
    for line in log_lines:
        try:
            record = json.loads(line)
            at = time.mktime(time.strptime(record["asctime"][:19], "%Y-%m-%d %H:%M:%S"))
            at += int(record["asctime"][20:23]) / 1000  # local time with milliseconds: "2026-01-01 10:00:00,123"
        except (ValueError, KeyError, TypeError):
            continue
        for name, pattern in CONTROLLER_EVENTS:
            if name not in events and pattern.search(record.get("message") or ""):
                events[name] = at - started
    return events


def _ray_train_events(run_name: str, started: float) -> dict[str, float]:
    """The controller's events, from the Ray session whose artifacts folder holds the run (the workers' cwd)."""
    ray_temp = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    for run_folder in ray_temp.glob(f"session_2*/artifacts/{run_name}"):
        logs = sorted((run_folder.parent.parent / "logs" / "train").glob("ray-train-sys-controller-*.log"))
        if logs:
            return controller_events(logs[0].read_text().splitlines(), started)
    return {}


def _run_timed(
    command: list[str], env: dict, cwd: Path, timeout_seconds: float, echo: bool
) -> tuple[list[tuple[float, str]], int]:
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.time()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, cwd=cwd
    )
    watchdog = threading.Timer(timeout_seconds, process.kill)
    watchdog.start()
    lines = []
    try:
        for text in process.stdout:
            lines.append((time.time() - started, text.rstrip("\n")))
            if echo:
                print(f"{lines[-1][0]:7.2f}  {lines[-1][1]}", flush=True)
        return lines, process.wait()
    finally:
        watchdog.cancel()


def _mlflow_events(store: Path, run_name: str, started: float) -> dict[str, float]:
    """Epoch 1's metrics as MLflow stamped them (rank 0 logs them right after the epoch) and its images/s."""
    from pipeline.tracking.runs import find_run_in, metric_history

    uri = f"sqlite:///{store / 'mlflow.db'}"
    run = find_run_in(uri, EXPERIMENT, run_name)
    rate = min(metric_history(uri, run.info.run_id, m.TRAIN_IMAGES_PER_SECOND), key=lambda metric: metric.step)
    return {"epoch1_logged": rate.timestamp / 1000 - started, "epoch1_images_per_second": rate.value}


def _time_model_build(model: str) -> float:
    from pipeline.config import ModelConfig
    from pipeline.train.models import build_model

    started = time.perf_counter()
    build_model(ModelConfig(name=model), CLASSES)
    return time.perf_counter() - started


def format_startup_table(result: dict) -> str:
    lines = [f"Start-up of a 1-epoch job: {result['command']}", f"{'ends at s':>9}  {'seconds':>7}  phase"]
    lines += [f"{phase['ends_at']:>9.1f}  {phase['seconds']:>7.1f}  {phase['phase']}" for phase in result["phases"]]
    low, high = result["first_step_window"]
    if low == high:
        first_step = f"first training step finished at {high:.1f} s (rank 0's own clock)"
    else:
        first_step = (
            f"first training step: begins between {'?' if low is None else f'{low:.1f}'} s (loop ready) "
            f"and {high:.1f} s (epoch-1 metrics logged minus its {result['epoch1_train_seconds']:.1f} s "
            "of training)"
        )
    lines += [
        f"{'':>9}  {result['wall_seconds']:>7.1f}  total, command start to exit "
        f"(target <= {result['target_seconds']:.0f} s: {'met' if result['meets_target'] else 'NOT met'})",
        first_step,
        f"model build alone (measured in this process): {result['model_build_seconds']:.2f} s",
    ]
    return "\n".join(lines)
