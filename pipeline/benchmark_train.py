"""Benchmarks of the training path: Ray Train's throughput against plain torchrun DDP, and a job's start-up time.

    imagenet-pipeline bench-train --work-dir data/bench_train      (both; see `run_overhead_benchmark` and
                                                                   `run_startup_benchmark` for the options)

Overhead: the same config file, shards, model builder, loader, optimiser and global batch run through our
`train` path (`trainer.run_training`, N Ray Train workers) and through `pipeline.ddp_reference` under
`torchrun --nproc_per_node N`. Both measure an epoch's images/s the same way (valid images over all ranks /
rank 0's time from creating the epoch's DataLoader to its last step; ours is `train/images_per_second` read
from `TrainingOutcome.history`); steady state drops the first `warmup_epochs` epochs on both sides. The two
paths alternate (reference first in odd rounds, ours first in even ones) and each starts from a machine
without the other's processes (Ray is started and shut down around every run of ours), so drifting load from
other work hits both alike. The ratio ours / reference is the figure; absolute images/s are not portable.

Start-up: the real console script, `imagenet-pipeline train` for one epoch on tiny data, as a subprocess. Its
output lines are time-stamped as they arrive; with MLflow's own timestamps (epoch-1 metrics, model version)
and the learning-curve file's mtime they split the wall time into phases. Nothing here asserts a speed.
All MLflow runs, registry versions and Ray checkpoints go to a SQLite store and a folder inside `work_dir`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import harmonic_mean

from pipeline import metrics as m
from pipeline.config import MODEL_NAMES, Config, load_config

TARGET_RATIO = 0.97  # ours / plain DDP, steady-state images/s
TARGET_STARTUP_SECONDS = 30.0  # one-epoch tiny job, command start to exit, on 2 cores
EXPERIMENT, REGISTERED_MODEL = "bench-train", "bench-train-model"
CLASSES, VAL_PER_CLASS, SAMPLES_PER_SHARD = 4, 4, 64
# Small source photos: decoding stays a few % of a step, as with ImageNet JPEGs at 224 px on real hardware.
SOURCE_WIDTH, SOURCE_HEIGHT = 160, 120
SETTLE_SECONDS = 2.0  # pause before each measured run so the previous run's processes are gone


def run_overhead_benchmark(
    work_dir: Path, model: str = "resnet18", image_size: int = 64, global_batch: int = 32, epochs: int = 2,
    train_images: int = 512, rounds: int = 2, num_workers: int = 2, loader_workers: int = 1,
    warmup_epochs: int = 1,
) -> dict:
    """Steady-state training images/s of ours and of plain DDP, alternating for `rounds`; print a table."""
    _check_common(model, image_size, global_batch, train_images, num_workers, loader_workers)
    _check_positive(epochs=epochs, rounds=rounds)
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs = {warmup_epochs} must be >= 0 and below epochs = {epochs}: "
                         "at least one epoch has to be left for the steady state")
    import ray

    if ray.is_initialized():
        raise ValueError("Ray is already running in this process; the benchmark starts and stops its own so the "
                         "reference runs without Ray's processes beside it")
    work_dir = Path(work_dir).resolve()
    shards = make_benchmark_shards(work_dir / "data", train_images, image_size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = load_config(overrides=benchmark_overrides(
        shards, work_dir / "store", model=model, image_size=image_size, global_batch=global_batch, epochs=epochs,
        num_workers=num_workers, loader_workers=loader_workers, run_name=f"overhead-{stamp}"))
    config_file = work_dir / f"overhead-{stamp}.yaml"
    config_file.write_text(config.to_yaml())

    measured_rounds = []
    for index in range(rounds):
        order = ("reference", "ours") if index % 2 == 0 else ("ours", "reference")
        sides = {}
        for side in order:
            time.sleep(SETTLE_SECONDS)
            if side == "reference":
                figures = run_reference(config_file, num_workers, work_dir / f"overhead-{stamp}-r{index + 1}.json")
                epoch_rows = figures["epochs"]
                rates = [row["images_per_second"] for row in epoch_rows]
                waits = [row["data_wait_share"] for row in epoch_rows]
            else:
                history = run_ours(config, f"overhead-{stamp}-r{index + 1}")
                rates = [row[m.TRAIN_IMAGES_PER_SECOND] for row in history]
                waits = [row[m.TRAIN_DATA_WAIT_SHARE] for row in history]
            if len(rates) != epochs:
                raise RuntimeError(f"{side} run reported {len(rates)} epochs, expected {epochs}")
            sides[side] = {"epoch_images_per_second": rates, "epoch_data_wait_share": waits,
                           "steady_images_per_second": steady_state(rates, warmup_epochs)}
        ratio = sides["ours"]["steady_images_per_second"] / sides["reference"]["steady_images_per_second"]
        measured_rounds.append({"first": order[0], **sides, "ratio": ratio})

    def pooled(side: str) -> float:
        return harmonic_mean([rate for one in measured_rounds
                              for rate in one[side]["epoch_images_per_second"][warmup_epochs:]])

    reference, ours = pooled("reference"), pooled("ours")
    result = {
        "model": model, "image_size": image_size, "global_batch": global_batch, "num_workers": num_workers,
        "per_worker_batch": config.per_worker_batch_size, "loader_workers": loader_workers, "epochs": epochs,
        "warmup_epochs": warmup_epochs, "train_images": train_images,
        "images_per_epoch": images_per_epoch(shards, global_batch), "rounds": measured_rounds,
        "reference_images_per_second": reference, "ours_images_per_second": ours, "ratio": ours / reference,
        "target_ratio": TARGET_RATIO, "meets_target": ours / reference >= TARGET_RATIO,
        "config_file": str(config_file), "reference_command": shlex.join(reference_command(config_file, num_workers)),
    }
    print(format_overhead_table(result))
    return result


def run_ours(config: Config, run_name: str) -> list[dict]:
    """Our `train` path in this process, on a fresh local Ray instance that is shut down afterwards."""
    import ray

    from pipeline.trainer import run_training

    config = config.model_copy(deep=True)
    config.tracking.run_name = run_name
    # As trainer.ensure_ray does for the CLI, but always a new local instance, never a cluster in RAY_ADDRESS.
    ray.init(address="local", log_to_driver=True)
    try:
        return run_training(config).history
    finally:
        ray.shutdown()


def reference_command(config_file: Path, num_workers: int, output: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_workers),
               "-m", "pipeline.ddp_reference", "--config", str(config_file)]
    return command + (["--output", str(output)] if output else [])


def run_reference(config_file: Path, num_workers: int, output: Path) -> dict:
    """`pipeline.ddp_reference` under torchrun; returns rank 0's figures (see that module)."""
    import json

    output.unlink(missing_ok=True)
    completed = subprocess.run(reference_command(config_file, num_workers, output), check=False)
    if completed.returncode != 0 or not output.is_file():
        raise RuntimeError(f"the torchrun reference failed (exit status {completed.returncode}): "
                           f"{shlex.join(reference_command(config_file, num_workers, output))}")
    return json.loads(output.read_text())


