"""The per-worker training function Ray Train runs on every worker (or in-process in local mode).

It reads as the story of a run: set up the worker, build the loaders and the model, restore the
latest checkpoint, then for each epoch train, evaluate, report (metrics + checkpoint) and decide
whether to stop early. The Ray calls are `ray.train.get_context/get_checkpoint/report` and
`ray.train.torch.prepare_model`/`get_device`; everything else is plain PyTorch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import metrics as m
from pipeline import run_storage
from pipeline.checkpoints import TrainingState, check_compatible, checkpoint_meta, load_checkpoint, read_meta, save_checkpoint
from pipeline.config import Config, validate_config
from pipeline.loader import IGNORE_LABEL, EpochLoader, build_loader
from pipeline.models import build_model
from pipeline.optim import build_optimizer, build_scheduler, step_after_iteration, step_after_validation
from pipeline.progress import EpochTable, RankLogger
from pipeline.tracking import WORKER_NODES_TAG, WorkerTracker
from pipeline.transforms import normalize_batch


@dataclass
class Worker:
    """Where this process sits in the job and what it computes with."""

    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool


def train_worker(loop_config: dict[str, Any]) -> None:
    config = validate_config(loop_config["config"])
    worker = setup_worker(config)
    log = RankLogger(worker.rank)
    record_placement_group(worker, loop_config.get("placement_group_file"))
    nodes = worker_node_ids(worker)
    train_loader, val_loader = build_loaders(config, worker)
    manifest = train_loader.manifest
    # On its device before the optimiser exists: restored momentum buffers then land on the same device.
    model = to_device(build_model(config.model, manifest.num_classes), worker)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if worker.autocast_dtype == torch.float16 else None
    state = restore(config, model, optimizer, scheduler, scaler, manifest.num_classes, log)
    torch.manual_seed(config.seed + 1000 * state.epoch + worker.rank)  # ranks differ again after a resume
    if config.optim.patience and state.epochs_without_improvement >= config.optim.patience:
        log.info(f"this run already stopped early after epoch {state.epoch}; nothing to do")
        return  # every rank restored the same state, so every rank returns here
    model = wrap(model, worker, config.scaling.compile)
    tracker = WorkerTracker.for_rank(worker.rank, loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri"))
    table = EpochTable(log)
    meta = checkpoint_meta(loop_config["config"], manifest.num_classes, manifest.content_hash())
    log.info(
        f"world size {worker.world_size}, device {worker.device}, global batch {config.optim.batch_size} "
        f"= {worker.world_size} x {config.per_worker_batch_size}, {len(train_loader)} steps per epoch, "
        f"on {len(set(nodes))} node(s)"
    )
    with tracker:
        tracker.set_tags({WORKER_NODES_TAG: ",".join(nodes)})
        for epoch in range(state.epoch, config.optim.epochs):
            train_metrics = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, config, worker, epoch, state)
            val_metrics = evaluate(unwrap(model), val_loader, worker, prefix="val")
            step_after_validation(scheduler, val_metrics[m.SELECTION_METRIC])  # before the checkpoint saves it
            epoch_metrics = {m.EPOCH: epoch + 1, **train_metrics, **val_metrics}
            stop = update_early_stopping(state, epoch_metrics, config.optim.patience)
            report(epoch_metrics, model, optimizer, scheduler, scaler, state, meta, worker,
                   loop_config.get("local_checkpoint_root"))
            tracker.log_epoch(epoch_metrics)
            table.row(epoch_metrics)
            if stop:
                log.info(f"early stop: {m.SELECTION_METRIC} has not improved for {config.optim.patience} epochs")
                break


def setup_worker(config: Config) -> Worker:
    # Ray Train logs every report at INFO on each worker (its logger is named after its file path);
    # the epoch table says the same in one line.
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    precision = config.scaling.mixed_precision
    dtype = None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    elif precision == "fp16":
        dtype = torch.float16
    torch.manual_seed(config.seed + context.get_world_rank())
    return Worker(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=device,
        autocast_dtype=dtype, channels_last=config.scaling.channels_last and device.type == "cuda",
    )


def record_placement_group(worker: Worker, path: str | None) -> None:
    """Write the worker group's placement group id where the sweep driver can release it.

    Ray 2.60 can leave a Ray Train placement group reserved after a Tune trial ends (ray#54305);
    the sweep driver removes it when Tune reports the trial finished or stopped.
    """
    group = ray.util.get_current_placement_group()
    if worker.rank == 0 and path and group is not None:
        try:
            run_storage.write_text(path, group.id.hex())
        except ValueError as error:  # bookkeeping: a storage hiccup must not fail the training run
            logging.getLogger(__name__).warning("placement group id not recorded (%s); the sweep cannot free it", error)


def worker_node_ids(worker: Worker) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: all ranks call it)."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if worker.world_size == 1 or not dist.is_initialized():
        return [node]
    nodes: list[Any] = [None] * worker.world_size
    dist.all_gather_object(nodes, node)
    return nodes


def build_loaders(config: Config, worker: Worker) -> tuple[EpochLoader, EpochLoader]:
    common = dict(rank=worker.rank, world_size=worker.world_size, batch_size=config.per_worker_batch_size,
                  seed=config.seed, pin_memory=worker.device.type == "cuda")
    return build_loader(config.data, "train", **common), build_loader(config.data, "val", **common)


def restore(config, model, optimizer, scheduler, scaler, num_classes: int, log: RankLogger) -> TrainingState:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainingState()
    with checkpoint.as_directory() as directory:
        check_compatible(read_meta(Path(directory)), config.model.name, num_classes, f"checkpoint {checkpoint.path}")
        state = load_checkpoint(Path(directory), model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    log.info(f"resumed from {checkpoint.path} after epoch {state.epoch}")
    return state


def to_device(model: torch.nn.Module, worker: Worker) -> torch.nn.Module:
    model = model.to(worker.device)
    return model.to(memory_format=torch.channels_last) if worker.channels_last else model


def wrap(model: torch.nn.Module, worker: Worker, compile_model: bool) -> torch.nn.Module:
    if worker.world_size > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP: gloo on CPUs, NCCL on GPUs
    return torch.compile(model) if compile_model else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Evaluation runs the plain module: no DDP collectives, so ranks never wait on each other mid-pass.
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(worker: Worker):
    if worker.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=worker.device.type, dtype=worker.autocast_dtype)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, config: Config, worker: Worker,
                    epoch: int, state: TrainingState) -> dict[str, float]:
    model.train()
    loader.set_epoch(epoch)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, label_smoothing=config.optim.label_smoothing)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, valid samples, corrupt samples
    waiting = 0.0
    started = tick = time.perf_counter()
    for batch in loader:
        waiting += time.perf_counter() - tick
        images = normalize_batch(batch.images, worker.device, channels_last=worker.channels_last)
        labels = batch.labels.to(worker.device, non_blocking=True)
        with autocast(worker):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step_after_iteration(scheduler)
        state.global_step += 1
        if state.global_step == 1:  # `imagenet-pipeline bench-train` times start-up from this line
            RankLogger(worker.rank).info(f"first training step finished at unix time {time.time():.3f}")
        valid = int((batch.labels != IGNORE_LABEL).sum())
        if valid:  # an all-masked batch gives a NaN loss that must not reach the average
            totals += torch.tensor([loss.item() * valid, valid, int(batch.corrupt)], dtype=torch.float64)
        else:
            totals[2] += int(batch.corrupt)
        tick = time.perf_counter()
    elapsed = time.perf_counter() - started
    loss_sum, count, corrupt = all_reduce(totals, worker).tolist()
    return {
        m.TRAIN_LOSS: loss_sum / max(count, 1),
        m.TRAIN_LR: optimizer.param_groups[0]["lr"],
        m.TRAIN_IMAGES_PER_SECOND: count / elapsed,
        m.TRAIN_DATA_WAIT_SHARE: waiting / elapsed,
        m.TRAIN_CORRUPT_SAMPLES: corrupt,
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: EpochLoader, worker: Worker, prefix: str) -> dict[str, float]:
    """Exact top-1/top-5: counts from every rank are summed before dividing."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction="sum")
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, valid samples, top-1, top-5, corrupt
    for batch in loader:
        images = normalize_batch(batch.images, worker.device, channels_last=worker.channels_last)
        labels = batch.labels.to(worker.device)
        with autocast(worker):
            logits = model(images).float()
        top1, top5 = m.topk_correct(logits, labels)
        valid = int((labels != IGNORE_LABEL).sum())
        loss = criterion(logits, labels).item() if valid else 0.0
        totals += torch.tensor([loss, valid, top1, top5, int(batch.corrupt)], dtype=torch.float64)
    loss_sum, count, top1, top5, corrupt = all_reduce(totals, worker).tolist()
    count = max(count, 1)
    return {
        f"{prefix}/loss": loss_sum / count,
        f"{prefix}/top1": 100.0 * top1 / count,
        f"{prefix}/top5": 100.0 * top5 / count,
        f"{prefix}/corrupt_samples": corrupt,
    }


def all_reduce(totals: torch.Tensor, worker: Worker) -> torch.Tensor:
    if worker.world_size > 1 and dist.is_initialized():
        reduced = totals.to(worker.device)  # NCCL reduces device tensors only
        dist.all_reduce(reduced)
        return reduced.cpu()
    return totals


def update_early_stopping(state: TrainingState, epoch_metrics: dict[str, float], patience: int | None) -> bool:
    """Stop when validation accuracy has not improved for `patience` epochs (the val curve turned)."""
    score = epoch_metrics[m.SELECTION_METRIC]
    state.epoch = int(epoch_metrics[m.EPOCH])
    state.history.append(dict(epoch_metrics))
    if state.best_metric is None or score > state.best_metric:
        state.best_metric, state.epochs_without_improvement = score, 0
    else:
        state.epochs_without_improvement += 1
    return patience is not None and state.epochs_without_improvement >= patience


def report(epoch_metrics, model, optimizer, scheduler, scaler, state, meta, worker: Worker,
           local_checkpoint_root: str | None) -> None:
    """Every rank calls report (it is a barrier); only rank 0 hands over a checkpoint.

    Ray copies a reported directory to storage; local mode (num_workers=0) keeps only a reference,
    so there the checkpoint is written straight into the run's storage folder instead.
    """
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None
        if worker.rank == 0:
            directory = Path(scratch)
            if local_checkpoint_root:
                directory = Path(local_checkpoint_root) / f"checkpoint_epoch_{state.epoch:04d}"
                directory.mkdir(parents=True, exist_ok=True)
            save_checkpoint(directory, model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, state=state, meta=meta)
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        ray.train.report(epoch_metrics, checkpoint=checkpoint)
