"""The per-step training and evaluation code: plain PyTorch, no Ray and no MLflow.

This is what a GPU box with only PyTorch installed runs (benchmarks, debugging), and what `evaluate` uses for
held-out splits. Distribution enters only through `torch.distributed`: counts are summed across ranks when a
process group exists.

    rank = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)
    trainee = Trainee.build(model, config.optim, len(loader), rank)
    for _ in range(config.optim.epochs):
        train_metrics = train_one_epoch(trainee, loader, config, rank)
        val_metrics = evaluate(trainee.model, val_loader, rank, prefix="val")
        record_epoch(trainee.state, {**train_metrics, **val_metrics})
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from pipeline import events
from pipeline import metrics as m
from pipeline.config import Config, OptimConfig
from pipeline.data.loader import IGNORE_LABEL, EpochLoader
from pipeline.data.transforms import normalize_batch
from pipeline.errors import DataError
from pipeline.train.checkpoints import TrainingState
from pipeline.train.optim import build_optimizer, build_scheduler, step_after_iteration


@dataclass(frozen=True)
class RankDevice:
    """Where this process sits in the job (its Ray Train rank) and what it computes with."""

    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    local_rank: int = 0  # on its node: local rank 0 records the node's system metrics
    node_rank: int = 0
    # A gloo group for the per-step sample counts when the default group is NCCL: counts known on the host are
    # summed on the host, so no step waits for the device. None: the default group already runs on CPUs.
    host_group: Any = None


# Called after every optimizer step with (global step, rank's mean loss of the step as a 0-d float64 tensor on
# the device, lr, images in the global batch); reading the loss is the hook's choice, made at its own interval
# (pipeline.tracking.step_log.StepLog), so the step itself never waits for the device.
StepHook = Callable[[int, torch.Tensor, float, int], None]
# Called every tracking.checkpoint_every_steps steps within an epoch, on every rank at the same step, with the
# training state saying where the epoch stands (`step_in_epoch`, `partial_epoch`): it writes the checkpoint.
CheckpointHook = Callable[[], None]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`scaling.mixed_precision` as a dtype: auto is bf16 on GPUs that support it, full precision elsewhere."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else None


def grad_scaler(rank: RankDevice) -> torch.amp.GradScaler:
    """A loss scaler that is a no-op except in fp16, so the step has no branches for it."""
    return torch.amp.GradScaler(rank.device.type, enabled=rank.autocast_dtype == torch.float16)


@dataclass
class Trainee:
    """What one rank trains, and all that a checkpoint saves and a resume restores with it: the model, its
    optimiser, learning-rate schedule and loss scaler, and the run's state (epoch, step, history, best score).
    Built once per rank and handed around whole; the worker swaps in the wrapped model and the restored state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler  # per step, or plateau's per epoch: pipeline.train.optim
    scaler: torch.amp.GradScaler
    state: TrainingState = field(default_factory=TrainingState)

    @classmethod
    def build(cls, model: torch.nn.Module, optim: OptimConfig, steps_per_epoch: int, rank: RankDevice) -> Trainee:
        """A fresh run of `model` (already on its device, so restored optimiser buffers land there too): the
        configured optimiser and schedule, the loss scaler the precision needs, and a state at step 0."""
        optimizer = build_optimizer(model, optim)
        return cls(model, optimizer, build_scheduler(optimizer, optim, steps_per_epoch), grad_scaler(rank))