def steady_state(epoch_images_per_second: list[float], warmup_epochs: int) -> float:
    """Images/s over the epochs after warm-up. Epochs hold equal image counts, so the harmonic mean of their
    rates is total images / total seconds."""
    steady = epoch_images_per_second[warmup_epochs:]
    if not steady:
        raise ValueError(f"warmup_epochs = {warmup_epochs} leaves none of {len(epoch_images_per_second)} epochs")
    return harmonic_mean(steady)


# ---------------------------------------------------------------------------------------------------------------
# Start-up time of `imagenet-pipeline train`

# (event, pattern in the job's output, what happened between the previous event and this one)
OUTPUT_EVENTS = (
    ("config_printed", re.compile(r"^# resolved config"), "interpreter start, imports, config"),
    ("ray_started", re.compile(r"Started a local Ray instance"), "Ray start (ray.init: GCS, raylet, dashboard)"),
    ("mlflow_run_ready", re.compile(r"^MLflow run \S+ \((new|resumed)\)"),
     "driver checks, MLflow store (created, migrated) and run"),
    ("loop_ready", re.compile(r"\[rank 0\] world size"),
     "Ray Train controller, worker group + gloo start, loaders, model build, DDP"),
    ("finished_line", re.compile(r"^run '.*' finished in"), "champion alias, tags, run end"),
)


