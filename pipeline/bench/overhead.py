"""Benchmark of the training path: Ray Train's throughput against plain torchrun DDP.

    imagenet-pipeline bench-train --only overhead --work-dir data/bench_train

(options: see `run_overhead_benchmark`; without `--only` the start-up benchmark, `pipeline.bench.startup`,
runs too.)

The same config file, shards, model builder, loader, optimiser and global batch run through our
`train` path (`trainer.run_training`, N Ray Train workers) and through `pipeline.bench.ddp_reference` under
`torchrun --nproc_per_node N`. Both measure an epoch's images/s the same way (valid images over all ranks /
rank 0's time from creating the epoch's DataLoader to its last step; ours is `train/images_per_second` read
from `TrainingOutcome.history`); steady state drops the first `warmup_epochs` epochs on both sides. The two
paths alternate (reference first in odd rounds, ours first in even ones) and each starts from a machine
without the other's processes (Ray is started and shut down around every run of ours). Other work on the
machine only slows a run down, so the headline ratio compares the fastest steady epoch of each path; the
per-round ratios (adjacent runs) and the load average before each run show how noisy the machine was.
Absolute images/s are not portable; the ratio is the figure.

The generated shards, `--set` overrides and argument checks at the end are shared with
`pipeline.bench.startup` (the start-up benchmark). All MLflow runs, registry versions and Ray checkpoints
go to a SQLite store and a folder inside `work_dir`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import harmonic_mean, mean, median

from pipeline import metrics as m
from pipeline.architectures import MODEL_NAMES
from pipeline.config import Config, load_config
from pipeline.errors import BenchmarkError

TARGET_RATIO = 0.97  # ours / plain DDP, steady-state images/s
MIN_ROUNDS = 3
MIN_STEADY_SECONDS = 20.0  # per path per round: shorter steady states measure scheduling noise, not the path
EXPERIMENT, REGISTERED_MODEL = "bench-train", "bench-train-model"
CLASSES, VAL_PER_CLASS, SAMPLES_PER_SHARD = 4, 4, 64
# Small source photos: decoding stays a few % of a step, as with ImageNet JPEGs at 224 px on real hardware.
SOURCE_WIDTH, SOURCE_HEIGHT = 160, 120
SETTLE_SECONDS = 2.0  # pause before each measured run so the previous run's processes are gone


def run_overhead_benchmark(
    work_dir: Path,
    model: str = "resnet18",
    image_size: int = 64,
    global_batch: int = 32,
    epochs: int = 2,
    train_images: int = 4096,
    rounds: int = 3,
    num_workers: int = 2,
    loader_workers: int = 1,
    warmup_epochs: int = 1,
) -> dict:
    """Steady-state training images/s of ours and of plain DDP, alternating for `rounds`; print a table."""
    check_benchmark_arguments(model, image_size, global_batch, train_images, num_workers, loader_workers)
    check_positive(epochs=epochs, rounds=rounds)
    if rounds < MIN_ROUNDS:
        raise BenchmarkError(
            f"--rounds {rounds}: at least {MIN_ROUNDS} interleaved rounds, or one noisy round "
            "decides the ratio (two rounds of one run once gave 0.63 and 1.01)"
        )
    if not 0 <= warmup_epochs < epochs:
        raise BenchmarkError(
            f"warmup_epochs = {warmup_epochs} must be >= 0 and below epochs = {epochs}: "
            "at least one epoch has to be left for the steady state"
        )
    import ray

    if ray.is_initialized():
        raise BenchmarkError(
            "Ray is already running in this process; the benchmark starts and stops its own so the "
            "reference runs without Ray's processes beside it"
        )
    work_dir = Path(work_dir).resolve()
    shards = make_benchmark_shards(work_dir / "data", train_images)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = load_config(
        overrides=benchmark_overrides(
            shards,
            work_dir / "store",
            model=model,
            image_size=image_size,
            global_batch=global_batch,
            epochs=epochs,
            num_workers=num_workers,
            loader_workers=loader_workers,
            run_name=f"overhead-{stamp}",
        )
    )
    config_file = work_dir / f"overhead-{stamp}.yaml"
    config_file.write_text(config.to_yaml())

    measured_rounds = []
    for index in range(rounds):
        order = ("reference", "ours") if index % 2 == 0 else ("ours", "reference")
        run_label = f"overhead-{stamp}-r{index + 1}"
        sides = {side: measure_side(side, config, config_file, work_dir, run_label, warmup_epochs) for side in order}
        ratio = sides["ours"]["steady_images_per_second"] / sides["reference"]["steady_images_per_second"]
        measured_rounds.append({"first": order[0], **sides, "ratio": ratio})
    # Same seed, data order, initialisation and updates: equal losses show both paths did the same work.
    same_losses = all(
        math.isclose(ours, reference, rel_tol=1e-4)
        for one in measured_rounds
        for ours, reference in zip(one["ours"]["epoch_train_loss"], one["reference"]["epoch_train_loss"])
    )

    # Other work on the machine only ever slows a run down: the fastest steady epoch of each path estimates its
    # uncontended speed, and both paths get the same number of tries.
    best = {
        side: max(rate for one in measured_rounds for rate in one[side]["epoch_images_per_second"][warmup_epochs:])
        for side in ("reference", "ours")
    }
    ratio = best["ours"] / best["reference"]
    round_ratios = [one["ratio"] for one in measured_rounds]
    per_epoch = images_per_epoch(shards, global_batch)
    steady_seconds = min(
        side_steady_seconds(one[side], warmup_epochs, per_epoch)
        for one in measured_rounds
        for side in ("reference", "ours")
    )
    result = {
        "model": model,
        "image_size": image_size,
        "global_batch": global_batch,
        "num_workers": num_workers,
        "per_worker_batch": config.per_worker_batch_size,
        "loader_workers": loader_workers,
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "train_images": train_images,
        "images_per_epoch": images_per_epoch(shards, global_batch),
        "rounds": measured_rounds,
        "reference_images_per_second": best["reference"],
        "ours_images_per_second": best["ours"],
        "ratio": ratio,
        "median_round_ratio": median(round_ratios),
        "round_ratio_min": min(round_ratios),
        "round_ratio_max": max(round_ratios),
        "shortest_steady_seconds": steady_seconds,
        "same_train_losses": same_losses,
        "target_ratio": TARGET_RATIO,
        "meets_target": median(round_ratios) >= TARGET_RATIO,
        "config_file": str(config_file),
        "reference_command": shlex.join(reference_command(config_file, num_workers)),
    }
    print(format_overhead_table(result))
    return result


def side_steady_seconds(side: dict, warmup_epochs: int, images: int) -> float:
    """Seconds the steady epochs of one run took: images over images/s, epoch by epoch."""
    return sum(images / rate for rate in side["epoch_images_per_second"][warmup_epochs:] if rate > 0)


def measure_side(
    side: str, config: Config, config_file: Path, work_dir: Path, run_label: str, warmup_epochs: int
) -> dict:
    """One run of `side` ("ours" or "reference"): per-epoch images/s, data-wait shares and train losses."""
    time.sleep(SETTLE_SECONDS)
    load = os.getloadavg()[0]  # runnable processes, 1-min average: > cores means others competed for the CPUs
    if side == "reference":
        output = work_dir / f"{run_label}-reference.json"
        epoch_rows = run_reference(config_file, config.scaling.world_size, output)["epochs"]
        rates = [row["images_per_second"] for row in epoch_rows]
        waits = [row["data_wait_share"] for row in epoch_rows]
        losses = [row["loss"] for row in epoch_rows]
    else:
        history = run_ours(config, run_label)
        rates = [row[m.TRAIN_IMAGES_PER_SECOND] for row in history]
        waits = [row[m.TRAIN_DATA_WAIT_SHARE] for row in history]
        losses = [row[m.TRAIN_LOSS] for row in history]
    if len(rates) != config.optim.epochs:
        raise RuntimeError(f"the {side} run reported {len(rates)} epochs, expected {config.optim.epochs}")
    return {
        "epoch_images_per_second": rates,
        "epoch_data_wait_share": waits,
        "epoch_train_loss": losses,
        "load_average_before": load,
        "steady_images_per_second": steady_state(rates, warmup_epochs),
    }


def run_ours(config: Config, run_name: str) -> list[dict]:
    """Our `train` path in this process, on a fresh local Ray instance that is shut down afterwards."""
    import ray

    from pipeline.train.driver import run_training

    config = config.model_copy(deep=True)
    config.tracking.run_name = run_name
    # As cluster.session.ensure_ray does for the CLI, but always a new local instance, never a cluster in RAY_ADDRESS.
    ray.init(address="local", log_to_driver=True)
    try:
        return run_training(config).history
    finally:
        ray.shutdown()


def reference_command(config_file: Path, num_workers: int, output: Path | None = None) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(num_workers),
        "-m",
        "pipeline.bench.ddp_reference",
        "--config",
        str(config_file),
    ]
    return command + (["--output", str(output)] if output else [])


def run_reference(config_file: Path, num_workers: int, output: Path) -> dict:
    """`pipeline.bench.ddp_reference` under torchrun; returns rank 0's figures (see that module)."""
    output.unlink(missing_ok=True)
    completed = subprocess.run(reference_command(config_file, num_workers, output), check=False)
    if completed.returncode != 0 or not output.is_file():
        raise RuntimeError(
            f"the torchrun reference failed (exit status {completed.returncode}): "
            f"{shlex.join(reference_command(config_file, num_workers, output))}"
        )
    return json.loads(output.read_text())


