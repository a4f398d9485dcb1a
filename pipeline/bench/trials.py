"""Benchmark of a sweep's fixed cost per trial: from one trial's last epoch to the next trial's first step.

    imagenet-pipeline bench-train --only trial-gap --work-dir data/bench_train

A real sweep (`pipeline.tune.search.run_search`) of `trials` identical one-epoch trials, one at a time, on tiny
generated shards, with the project's event timeline on (`pipeline.events`: every Ray process gets the file
through the runtime environment). With one trial at a time, rank 0's `epoch_end` of a trial and the next
`first_step` bound the gap: the trial's shutdown (checkpoint upload, Ray Train's controller and worker group
ending, the placement group's release), Tune starting the next trial, its driver checking inputs and its MLflow
run, the worker group's start, the model build and the first batch. Median and spread over the gaps are
printed; nothing here asserts a speed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pipeline import events
from pipeline.bench.overhead import (
    benchmark_overrides,
    check_benchmark_arguments,
    check_positive,
    make_benchmark_shards,
)
from pipeline.config import load_config
from pipeline.errors import BenchmarkError


def run_trial_gap_benchmark(
    work_dir: Path,
    trials: int = 3,
    model: str = "resnet18",
    image_size: int = 32,
    global_batch: int = 16,
    train_images: int = 64,
    num_workers: int = 1,
) -> dict:
    check_benchmark_arguments(model, image_size, global_batch, train_images, num_workers, 0)
    check_positive(trials=trials)
    if trials < 2:
        raise BenchmarkError(f"trials = {trials}: a gap needs at least 2 trials")
    import ray

    from pipeline.tune.search import run_search

    if ray.is_initialized():
        raise BenchmarkError("Ray is already running in this process; the benchmark starts its own")
    work_dir = Path(work_dir).resolve()
    shards = make_benchmark_shards(work_dir / "data", train_images)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    store = work_dir / f"trials-{stamp}"
    events_file = work_dir / f"trials-{stamp}.events.jsonl"
    config = load_config(
        overrides=[
            *benchmark_overrides(
                shards,
                store,
                model=model,
                image_size=image_size,
                global_batch=global_batch,
                epochs=1,
                num_workers=num_workers,
                loader_workers=0,
                run_name=f"trials-{stamp}",
            ),
            f"search.num_samples={trials}",
            "search.max_concurrent_trials=1",
            "search.grace_period=1",
            "search.space={optim.lr: {kind: choice, values: [0.1]}}",
        ]
    )
    events.use_file(str(events_file))
    ray.init(address="local", runtime_env={"env_vars": {events.ENV_VAR: str(events_file)}})
    try:
        started = time.time()
        run_search(config)
        seconds = time.time() - started
    finally:
        ray.shutdown()
    result = trial_gaps(events.read(events_file))
    result.update(trials=trials, sweep_seconds=seconds, events_file=str(events_file))
    print(format_trial_gaps(result))
    return result


def trial_gaps(records: list[dict]) -> dict:
    """Rank 0's epoch ends and first steps, in time order, paired into the gaps between consecutive trials."""
    marks = sorted(
        (entry["unix_time"], entry["event"])
        for entry in records
        if entry.get("rank") == 0 and entry["event"] in ("first_step", "epoch_end")
    )
    gaps, last_end = [], None
    for at, name in marks:
        if name == "epoch_end":
            last_end = at
        elif last_end is not None:
            gaps.append(at - last_end)
            last_end = None
    if not gaps:
        raise BenchmarkError("no trial followed another in the event timeline: did every trial run?")
    return {
        "gaps_seconds": gaps,
        "median_gap_seconds": statistics.median(gaps),
        "min_gap_seconds": min(gaps),
        "max_gap_seconds": max(gaps),
    }


def format_trial_gaps(result: dict) -> str:
    return (
        f"sweep of {result['trials']} one-epoch trials, one at a time, {result['sweep_seconds']:.0f} s: "
        f"last epoch of a trial to the next trial's first step: median {result['median_gap_seconds']:.1f} s "
        f"(min {result['min_gap_seconds']:.1f}, max {result['max_gap_seconds']:.1f}) over "
        f"{len(result['gaps_seconds'])} gaps; timeline: {result['events_file']}"
    )
