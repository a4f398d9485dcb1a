"""The training driver: check everything, start the Ray Train job, then publish the result in MLflow.

    imagenet-pipeline train -c jobs/configs/resnet18_small.yaml --set tracking.run_name=r18-a

Everything that can be wrong with the inputs fails here, before a worker starts: shards, class
counts, a resumed run of another architecture, an unwritable storage path, an unreachable tracking
server. Running again with the same `tracking.run_name` resumes from the latest checkpoint and keeps
writing to the same MLflow run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import events, storage
from pipeline import metrics as m
from pipeline.config import Config, refuse_job_copy, require_shards
from pipeline.data.manifest import Manifest, combine_manifests, read_manifest
from pipeline.data.plan import train_steps_per_epoch
from pipeline.errors import ConfigError, DataError, StorageError
from pipeline.features.extract import feature_spec
from pipeline.tracking.datasets import split_input
from pipeline.tracking.provenance import training_note
from pipeline.tracking.registry import Gate, Published, register_model
from pipeline.tracking.runs import prepare_tracking, run_scope, start_or_resume_run
from pipeline.tracking.uri import redact
from pipeline.train.checkpoints import (
    check_compatible,
    latest_run_checkpoint,
    load_weights,
    local_checkpoint,
    read_meta,
    read_progress,
    read_state,
)
from pipeline.train.models import build_model
from pipeline.train.worker import RunWiring, train_worker
from pipeline.upstream import ray_54305


@dataclass
class TrainingOutcome:
    run_name: str
    mlflow_run_id: str
    best_metrics: dict[str, Any]
    best_checkpoint: str | None
    model_version: str | None
    promoted: bool
    history: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class RefitOptions:
    """How a refit runs training (pipeline.tune.refit): nested under its sweep's MLflow run, tagged with the sweep
    and trial (run and model version), and gated on the sweep's val score of its configuration: trained on train +
    val, it has no split left to score itself on."""

    parent_run_id: str
    tags: dict[str, str]
    gate_score: float
    gate_note: str
    trial_run_id: str  # the trial's own run: its registered model is the one this refit supersedes


@dataclass(frozen=True)
class TrialOptions:
    """How a Ray Tune trial runs training: nested under the sweep's MLflow run, each report forwarded to Tune by
    `callbacks`, its placement group noted for release (ray#54305), and not published (only the sweep's best is)."""

    parent_run_id: str
    callbacks: tuple[Any, ...] = ()


def run_training(
    config: Config, trial: TrialOptions | None = None, refit: RefitOptions | None = None
) -> TrainingOutcome:
    """Train to the end (or early stop); outside a sweep, log and register the best model (a refit's: the last)."""
    started = time.perf_counter()
    config = config.with_absolute_paths()
    manifest, datasets = check_inputs(config)
    # A global batch the train split cannot fill on every rank fails here, not inside every worker.
    train_steps_per_epoch(manifest.num_samples, config.scaling.world_size, config.per_worker_batch_size)
    run_name = config.tracking.run_name or f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_root = storage_path(config)
    check_resume_compatible(storage_root, run_name, config, manifest)
    uri, experiment_id = prepare_tracking(config)
    parent = trial.parent_run_id if trial else refit.parent_run_id if refit else None
    run_id, resumed = start_or_resume_run(
        config,
        uri,
        experiment_id,
        run_name,
        manifest.content_hash(),
        parent,
        extra_tags={**training_note(config), **(refit.tags if refit else {})},
        datasets=datasets,
    )
    print(
        f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {redact(uri)}; "
        f"Ray run '{run_name}' in {storage_root}"
    )
    events.record("mlflow_run_ready")

    wiring = RunWiring(
        mlflow_run_id=run_id,
        tracking_uri=uri,
        local_checkpoint_root=f"{storage_root}/{run_name}" if config.scaling.num_workers == 0 else None,
        placement_group_note=ray_54305.note_location(storage_root, run_name) if trial else None,
        report_finished_run=trial is not None,
        events_file=events.current_file(),
        sample_log=events.sample_log_file(),
    )
    trainer = build_trainer(config, run_name, storage_root, wiring, list(trial.callbacks) if trial else [])
    with run_scope(uri, run_id):  # FINISHED once published; FAILED with the cause, or KILLED when interrupted
        result = trainer.fit()
        if result.error:
            raise result.error
        # A refit's model is its last epoch's: with no val split, no epoch scores better than another.
        best = best_checkpoint(result) if config.data.validates else last_checkpoint(result)
        history, published = [], None
        if trial is None:  # a sweep reads its trials' history from Tune and publishes only the best trial
            history = read_history(result.checkpoint)
            if best:
                published = publish(config, uri, run_id, best.path, best.metrics, history, manifest, refit)
    return TrainingOutcome(
        run_name=run_name,
        mlflow_run_id=run_id,
        best_metrics=dict(best.metrics) if best else {},
        best_checkpoint=best.path if best else None,
        model_version=published.version if published else None,
        promoted=bool(published and published.promoted),
        history=history,
        seconds=time.perf_counter() - started,
    )


def publish(
    config: Config,
    uri: str,
    run_id: str,
    checkpoint_path: str,
    best_metrics: dict[str, Any],
    history: list[dict[str, Any]],
    manifest: Manifest,
    refit: RefitOptions | None = None,
) -> Published:
    """Load the best checkpoint's weights (downloaded first from object storage) and register them."""
    events.record("publish_started")
    with local_checkpoint(checkpoint_path, config.tracking.storage_path) as directory:
        model = load_model_from_checkpoint(config, directory, manifest.num_classes)
    spec = feature_spec(config.model.name, model)  # recorded so every user of the model knows its features
    embedding = {"layer": spec.layer, "dim": spec.dim, "normalised": "l2"}
    gate = Gate(refit.gate_score, refit.gate_note, refit.tags, refit.trial_run_id) if refit else None
    published = register_model(config, uri, run_id, model, best_metrics, history, manifest, embedding, gate)
    events.record("model_registered")
    return published


def load_model_from_checkpoint(config: Config, checkpoint_path: str | Path, num_classes: int) -> torch.nn.Module:
    return load_weights(checkpoint_path, build_model(config.model, num_classes)).cpu().eval()


def check_inputs(config: Config) -> tuple[Manifest, list]:
    """The manifest trained on (train, or a refit's train + val as one) and the splits as MLflow datasets."""
    require_shards(config, ("train", "val"))
    locations = {split: storage.join(config.data.root, split) for split in ("train", "val")}
    train, val = (read_manifest(locations[split], config.data.shard_url_schemes) for split in ("train", "val"))
    if train.num_classes != val.num_classes:
        raise ConfigError(
            f"data.root = '{config.data.root}': train has {train.num_classes} classes but val has {val.num_classes}; "
            "shard both splits from the same source"
        )
    expected = config.model.num_classes
    if expected is not None and expected != train.num_classes:
        raise ConfigError(
            f"model.num_classes = {expected}: the shards in {config.data.root} have {train.num_classes} classes; "
            "set model.num_classes to null to take it from the manifest"
        )
    if config.data.validates:
        datasets = [split_input(train, locations["train"], "train"), split_input(val, locations["val"], "val")]
        return train, datasets
    try:
        fitted = combine_manifests([train, val])
    except DataError as error:
        raise ConfigError(f"data.root = '{config.data.root}': {error}") from None
    return fitted, [split_input(train, locations["train"], "train"), split_input(val, locations["val"], "train")]


def storage_path(config: Config) -> str:
    """Checkpoint storage, checked writable up front (object-store URIs are left to Ray's filesystem)."""
    if storage.is_url(config.tracking.storage_path):
        if config.scaling.num_workers == 0:
            raise ConfigError(
                f"tracking.storage_path = '{config.tracking.storage_path}': local mode "
                "(scaling.num_workers = 0) keeps its checkpoints on local disk; give a local path"
            )
        return config.tracking.storage_path
    path = Path(config.tracking.storage_path)
    refuse_job_copy("tracking.storage_path", str(path), "checkpoints there would vanish with the job")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"tracking.storage_path = '{config.tracking.storage_path}': cannot write there ({error.strerror})"
        ) from None
    return str(path)