def run_startup_benchmark(
    work_dir: Path, model: str = "resnet18", image_size: int = 32, global_batch: int = 16, train_images: int = 64,
    num_workers: int = 2, loader_workers: int = 1, timeout_seconds: float = 600.0, echo: bool = False,
) -> dict:
    """Wall time of a 1-epoch `imagenet-pipeline train` job from command start to exit, split into phases."""
    _check_common(model, image_size, global_batch, train_images, num_workers, loader_workers)
    _check_positive(timeout_seconds=timeout_seconds)
    script = Path(sys.executable).parent / "imagenet-pipeline"
    if not script.is_file():
        raise ValueError(f"console script {script} not found: install the project into this environment")
    work_dir = Path(work_dir).resolve()
    shards = make_benchmark_shards(work_dir / "data", train_images, image_size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    store = work_dir / f"startup-{stamp}"  # a fresh MLflow store: the first job's cost, migrations included
    run_name = f"startup-{stamp}"
    overrides = benchmark_overrides(shards, store, model=model, image_size=image_size, global_batch=global_batch,
                                    epochs=1, num_workers=num_workers, loader_workers=loader_workers, run_name=run_name)
    command = [str(script), "train", *[part for override in overrides for part in ("--set", override)]]
    # Ray workers inherit the environment: unbuffered output gives honest line times. A fresh local Ray, as on
    # a laptop: the job must not join a cluster named in RAY_ADDRESS.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}

    started = time.time()
    lines, exit_code = _run_timed(command, env, store.parent, timeout_seconds, echo)
    exit_seconds = time.time() - started
    if exit_code != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise RuntimeError(f"the train job failed (exit status {exit_code}):\n{tail}")

    events = timeline_from_lines(lines)
    events.update(_mlflow_events(store, run_name, started))
    train_seconds = images_per_epoch(shards, global_batch) / events.pop("epoch1_images_per_second")
    events["exit"] = exit_seconds
    result = {
        "command": shlex.join(command), "wall_seconds": exit_seconds, "target_seconds": TARGET_STARTUP_SECONDS,
        "meets_target": exit_seconds <= TARGET_STARTUP_SECONDS, "events": events, "phases": startup_phases(events),
        "epoch1_train_seconds": train_seconds,
        # The loop starts after `loop_ready`; epoch 1's training ends before its metrics are logged.
        "first_step_window": (events.get("loop_ready"), events["epoch1_logged"] - train_seconds),
        "model_build_seconds": _time_model_build(model),
        "output": [f"{at:7.2f}  {text}" for at, text in lines],
    }
    print(format_startup_table(result))
    return result


def timeline_from_lines(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds since start of the first output line matching each of OUTPUT_EVENTS."""
    events: dict[str, float] = {}
    for at, text in lines:
        for name, pattern, _ in OUTPUT_EVENTS:
            if name not in events and pattern.search(text):
                events[name] = at
    return events


# Phases in the order they happen; an event that was not seen is skipped (its time joins the next phase).
PHASE_ORDER = (
    *[(name, label) for name, _, label in OUTPUT_EVENTS[:4]],
    ("epoch1_logged", "epoch 1: worker MLflow attach, train, validate, checkpoint report"),
    ("publish_started", "Ray Train wind-down (worker group exit), history read"),
    ("model_registered", "model logging (pt2 export, artifacts) and registration"),
    ("finished_line", "champion alias, tags, run end"),
    ("exit", "Ray shutdown and interpreter exit"),
)


def startup_phases(events: dict[str, float]) -> list[dict]:
    phases, previous = [], 0.0
    for name, label in PHASE_ORDER:
        if name in events:
            # Worker lines reach the driver through Ray's log monitor, a fraction of a second late: clamp at 0.
            phases.append({"phase": label, "ends_at": events[name], "seconds": max(0.0, events[name] - previous)})
            previous = max(previous, events[name])
    return phases


def _run_timed(command: list[str], env: dict, cwd: Path, timeout_seconds: float,
               echo: bool) -> tuple[list[tuple[float, str]], int]:
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env=env, cwd=cwd)
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
    """Times the job itself recorded: epoch-1 metrics (rank 0, no log forwarding lag) and the model version."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")[0]
    rate = client.get_metric_history(run.info.run_id, m.TRAIN_IMAGES_PER_SECOND)[0]
    events = {"epoch1_logged": rate.timestamp / 1000 - started, "epoch1_images_per_second": rate.value}
    versions = [version for version in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
                if version.run_id == run.info.run_id]
    if versions:
        events["model_registered"] = versions[0].creation_timestamp / 1000 - started
    curves = sorted(store.rglob("learning_curve.png"))
    if curves:  # the first thing publish_best_model writes, right after fit() returns
        events["publish_started"] = curves[0].stat().st_mtime - started
    return events


def _time_model_build(model: str) -> float:
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    started = time.perf_counter()
    build_model(ModelConfig(name=model), CLASSES)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------------------
# Shared: data, config, validation, tables

def make_benchmark_shards(data_dir: Path, train_images: int, image_size: int) -> Path:
    """Generated ImageNet-layout JPEGs sharded by the project's sharder; reused when already there."""
    from pipeline.sharding import shard_imagenet
    from pipeline.synthetic import generate_imagenet_folder

    name = f"{CLASSES}x{-(-train_images // CLASSES)}-{SOURCE_WIDTH}x{SOURCE_HEIGHT}"
    shards = Path(data_dir) / name / "shards"
    if (shards / "train" / "manifest.json").is_file() and (shards / "val" / "manifest.json").is_file():
        return shards  # the sharder writes manifests last: present means complete
    source = generate_imagenet_folder(
        Path(data_dir) / name / "source", num_classes=CLASSES,
        train_per_class=-(-train_images // CLASSES) + VAL_PER_CLASS, val_per_class=0, width=SOURCE_WIDTH, height=SOURCE_HEIGHT, seed=0)
    shard_imagenet(source, shards, val_per_class=VAL_PER_CLASS, samples_per_shard=SAMPLES_PER_SHARD, seed=0,
                   progress=False)
    return shards


def images_per_epoch(shards: Path, global_batch: int) -> int:
    """Images trained per epoch: whole global batches (the plan leaves the remainder for later epochs)."""
    from pipeline.manifest import read_manifest

    return read_manifest(shards / "train").num_samples // global_batch * global_batch


def benchmark_overrides(shards: Path, store: Path, *, model: str, image_size: int, global_batch: int, epochs: int,
                        num_workers: int, loader_workers: int, run_name: str) -> list[str]:
    """`--set` overrides on top of the default config; MLflow and Ray storage stay inside `store`."""
    return [
        f"data.root={shards}", f"data.train_image_size={image_size}", f"data.eval_image_size={image_size}",
        f"data.loader_workers={loader_workers}", f"model.name={model}", f"optim.batch_size={global_batch}",
        f"optim.epochs={epochs}", f"scaling.num_workers={num_workers}",
        "scaling.max_failures=0",  # a restarted worker group would be timed as if it were training
        f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}", f"tracking.storage_path={store / 'ray'}",
        f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={REGISTERED_MODEL}",
        f"tracking.run_name={run_name}",
    ]


def _check_common(model: str, image_size: int, global_batch: int, train_images: int, num_workers: int,
                  loader_workers: int) -> None:
    from pipeline.models import MIN_IMAGE_SIZE

    if model not in MODEL_NAMES:
        raise ValueError(f"model = {model!r}: unknown model; choose one of {', '.join(MODEL_NAMES)}")
    _check_positive(global_batch=global_batch, num_workers=num_workers)
    if image_size < max(16, MIN_IMAGE_SIZE[model]):
        raise ValueError(f"image_size = {image_size}: {model} needs at least {max(16, MIN_IMAGE_SIZE[model])} px")
    if global_batch % num_workers:
        raise ValueError(f"global_batch = {global_batch} is not divisible by num_workers = {num_workers}")
    if train_images < global_batch:
        raise ValueError(f"train_images = {train_images} must be at least global_batch = {global_batch}")
    if loader_workers < 0:
        raise ValueError(f"loader_workers = {loader_workers} must be >= 0 (0: load in the training process)")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} = {value} must be positive")


def format_overhead_table(result: dict) -> str:
    first, last = result["warmup_epochs"] + 1, result["epochs"]
    lines = [
        f"Training throughput: {result['model']} at {result['image_size']} px, global batch {result['global_batch']}"
        f" ({result['num_workers']} x {result['per_worker_batch']}), {result['loader_workers']} loader process(es)"
        f" per worker, {result['images_per_epoch']} images per epoch; steady state = epochs {first}-{last}",
        f"{'round':>5}  {'first':<9}  {'reference img/s':>15}  {'ours img/s':>10}  {'ours/ref':>8}  "
        f"{'data wait ref / ours':>20}",
    ]
    for index, one in enumerate(result["rounds"], start=1):
        waits = [sum(one[side]["epoch_data_wait_share"][first - 1:]) / (last - first + 1)
                 for side in ("reference", "ours")]
        lines.append(f"{index:>5}  {one['first']:<9}  {one['reference']['steady_images_per_second']:>15.1f}  "
                     f"{one['ours']['steady_images_per_second']:>10.1f}  {one['ratio']:>8.3f}  "
                     f"{waits[0]:>11.0%} / {waits[1]:>4.0%}")
    lines.append(f"{'all':>5}  {'':<9}  {result['reference_images_per_second']:>15.1f}  "
                 f"{result['ours_images_per_second']:>10.1f}  {result['ratio']:>8.3f}  "
                 f"(target >= {result['target_ratio']:.2f}: {'met' if result['meets_target'] else 'NOT met'})")
    lines.append(f"reference: {result['reference_command']}")
    return "\n".join(lines)


def format_startup_table(result: dict) -> str:
    lines = [f"Start-up of a 1-epoch job: {result['command']}", f"{'ends at s':>9}  {'seconds':>7}  phase"]
    lines += [f"{phase['ends_at']:>9.1f}  {phase['seconds']:>7.1f}  {phase['phase']}" for phase in result["phases"]]
    low, high = result["first_step_window"]
    lines += [
        f"{'':>9}  {result['wall_seconds']:>7.1f}  total, command start to exit "
        f"(target <= {result['target_seconds']:.0f} s: {'met' if result['meets_target'] else 'NOT met'})",
        f"first training step: begins between {'?' if low is None else f'{low:.1f}'} s (loop ready) and {high:.1f} s"
        f" (epoch-1 metrics logged minus its {result['epoch1_train_seconds']:.1f} s of training)",
        f"model build alone (measured in this process): {result['model_build_seconds']:.2f} s",
    ]
    return "\n".join(lines)