def steady_state(epoch_images_per_second: list[float], warmup_epochs: int) -> float:
    """Images/s over the epochs after warm-up. Epochs hold equal image counts, so the harmonic mean of their
    rates is total images / total seconds."""
    steady = epoch_images_per_second[warmup_epochs:]
    if not steady:
        raise BenchmarkError(f"warmup_epochs = {warmup_epochs} leaves none of {len(epoch_images_per_second)} epochs")
    return harmonic_mean(steady)


def format_overhead_table(result: dict) -> str:
    first, last = result["warmup_epochs"] + 1, result["epochs"]
    lines = [
        f"Training throughput: {result['model']} at {result['image_size']} px, global batch {result['global_batch']}"
        f" ({result['num_workers']} x {result['per_worker_batch']}), {result['loader_workers']} loader process(es)"
        f" per worker, {result['images_per_epoch']} images per epoch; steady state = epochs {first}-{last}",
        f"{'round':>5}  {'first':<9}  {'reference img/s':>15}  {'ours img/s':>10}  {'ours/ref':>8}  "
        f"{'data wait ref/ours':>18}  {'load before ref/ours':>20}",
    ]
    for index, one in enumerate(result["rounds"], start=1):
        reference, ours = one["reference"], one["ours"]
        waits = [mean(side["epoch_data_wait_share"][first - 1 :]) for side in (reference, ours)]
        lines.append(
            f"{index:>5}  {one['first']:<9}  {reference['steady_images_per_second']:>15.1f}  "
            f"{ours['steady_images_per_second']:>10.1f}  {one['ratio']:>8.3f}  "
            f"{waits[0]:>10.0%} / {waits[1]:>4.0%}  "
            f"{reference['load_average_before']:>12.1f} / {ours['load_average_before']:>4.1f}"
        )
    lines += [
        f"ours/ref over {len(result['rounds'])} interleaved rounds: median {result['median_round_ratio']:.3f} "
        f"(min {result['round_ratio_min']:.3f}, max {result['round_ratio_max']:.3f}); target >= "
        f"{result['target_ratio']:.2f}: {'met' if result['meets_target'] else 'NOT met'}",
        f"{'best':>5}  {'':<9}  {result['reference_images_per_second']:>15.1f}  "
        f"{result['ours_images_per_second']:>10.1f}  {result['ratio']:>8.3f}  (fastest steady epoch of each path)",
        f"shortest steady state of a path in a round: {result['shortest_steady_seconds']:.1f} s"
        + (
            ""
            if result["shortest_steady_seconds"] >= MIN_STEADY_SECONDS
            else f" — below {MIN_STEADY_SECONDS:.0f} s: raise --train-images or --epochs for a ratio worth reading"
        ),
        f"load = 1-min load average on "
        f"{os.cpu_count()} CPUs; per-epoch train losses of the two paths "
        f"{'identical (same work)' if result['same_train_losses'] else 'DIFFER: the paths did not do the same work'}",
        f"reference: {result['reference_command']}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Shared with benchmark_startup: data, config, validation


def make_benchmark_shards(data_dir: Path, train_images: int) -> Path:
    """At least `train_images` generated JPEGs (plus a small val split) sharded by the project's sharder;
    reused when a previous call already wrote them."""
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder

    per_class = -(-train_images // CLASSES)  # ceiling division
    folder = Path(data_dir) / f"{CLASSES}x{per_class}-{SOURCE_WIDTH}x{SOURCE_HEIGHT}"
    shards = folder / "shards"
    if (shards / "train" / "manifest.json").is_file() and (shards / "val" / "manifest.json").is_file():
        return shards  # the sharder writes manifests last: present means complete
    source = generate_imagenet_folder(
        folder / "source",
        num_classes=CLASSES,
        train_per_class=per_class + VAL_PER_CLASS,
        val_per_class=0,
        width=SOURCE_WIDTH,
        height=SOURCE_HEIGHT,
        seed=0,
    )
    shard_imagenet(
        source, shards, val_per_class=VAL_PER_CLASS, samples_per_shard=SAMPLES_PER_SHARD, seed=0, progress=False
    )
    return shards


def images_per_epoch(shards: Path, global_batch: int) -> int:
    """Images trained per epoch: whole global batches (the plan leaves the remainder for later epochs)."""
    from pipeline.data.manifest import read_manifest

    return read_manifest(shards / "train").num_samples // global_batch * global_batch


def benchmark_overrides(
    shards: Path,
    store: Path,
    *,
    model: str,
    image_size: int,
    global_batch: int,
    epochs: int,
    num_workers: int,
    loader_workers: int,
    run_name: str,
) -> list[str]:
    """`--set` overrides on top of the default config; MLflow and Ray storage stay inside `store`."""
    return [
        f"data.root={shards}",
        f"data.train_image_size={image_size}",
        f"data.eval_image_size={image_size}",
        f"data.loader_workers={loader_workers}",
        f"model.name={model}",
        f"optim.batch_size={global_batch}",
        f"optim.epochs={epochs}",
        f"scaling.num_workers={num_workers}",
        "scaling.max_failures=0",  # a restarted worker group would be timed as if it were training
        f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.storage_path={store / 'ray'}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.registered_model={REGISTERED_MODEL}",
        f"tracking.run_name={run_name}",
    ]


def check_benchmark_arguments(
    model: str, image_size: int, global_batch: int, train_images: int, num_workers: int, loader_workers: int
) -> None:
    from pipeline.architectures import MIN_IMAGE_SIZE

    if model not in MODEL_NAMES:
        raise BenchmarkError(f"model = {model!r}: unknown model; choose one of {', '.join(MODEL_NAMES)}")
    check_positive(global_batch=global_batch, num_workers=num_workers)
    if image_size < max(16, MIN_IMAGE_SIZE[model]):
        raise BenchmarkError(f"image_size = {image_size}: {model} needs at least {max(16, MIN_IMAGE_SIZE[model])} px")
    if global_batch % num_workers:
        raise BenchmarkError(f"global_batch = {global_batch} is not divisible by num_workers = {num_workers}")
    if train_images < global_batch:
        raise BenchmarkError(f"train_images = {train_images} must be at least global_batch = {global_batch}")
    if loader_workers < 0:
        raise BenchmarkError(f"loader_workers = {loader_workers} must be >= 0 (0: load in the training process)")


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise BenchmarkError(f"{name} = {value} must be positive")