def check_resume_compatible(storage_root: str, run_name: str, config: Config, manifest: Manifest) -> None:
    try:
        latest = latest_run_checkpoint(storage_root, run_name)
    except StorageError as error:  # an object store that cannot be listed (credentials, network)
        raise ConfigError(f"tracking.storage_path = '{storage_root}': {error}") from None
    if latest is None:
        return
    meta = read_meta(latest)
    check_compatible(meta, config.model.name, manifest.num_classes, f"run '{run_name}' ({latest})")
    if config.tracking.allow_changed_resume:
        return
    changed = []
    if meta.get("manifest_hash") != manifest.content_hash():
        changed.append(f"the train manifest (hash {meta.get('manifest_hash')} -> {manifest.content_hash()})")
    saved = (meta.get("config") or {}).get("optim", {})
    # More epochs (or another patience) continue the same run; anything else would make a different one.
    for key, value in config.optim.model_dump(mode="json").items():
        if key not in ("epochs", "patience") and key in saved and saved[key] != value:
            changed.append(f"optim.{key} ({saved[key]!r} -> {value!r})")
    if read_progress(latest)["step_in_epoch"]:
        changed += pass_order_changes(meta.get("config") or {}, config)
    if changed:
        raise ConfigError(
            f"tracking.run_name = '{run_name}': its checkpoints were written with other settings: "
            f"{', '.join(changed)}; choose another run name, or set tracking.allow_changed_resume=true "
            "to continue anyway"
        )