def autocast(rank: RankDevice):
    if rank.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=rank.device.type, dtype=rank.autocast_dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Evaluation and checkpoints use the plain module: no DDP collectives, so ranks never wait on each other mid-pass.
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_one_epoch(
    trainee: Trainee,
    loader: EpochLoader,
    config: Config,
    rank: RankDevice,
    on_step: StepHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> dict[str, float]:
    """Epoch `trainee.state.epoch` (counted from 0), or its rest when the state comes from a checkpoint taken
    within it (`state.step_in_epoch` > 0): the loader then starts at that step and the epoch's sums start from the
    checkpoint's, so the epoch's metrics are those of an uninterrupted one. The caller counts the epoch done
    (`record_epoch`)."""
    model, optimizer, state = trainee.model, trainee.optimizer, trainee.state
    model.train()
    resumed_at = state.step_in_epoch
    loader.set_epoch(state.epoch, start_step=resumed_at)
    criterion = torch.nn.CrossEntropyLoss(
        ignore_index=IGNORE_LABEL, label_smoothing=config.optim.label_smoothing, reduction="sum"
    )
    # The loss sum stays on the device (read once, at the end); sample counts come from the host-side labels.
    # Carried sums are all ranks' together, so rank 0 alone starts from them.
    carried = state.partial_epoch if resumed_at and state.partial_epoch else [0.0, 0.0, 0.0]
    own = carried if rank.rank == 0 else [0.0, 0.0, 0.0]
    loss_sum = torch.tensor(own[0], dtype=torch.float64, device=rank.device)
    counts = torch.tensor(own[1:], dtype=torch.float64)  # valid samples, corrupt samples
    every = config.tracking.checkpoint_every_steps if on_checkpoint is not None else None
    steps = len(loader) if every else 0  # the epoch's last step is an epoch-end checkpoint anyway
    waiting = 0.0
    started = tick = time.perf_counter()
    for batch in loader:
        waiting += time.perf_counter() - tick
        images = normalize_batch(batch.images, rank.device, channels_last=rank.channels_last)
        labels = batch.labels.to(rank.device, non_blocking=True)
        valid = int((batch.labels != IGNORE_LABEL).sum())
        global_valid = valid_in_global_batch(valid, rank)
        if global_valid:  # an all-masked global batch makes no step on any rank (momentum and decay included)
            with autocast(rank):
                # Summed over this rank's valid samples and divided by the global batch's valid count (DDP then
                # averages over ranks, hence the world size): the exact mean over every valid sample, as one
                # process would compute it, however the masked slots fall across ranks.
                loss = criterion(model(images), labels) * (rank.world_size / global_valid)
            optimizer_step(trainee, loss, config.optim.grad_clip_norm)
            rank_loss_sum = loss.detach().double() * global_valid / rank.world_size
            loss_sum += rank_loss_sum
            counts += torch.tensor([valid, batch.corrupt], dtype=torch.float64)
            if on_step is not None:
                on_step(
                    state.global_step + 1, rank_loss_sum / max(valid, 1), optimizer.param_groups[0]["lr"], global_valid
                )
        else:
            counts[1] += batch.corrupt
        step_after_iteration(trainee.scheduler)
        events.record_batch(rank.rank, state.epoch, state.step_in_epoch, batch.keys)
        state.global_step += 1
        state.step_in_epoch += 1
        if state.global_step == 1:
            events.record("first_step", rank=rank.rank)
        if every and state.step_in_epoch % every == 0 and state.step_in_epoch < steps:
            # The epoch's sums so far, all ranks together (a collective at the same step on every rank).
            state.partial_epoch = all_reduce(torch.cat([loss_sum.cpu().view(1), counts]), rank).tolist()
            on_checkpoint()
        tick = time.perf_counter()
    state.step_in_epoch, state.partial_epoch = 0, []
    totals = torch.cat([loss_sum.cpu().view(1), counts])  # the epoch's one wait for the device
    elapsed = time.perf_counter() - started
    loss_sum, count, corrupt = all_reduce(totals, rank).tolist()
    return {
        m.TRAIN_LOSS: loss_sum / max(count, 1),
        m.TRAIN_LR: optimizer.param_groups[0]["lr"],
        m.TRAIN_IMAGES_PER_SECOND: (count - carried[1]) / elapsed,  # this pass's images only
        m.TRAIN_DATA_WAIT_SHARE: waiting / elapsed,
        m.TRAIN_CORRUPT_SAMPLES: corrupt,
    }


def optimizer_step(trainee: Trainee, loss: torch.Tensor, grad_clip_norm: float | None) -> None:
    """Backward and one optimiser step through the loss scaler (a no-op but in fp16), gradients clipped first."""
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.scaler.scale(loss).backward()  # every rank runs backward: DDP's gradient all-reduce needs them all
    trainee.scaler.unscale_(trainee.optimizer)  # clipping sees true gradient norms
    if grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), grad_clip_norm)
    trainee.scaler.step(trainee.optimizer)
    trainee.scaler.update()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: EpochLoader,
    rank: RankDevice,
    prefix: str,
    features: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Exact top-1/top-5: counts from every rank are summed before dividing.

    A model that also returns features (`pipeline.features.extract.with_features`) has the valid samples'
    (features, labels) appended to `features`, so scoring and embedding share one pass.
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction="sum")
    scores = torch.zeros(3, dtype=torch.float64, device=rank.device)  # loss sum, top-1, top-5: read at the end
    counts = torch.zeros(2, dtype=torch.float64)  # valid samples, corrupt: from the host-side labels
    for batch in loader:
        images = normalize_batch(batch.images, rank.device, channels_last=rank.channels_last)
        labels = batch.labels.to(rank.device, non_blocking=True)
        with autocast(rank):
            output = model(images)
        logits = (output[0] if isinstance(output, tuple) else output).float()
        if features is not None and isinstance(output, tuple):
            valid_slots = batch.labels >= 0
            features.append((output[1][valid_slots.to(rank.device)].cpu(), batch.labels[valid_slots]))
        valid = int((batch.labels != IGNORE_LABEL).sum())
        if valid:  # a sum over no sample would still be a kernel; skip it
            scores += torch.cat([criterion(logits, labels).double().view(1), m.topk_hits(logits, labels).double()])
        counts += torch.tensor([valid, int(batch.corrupt)], dtype=torch.float64)
    totals = torch.cat([scores.cpu(), counts])
    loss_sum, top1, top5, count, corrupt = all_reduce(totals, rank).tolist()
    if count == 0:  # every rank sees the same summed count, so every rank raises
        raise DataError(
            f"the {prefix} pass read no valid sample ({int(corrupt)} corrupt or unreadable); a pass "
            "with no valid samples has no score: check that its shards are readable (see the warnings "
            "above, one per shard)"
        )
    return {
        f"{prefix}/loss": loss_sum / count,
        f"{prefix}/top1": 100.0 * top1 / count,
        f"{prefix}/top5": 100.0 * top5 / count,
        f"{prefix}/corrupt_samples": corrupt,
    }


