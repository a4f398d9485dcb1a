"""The plain-PyTorch baseline of `imagenet-pipeline bench-train`: data-parallel training started by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m pipeline.bench.ddp_reference \
        --config data/bench_train/bench_config.yaml --output data/bench_train/reference.json

What a hand-written DDP script would do with the project's parts and nothing of Ray or MLflow: the same
config file, model builder (`build_model`), loader (`build_loader`, rank and world size from torchrun's
environment), optimiser and schedule (`build_optimizer`, `build_scheduler`) and global batch as
`pipeline.train.worker`, wrapped in `DistributedDataParallel` exactly as `ray.train.torch.prepare_model` does on
CPUs (no extra arguments; gloo). There is no evaluation or checkpointing: only training epochs are compared.

Each epoch's images/s is measured as `train_loop.train_one_epoch` measures `train/images_per_second`: valid
images summed over all ranks / rank 0's wall time from creating the epoch's DataLoader (its worker processes
start inside that time) to the last optimiser step. Rank 0 prints one line per epoch and writes every figure as
JSON to `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import Config, load_config
from pipeline.data.loader import IGNORE_LABEL, build_loader
from pipeline.data.transforms import normalize_batch
from pipeline.errors import BenchmarkError
from pipeline.train.models import build_model
from pipeline.train.optim import build_optimizer, build_scheduler, step_after_iteration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML config (the benchmark writes one)")
    parser.add_argument("--set", action="append", default=[], help="override a config key, e.g. optim.epochs=1")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for rank 0's figures (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    config = load_config([args.config], args.set)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    check_reference_config(config, world_size)
    if world_size > 1:
        dist.init_process_group("gloo")
    try:
        figures = train(config, rank, world_size)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=2))
    return figures


def check_reference_config(config: Config, world_size: int) -> None:
    """The baseline is CPU float32 DDP with the config's worker count; anything else is not comparable."""
    if world_size != config.scaling.world_size:
        raise BenchmarkError(
            f"scaling.num_workers = {config.scaling.num_workers} but torchrun started {world_size} processes; "
            f"run with --nproc_per_node {config.scaling.world_size}"
        )
    if config.scaling.use_gpu or config.scaling.mixed_precision in ("bf16", "fp16"):
        raise BenchmarkError(
            f"scaling.use_gpu = {config.scaling.use_gpu}, scaling.mixed_precision = "
            f"{config.scaling.mixed_precision!r}: the reference is the CPU float32 baseline; use use_gpu=false and "
            "mixed_precision auto or off"
        )


def train(config: Config, rank: int, world_size: int) -> dict:
    torch.manual_seed(config.seed + rank)  # as train_loop.setup_worker
    loader = build_loader(
        config.data,
        "train",
        rank=rank,
        world_size=world_size,
        batch_size=config.per_worker_batch_size,
        seed=config.seed,
    )
    model = build_model(config.model, loader.manifest.num_classes)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, len(loader))
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, label_smoothing=config.optim.label_smoothing)
    device = torch.device("cpu")

    epochs = []
    for epoch in range(config.optim.epochs):
        model.train()
        loader.set_epoch(epoch)
        totals = torch.zeros(2, dtype=torch.float64)  # valid images, loss sum
        waiting = 0.0
        started = tick = time.perf_counter()
        for batch in loader:
            waiting += time.perf_counter() - tick
            images = normalize_batch(batch.images, device)
            labels = batch.labels.to(device)
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
            optimizer.step()
            step_after_iteration(scheduler)  # no validation here: a plateau rate stays put
            valid = int((batch.labels != IGNORE_LABEL).sum())
            totals += torch.tensor([valid, loss.item() * valid], dtype=torch.float64)
            tick = time.perf_counter()
        elapsed = time.perf_counter() - started
        if world_size > 1:
            dist.all_reduce(totals)
        images_total, loss_sum = totals.tolist()
        epochs.append(
            {
                "epoch": epoch + 1,
                "images": int(images_total),
                "seconds": elapsed,
                "images_per_second": images_total / elapsed,
                "data_wait_share": waiting / elapsed,
                "loss": loss_sum / max(images_total, 1),
            }
        )
        if rank == 0:
            row = epochs[-1]
            print(
                f"[reference] epoch {epoch + 1}: {row['images_per_second']:.1f} images/s, loss {row['loss']:.4f}, "
                f"data wait {row['data_wait_share']:.0%}",
                flush=True,
            )
    return {
        "world_size": world_size,
        "per_worker_batch_size": config.per_worker_batch_size,
        "steps_per_epoch": len(loader),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "epochs": epochs,
    }


if __name__ == "__main__":
    main()