# What fixes the order of a training pass's samples besides the manifest and the batch (the plan per rank and
# loader process, each process's shuffle stream): a checkpoint within an epoch says how many steps of that order
# are done, so resuming it under other values would skip some of the epoch's samples and repeat others.
PASS_ORDER_KEYS = ("seed", "scaling.num_workers", "data.loader_workers", "data.shuffle_buffer")


def pass_order_changes(saved: dict[str, Any], config: Config) -> list[str]:
    current = config.model_dump(mode="json")
    changed = []
    for key in PASS_ORDER_KEYS:
        section, _, name = key.rpartition(".")
        was = (saved.get(section) or {}).get(name) if section else saved.get(name)
        now = current[section][name] if section else current[name]
        if section == "scaling" and isinstance(was, int):  # local mode (0 workers) is one rank, as is 1 worker
            was, now = max(was, 1), max(now, 1)
        if was is not None and was != now:
            changed.append(f"{key} ({was!r} -> {now!r}, and the latest checkpoint is within an epoch)")
    return changed


def build_trainer(
    config: Config, run_name: str, storage_root: str, wiring: RunWiring, callbacks: list[Any]
) -> TorchTrainer:
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "wiring": wiring},
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage_root),
            # Kept by val score; a refit has none, so it keeps its latest checkpoints.
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.tracking.keep_checkpoints,
                checkpoint_score_attribute=m.SELECTION_METRIC if config.data.validates else None,
                checkpoint_score_order=m.SELECTION_MODE,
            ),
            # A controller that keeps failing (e.g. a worker group that never fits) ends the run
            # instead of retrying forever, Ray's default.
            failure_config=FailureConfig(max_failures=config.scaling.max_failures, controller_failure_limit=3),
            callbacks=callbacks,
            # Ray's per-report INFO lines drown the epoch table; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


@dataclass
class BestCheckpoint:
    path: str
    metrics: dict[str, Any]


def best_checkpoint(result: Any) -> BestCheckpoint | None:
    """The best reported checkpoint by the selection metric (Ray keeps it and the latest)."""
    scored = [
        (checkpoint, metrics)
        for checkpoint, metrics in (result.best_checkpoints or [])
        if m.SELECTION_METRIC in metrics and m.STEP_IN_EPOCH not in metrics
    ]  # not one taken mid-epoch
    if not scored and result.checkpoint is not None and m.SELECTION_METRIC in (result.metrics or {}):
        scored = [(result.checkpoint, result.metrics)]  # local mode keeps only the last checkpoint
    if not scored:
        return None
    checkpoint, metrics = max(scored, key=lambda pair: pair[1][m.SELECTION_METRIC])
    return BestCheckpoint(checkpoint.path, metrics)


def last_checkpoint(result: Any) -> BestCheckpoint | None:
    return BestCheckpoint(result.checkpoint.path, dict(result.metrics or {})) if result.checkpoint else None


def read_history(checkpoint: Checkpoint | None) -> list[dict[str, Any]]:
    """The per-epoch metrics of the whole run, from the latest checkpoint's training state (downloaded
    first when the checkpoint lives in object storage)."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        return read_state(directory)["training_state"]["history"]
