"""The function Ray Train runs on every worker (or in-process in local mode): the story of one rank's run.

Set up the rank, build the loaders and the trainee (model, optimiser, schedule, loss scaler and state), restore
the latest checkpoint into it, then for each epoch: train, validate, step the plateau schedule, record the epoch and
its score, report (metrics + checkpoint) and stop early when patience ran out. The Ray calls are here
(`ray.train.get_context/get_checkpoint/report`, `ray.train.torch.prepare_model/get_device`); the per-step work is
plain PyTorch in `pipeline.train.step`. Workers receive the typed `Config` and a `RunWiring`; nothing else.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import events
from pipeline import metrics as m
from pipeline.config import Config
from pipeline.data.loader import EpochLoader, build_loader
from pipeline.errors import ConfigError
from pipeline.features.extract import embed_pass, with_features
from pipeline.features.quality import distributed_knn_top1
from pipeline.tracking.runs import WORKER_NODES_TAG, WorkerTracker, steps_between_logs
from pipeline.train.checkpoints import (
    TrainingState,
    check_compatible,
    checkpoint_meta,
    load_checkpoint,
    read_meta,
    restore_newest_sound,
    rng_state,
    save_checkpoint,
)
from pipeline.train.models import build_model
from pipeline.train.optim import step_after_validation
from pipeline.train.progress import EpochTable, RankLogger
from pipeline.train.step import (
    RankDevice,
    Trainee,
    autocast_dtype,
    broadcast_buffers_from_rank0,
    check_corrupt_share,
    evaluate,
    patience_ran_out,
    record_epoch,
    track_best_score,
    train_one_epoch,
    unwrap,
)
from pipeline.upstream import ray_54305, ray_train_report_log


@dataclass(frozen=True)
class RunWiring:
    """What a worker needs beyond the config: where its run is tracked and where its files go."""

    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    # Local mode (num_workers=0, for tests and debugging): Ray keeps no checkpoint copy, so rank 0 writes here.
    local_checkpoint_root: str | None = None
    placement_group_note: str | None = None  # sweeps only: see pipeline.upstream.ray_54305
    # Sweeps only: a resumed trial that had already finished reports its last epoch again, since the sweep's
    # driver may have died between that epoch's checkpoint and Tune recording it.
    report_finished_run: bool = False
    events_file: str | None = None  # the driver's pipeline.events file, if it records one
    sample_log: str | None = None  # the driver's pipeline.events sample log (keys per step), if it keeps one


def train_worker(loop_config: dict[str, Any]) -> None:
    config: Config = loop_config["config"]
    wiring: RunWiring = loop_config.get("wiring") or RunWiring()
    events.use_file(wiring.events_file, wiring.sample_log)
    rank = setup_rank(config)
    log = RankLogger(rank.rank)
    ray_54305.record_placement_group(rank.rank, wiring.placement_group_note)
    nodes = worker_node_ids(rank)
    train_loader, val_loader = build_loaders(config, rank)
    manifest, steps_per_epoch = train_loader.manifest, len(train_loader)
    # On its device before the optimiser exists: restored momentum buffers then land on the same device.
    model = to_device(build_model(config.model, manifest.num_classes), rank)
    trainee = Trainee.build(model, config.optim, steps_per_epoch, rank)
    restore(trainee, config, manifest.num_classes, steps_per_epoch, rank, log)
    if already_finished(config, trainee.state):
        log.info(f"this run already finished after epoch {trainee.state.epoch}; nothing left to train")
        if wiring.report_finished_run:
            report_recorded_end(trainee.state, rank)
        return  # every rank restored the same state, so every rank returns here
    trainee.model = wrap(trainee.model, rank, config.scaling.compile)
    tracker = worker_tracker(config, wiring, rank, steps_per_epoch)
    table = EpochTable(log)
    meta = checkpoint_meta(config, manifest.num_classes, manifest.content_hash())
    loaders = {"train": train_loader, **({"val": val_loader} if val_loader else {})}
    log.info(
        f"world size {rank.world_size}, device {rank.device}, global batch {config.optim.batch_size} "
        f"= {rank.world_size} x {config.per_worker_batch_size}, {steps_per_epoch} steps per epoch, "
        f"on {len(set(nodes))} node(s)"
    )
    events.record("loop_ready", rank=rank.rank)
    with tracker:
        tracker.set_tags({WORKER_NODES_TAG: ",".join(nodes)})
        tracker.log_missing_epochs(trainee.state.history)
        step_log = tracker.step_hook()

        def checkpoint_within_epoch() -> None:
            if step_log is not None:
                # MLflow holds every step up to the checkpoint's: a resume from it logs only later ones.
                step_log.flush(wait=True)
            report_within_epoch(trainee, meta, rank, wiring.local_checkpoint_root)

        for epoch in range(trainee.state.epoch, config.optim.epochs):
            train_metrics = train_one_epoch(trainee, train_loader, config, rank, step_log, checkpoint_within_epoch)
            if step_log is not None:
                step_log.flush()
            broadcast_buffers_from_rank0(trainee.model, rank)  # the score is the saved (rank 0's) weights' score
            val_metrics = validate(trainee.model, val_loader, config, rank, epoch, manifest.num_classes)
            # After validation and before the checkpoint saves the schedule: a resume continues the stepped one.
            step_after_validation(trainee.scheduler, val_metrics)
            epoch_metrics = {m.EPOCH: epoch + 1, **train_metrics, **val_metrics}
            check_corrupt_share(epoch_metrics, config.data.max_corrupt_fraction, loaders, rank)
            record_epoch(trainee.state, epoch_metrics)
            track_best_score(trainee.state, epoch_metrics)
            stop = patience_ran_out(trainee.state, config.optim.patience)
            report(epoch_metrics, trainee, meta, rank, wiring.local_checkpoint_root, stopped_early=stop)
            tracker.log_epoch(epoch_metrics)
            table.row(epoch_metrics)
            events.record("epoch_end", rank=rank.rank, epoch=epoch + 1)
            if stop:
                log.info(f"early stop: {m.SELECTION_METRIC} has not improved for {config.optim.patience} epochs")
                break


def already_finished(config: Config, state: TrainingState) -> bool:
    """Every epoch trained, or stopped early by patience: a resume has nothing left to do."""
    return patience_ran_out(state, config.optim.patience) or state.epoch >= config.optim.epochs


def report_recorded_end(state: TrainingState, rank: RankDevice) -> None:
    """The last recorded epoch and the checkpoint it was restored from, reported once more (Ray copies it to a
    new checkpoint of the same epoch; `read_run_record` counts the epoch once)."""
    checkpoint = ray.train.get_checkpoint() if rank.rank == 0 else None
    ray.train.report(dict(state.history[-1]), checkpoint=checkpoint)


def validate(
    model: torch.nn.Module,
    val_loader: EpochLoader | None,
    config: Config,
    rank: RankDevice,
    epoch: int,
    num_classes: int,
) -> dict[str, float]:
    """The val pass, with k-NN when due; a refit has none (no metrics)."""
    if val_loader is None:
        return {}
    if knn_due(config, epoch):
        return evaluate_with_knn(unwrap(model), val_loader, config, rank, num_classes)
    return evaluate(unwrap(model), val_loader, rank, prefix="val")


def knn_due(config: Config, epoch: int) -> bool:
    every = config.tracking.knn_every
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == config.optim.epochs)


def evaluate_with_knn(
    model: torch.nn.Module, val_loader: EpochLoader, config: Config, rank: RankDevice, num_classes: int
) -> dict[str, float]:
    """The val pass, plus val k-NN top-1 with train as the gallery: one more pass over each rank's exactly-once
    share of train (centre crops, no augmentation), then an exact distributed search."""
    net = with_features(model)
    collected: list = []
    val_metrics = evaluate(net, val_loader, rank, prefix="val", features=collected)
    train_share = build_loader(
        config.data,
        "train",
        rank=rank.rank,
        world_size=rank.world_size,
        batch_size=config.per_worker_batch_size,
        seed=config.seed,
        exactly_once=True,
        decode_device=decode_device(config, rank),
    )
    gallery, gallery_labels = embed_pass(net, train_share, rank.device)
    queries = torch.cat([pair[0] for pair in collected]) if collected else torch.empty(0, net.dim)
    query_labels = torch.cat([pair[1] for pair in collected]) if collected else torch.empty(0, dtype=torch.int64)
    val_metrics[m.VAL_KNN_TOP1] = distributed_knn_top1(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        num_classes,
        rank.world_size,
        config.retrieval.knn_k,
        config.retrieval.knn_temperature,
        rank.device,
    )
    return val_metrics


def setup_rank(config: Config) -> RankDevice:
    ray_train_report_log.quiet_report_logging()
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    if config.data.decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.decode = 'gpu': this worker has no CUDA device ({device}); use data.decode: cpu")
    torch.manual_seed(config.seed + context.get_world_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes (the plan fixes batch sizes): pick kernels once
    host_group = None
    if device.type == "cuda" and context.get_world_size() > 1 and torch.distributed.is_initialized():
        host_group = torch.distributed.new_group(backend="gloo")  # a collective: every rank creates it here
    return RankDevice(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=device,
        autocast_dtype=autocast_dtype(config.scaling.mixed_precision, device),
        channels_last=config.scaling.channels_last and device.type == "cuda",
        local_rank=context.get_local_rank(),
        node_rank=context.get_node_rank(),
        host_group=host_group,
    )


def worker_tracker(config: Config, wiring: RunWiring, rank: RankDevice, steps_per_epoch: int) -> WorkerTracker:
    """This rank's MLflow logging into the driver's run (rank 0's metrics, each node's system metrics)."""
    return WorkerTracker.for_rank(
        rank.rank,
        rank.local_rank,
        rank.node_rank,
        wiring.mlflow_run_id,
        wiring.tracking_uri,
        steps_between_logs(config.tracking.log_every_n_steps, steps_per_epoch),
    )


def worker_node_ids(rank: RankDevice) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: all ranks call it)."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if rank.world_size == 1 or not dist.is_initialized():
        return [node]
    nodes: list[Any] = [None] * rank.world_size
    dist.all_gather_object(nodes, node)
    return nodes


def decode_device(config: Config, rank: RankDevice) -> torch.device | None:
    """Where the loaders' batches are decoded: this worker's GPU with data.decode = gpu, else in the loader."""
    return rank.device if config.data.decode == "gpu" else None


def build_loaders(config: Config, rank: RankDevice) -> tuple[EpochLoader, EpochLoader | None]:
    """The training loader over `data.fit_splits`, and the val loader (None for a refit, which trains on val)."""
    common = dict(
        rank=rank.rank,
        world_size=rank.world_size,
        batch_size=config.per_worker_batch_size,
        seed=config.seed,
        pin_memory=rank.device.type == "cuda",
        decode_device=decode_device(config, rank),
    )
    train = build_loader(config.data, config.data.fit_splits, **common)
    return train, build_loader(config.data, "val", **common) if config.data.validates else None


def restore(
    trainee: Trainee, config: Config, num_classes: int, steps_per_epoch: int, rank: RankDevice, log: RankLogger
) -> None:
    """Load the latest checkpoint into `trainee` (weights, optimiser, schedule, scaler, this rank's random streams,
    and its state), or the newest sound one before it when the latest is damaged (every rank reads the same files,
    so every rank makes the same choice). No checkpoint: the trainee stays fresh."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return

    def apply(directory: Path) -> TrainingState:
        check_compatible(read_meta(directory), config.model.name, num_classes, f"checkpoint {directory}")
        return load_checkpoint(
            directory,
            model=trainee.model,
            optimizer=trainee.optimizer,
            scheduler=trainee.scheduler,
            scaler=trainee.scaler,
            rank=rank.rank,
            world_size=rank.world_size,
            fallback_seed=config.seed + rank.rank,
            steps_per_epoch=steps_per_epoch,
        )

    state, used, damage = restore_newest_sound(checkpoint.path, config.tracking.storage_path, apply)
    if damage and rank.rank == 0:
        log.warning(f"{damage}; resuming from the checkpoint before it, {used}")
    where = (
        f"at step {state.step_in_epoch + 1} of epoch {state.epoch + 1}"
        if state.step_in_epoch
        else f"after epoch {state.epoch}"
    )
    log.info(f"resumed from {used} {where}")
    trainee.state = state