def broadcast_buffers_from_rank0(model: torch.nn.Module, rank: RankDevice) -> None:
    """BatchNorm running statistics drift apart across ranks within an epoch (each rank updates them from its own
    batches); rank 0's are the ones saved, so every rank evaluates with those and the val score is the checkpoint's."""
    if rank.world_size > 1 and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer.data, src=0)


def check_corrupt_share(
    epoch_metrics: dict[str, float], max_fraction: float, loaders: dict[str, EpochLoader], rank: RankDevice
) -> None:
    """Masked samples are counted and logged; beyond `max_fraction` of a pass they stop the run, since the epoch's
    figures would then describe whatever could be read, not the data set. The error names the shards."""
    for split, loader in loaders.items():
        corrupt = epoch_metrics[f"{split}/corrupt_samples"]
        planned = (
            len(loader) * loader.dataset.batch_size * rank.world_size
            if split == "train"
            else loader.manifest.num_samples
        )
        share = corrupt / max(planned, 1)
        if share <= max_fraction:
            continue
        # The summed count is the same on every rank, so every rank joins this reduction or none does.
        counts = all_reduce(loader.corrupt_counts.clone(), rank)
        worst = sorted(
            ((int(n), loader.manifest.shards[i].name) for i, n in enumerate(counts.tolist()) if n), reverse=True
        )
        named = ", ".join(f"{name} ({n})" for n, name in worst[:5]) + (
            f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        )
        # A pass resumed within its epoch counts by shard only what this attempt read; the sum includes before.
        named = named or "none in the steps since the resume within this epoch"
        raise DataError(
            f"epoch {int(epoch_metrics[m.EPOCH])}: {int(corrupt)} of {planned} {split} samples ({share:.2%}) could "
            f"not be read or decoded, above data.max_corrupt_fraction = {max_fraction}; bad shards: {named} "
            "(check them with `imagenet-pipeline verify`)"
        )


def valid_in_global_batch(valid: int, rank: RankDevice) -> int:
    """Valid samples in this step's global batch: every rank must agree whether to step, and by how much to scale.

    Summed on the host (gloo): with NCCL, a device all-reduce read back with `.item()` would make every step
    wait until the device has finished all the work queued before it."""
    if rank.world_size > 1 and dist.is_initialized():
        count = torch.tensor([valid], dtype=torch.int64)
        dist.all_reduce(count, group=rank.host_group)
        return int(count)
    return valid


def all_reduce(totals: torch.Tensor, rank: RankDevice) -> torch.Tensor:
    if rank.world_size > 1 and dist.is_initialized():
        reduced = totals.to(rank.device)  # NCCL reduces device tensors only
        dist.all_reduce(reduced)
        return reduced.cpu()
    return totals


def record_epoch(state: TrainingState, epoch_metrics: dict[str, float]) -> None:
    """The epoch is over: the state counts it and keeps its metrics (the run's history, saved in each checkpoint)."""
    state.epoch += 1
    state.history.append(dict(epoch_metrics))


def track_best_score(state: TrainingState, epoch_metrics: dict[str, float]) -> None:
    """A new best val top-1 resets the count of epochs without improvement; any other score adds one. A refit has
    no validation and changes neither."""
    if m.SELECTION_METRIC not in epoch_metrics:
        return
    score = epoch_metrics[m.SELECTION_METRIC]
    if state.best_metric is None or score > state.best_metric:
        state.best_metric, state.epochs_without_improvement = score, 0
    else:
        state.epochs_without_improvement += 1


def patience_ran_out(state: TrainingState, patience: int | None) -> bool:
    """Early stopping: val top-1 has not improved for `patience` epochs (the val curve turned). None: never."""
    return patience is not None and state.epochs_without_improvement >= patience
