"""bench-plan: how the loader's reads scale, simulated from synthetic manifests at ImageNet scale (no data is read).

    imagenet-pipeline bench-plan
    imagenet-pipeline bench-plan --datasets imagenet-1k --worlds 8,64 --loaders 2

For ImageNet-1k (1,281,167 train samples in 1,282 shards, 50,000 val in 50) and ImageNet-22k (14,197,122 in
14,198 shards of 1,000), for each world size and loader-process count, the exact plans of every rank's loader
processes (`pipeline.data.plan`, the loader's own) give:
- bytes read ÷ bytes planned for a train epoch and a val pass, without a sample index (a segment in the middle of
  a shard is read from the shard's start and skipped to) and with one (`pipeline.data.index`: only the segment's
  own bytes). Samples are taken as equal-sized, so bytes are sample counts; the index's extra cost, one header
  read per segment, is below 0.01 %;
- plan time per rank (all its loader processes, one epoch), median over the ranks timed;
- the manifest's size and load time (`read_manifest`), written as `shard` writes it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.manifest import ClassInfo, Manifest, ShardInfo, read_manifest, write_manifest
from pipeline.data.plan import WorkerPlan, plan_eval_worker, plan_train_worker

SAMPLES_PER_SHARD = 1000
DATASETS = {  # train samples, val samples, classes
    "imagenet-1k": (1_281_167, 50_000, 1000),
    "imagenet-22k": (14_197_122, 50_000, 21_841),
}
BATCH_PER_RANK = 32
TIMED_RANKS = 16  # plan time is the median over this many ranks spread over the world


@dataclass
class PlanFigure:
    dataset: str
    world_size: int
    loaders: int
    train_read_ratio_sequential: float
    train_read_ratio_indexed: float
    val_read_ratio_sequential: float
    val_read_ratio_indexed: float
    plan_ms_per_rank: float


def shard_counts(samples: int) -> list[int]:
    """`shard`'s layout: full shards of SAMPLES_PER_SHARD, the last one shorter."""
    full, rest = divmod(samples, SAMPLES_PER_SHARD)
    return [SAMPLES_PER_SHARD] * full + ([rest] if rest else [])


def read_ratios(plans: list[WorkerPlan]) -> tuple[float, float]:
    """(sequential, indexed) samples read ÷ samples planned over `plans`."""
    planned = sum(segment.length for plan in plans for segment in plan.segments)
    sequential = sum(segment.stop for plan in plans for segment in plan.segments)
    return sequential / planned, 1.0  # with the index a segment reads exactly its own samples


def measure(dataset: str, world_size: int, loaders: int) -> PlanFigure:
    train_samples, val_samples, _ = DATASETS[dataset]
    train, val = shard_counts(train_samples), shard_counts(val_samples)
    train_plans, val_plans, timings = [], [], []
    timed = set(range(0, world_size, max(1, world_size // TIMED_RANKS)))
    for rank in range(world_size):
        started = time.perf_counter()
        for worker in range(loaders):
            train_plans.append(
                plan_train_worker(
                    train,
                    world_size=world_size,
                    rank=rank,
                    batch_size=BATCH_PER_RANK,
                    seed=0,
                    epoch=1,
                    worker=worker,
                    num_workers=loaders,
                )
            )
        if rank in timed:
            timings.append(time.perf_counter() - started)
        for worker in range(loaders):
            val_plans.append(
                plan_eval_worker(
                    val, world_size=world_size, rank=rank, batch_size=BATCH_PER_RANK, worker=worker, num_workers=loaders
                )
            )
    train_sequential, train_indexed = read_ratios(train_plans)
    val_sequential, val_indexed = read_ratios(val_plans)
    return PlanFigure(
        dataset,
        world_size,
        loaders,
        train_sequential,
        train_indexed,
        val_sequential,
        val_indexed,
        1000 * statistics.median(timings),
    )


def manifest_figures(dataset: str, rounds: int = 3) -> tuple[int, float]:
    """(bytes, median load ms) of the dataset's train manifest as `shard` writes it (with sample indexes)."""
    samples, _, classes = DATASETS[dataset]
    manifest = Manifest(
        split="train",
        classes=[ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(classes)],
        shards=[
            ShardInfo(f"train-{i:06d}.tar", count, "0" * 64, count * 110_000, "1" * 64)
            for i, count in enumerate(shard_counts(samples))
        ],
    )
    with tempfile.TemporaryDirectory() as scratch:
        path = write_manifest(manifest, scratch)
        timings = []
        for _ in range(rounds):
            started = time.perf_counter()
            read_manifest(scratch)
            timings.append(time.perf_counter() - started)
        return path.stat().st_size, 1000 * statistics.median(timings)


def run_plan_benchmark(
    datasets: tuple[str, ...], worlds: tuple[int, ...], loaders: tuple[int, ...], out: Path | None = None
) -> list[PlanFigure]:
    figures = []
    print(
        f"{'dataset':13s} {'world':>5s} {'loaders':>7s}  {'train read/planned':>21s}  {'val read/planned':>21s}  "
        f"{'plan ms/rank':>12s}"
    )
    print(f"{'':13s} {'':>5s} {'':>7s}  {'no index':>10s} {'index':>10s}  {'no index':>10s} {'index':>10s}")
    for dataset in datasets:
        for world in worlds:
            for count in loaders:
                figure = measure(dataset, world, count)
                figures.append(figure)
                print(
                    f"{dataset:13s} {world:5d} {count:7d}  {figure.train_read_ratio_sequential:10.3f} "
                    f"{figure.train_read_ratio_indexed:10.3f}  {figure.val_read_ratio_sequential:10.3f} "
                    f"{figure.val_read_ratio_indexed:10.3f}  {figure.plan_ms_per_rank:12.1f}",
                    flush=True,
                )
    manifests = {}
    for dataset in datasets:
        size, load_ms = manifest_figures(dataset)
        manifests[dataset] = {"bytes": size, "load_ms": load_ms}
        print(f"{dataset} train manifest: {size / 1e6:.2f} MB, read_manifest {load_ms:.0f} ms (median of 3)")
    if out is not None:
        out.write_text(
            json.dumps({"figures": [figure.__dict__ for figure in figures], "manifests": manifests}, indent=1)
        )
    return figures