def gather_rng_states(rank: RankDevice) -> list[dict[str, Any]]:
    if rank.world_size == 1 or not dist.is_initialized():
        return [rng_state()]
    states: list[Any] = [None] * rank.world_size
    dist.all_gather_object(states, rng_state())  # pickled between this job's own ranks, never read from storage
    return states


def to_device(model: torch.nn.Module, rank: RankDevice) -> torch.nn.Module:
    model = model.to(rank.device)
    return model.to(memory_format=torch.channels_last) if rank.channels_last else model


def wrap(model: torch.nn.Module, rank: RankDevice, compile_model: bool) -> torch.nn.Module:
    if rank.world_size > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP: gloo on CPUs, NCCL on GPUs
    return torch.compile(model) if compile_model else model


def report(
    metrics: dict[str, float],
    trainee: Trainee,
    meta: dict[str, Any],
    rank: RankDevice,
    local_checkpoint_root: str | None,
    stopped_early: bool = False,
) -> None:
    """Every rank calls report (it is a barrier); only rank 0 hands over a checkpoint.

    Ray copies a reported directory to storage; local mode (num_workers=0) keeps only a reference,
    so there the checkpoint is written straight into the run's storage folder instead.
    """
    state = trainee.state
    rng_by_rank = gather_rng_states(rank)  # a collective: every rank's streams, for an exact resume
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None
        if rank.rank == 0:
            directory = Path(scratch)
            if local_checkpoint_root:
                within = f"_step_{state.step_in_epoch:07d}" if state.step_in_epoch else ""
                directory = Path(local_checkpoint_root) / f"checkpoint_epoch_{state.epoch:04d}{within}"
                directory.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                directory,
                model=unwrap(trainee.model),
                optimizer=trainee.optimizer,
                scheduler=trainee.scheduler,
                scaler=trainee.scaler,
                state=state,
                meta=meta,
                rng_by_rank=rng_by_rank,
                stopped_early=stopped_early,
            )
            if local_checkpoint_root:
                drop_superseded_step_checkpoints(Path(local_checkpoint_root), directory)
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        ray.train.report(metrics, checkpoint=checkpoint)


def drop_superseded_step_checkpoints(root: Path, newest: Path) -> None:
    """Local mode: Ray keeps no checkpoint history there (so none of keep-best-k), and a checkpoint within an
    epoch is only useful while it is the latest: once a newer one is written, older ones would only fill the disk."""
    for directory in root.glob("checkpoint_epoch_*_step_*"):
        if directory != newest:
            shutil.rmtree(directory, ignore_errors=True)


def report_within_epoch(
    trainee: Trainee, meta: dict[str, Any], rank: RankDevice, local_checkpoint_root: str | None
) -> None:
    """A checkpoint within an epoch: where the epoch stands, and no score. Ray ranks a report without a number for
    the score attribute below every scored one (NaN sorts lowest), so keep-best-k keeps epoch checkpoints and
    such a checkpoint lives only while it is the latest."""
    state = trainee.state
    metrics = {m.EPOCH: state.epoch, m.STEP_IN_EPOCH: state.step_in_epoch, m.SELECTION_METRIC: float("nan")}
    report(metrics, trainee, meta, rank, local_checkpoint_root)
