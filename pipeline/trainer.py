"""The training driver: check everything, start the Ray Train job, then publish the result in MLflow.

    imagenet-pipeline train -c jobs/configs/resnet18_small.yaml --set tracking.run_name=r18-a

Everything that can be wrong with the inputs fails here, before a worker starts: shards, class
counts, a resumed run of another architecture, an unwritable storage path, an unreachable tracking
server. Running again with the same `tracking.run_name` resumes from the latest checkpoint and keeps
writing to the same MLflow run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import locations, run_storage
from pipeline import metrics as m
from pipeline.checkpoints import check_compatible, latest_run_checkpoint, read_meta, read_state
from pipeline.config import WORKER_GROUP_START_TIMEOUT_S, Config, ConfigError, refuse_job_copy, require_shards
from pipeline.manifest import Manifest, read_manifest
from pipeline.publish import publish_best_model
from pipeline.tracking import prepare_tracking, start_or_resume_run
from pipeline.train_loop import train_worker


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


def run_training(
    config: Config, run_callbacks: list[Any] | None = None, parent_run_id: str | None = None, publish: bool = True,
    note_placement_group: bool = False,
) -> TrainingOutcome:
    """Train to the end (or early stop) and, with `publish`, log and register the best model.

    A Ray Tune trial calls this with `parent_run_id` (its run nests under the sweep's), `publish=False` (only
    the sweep's best trial is registered) and `note_placement_group` (so the sweep can free it, ray#54305).
    """
    started = time.perf_counter()
    config = config.with_absolute_paths()
    manifest = check_inputs(config)
    run_name = config.tracking.run_name or f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_path(config)
    check_resume_compatible(storage, run_name, config, manifest)
    uri, experiment_id = prepare_tracking(config)
    run_id, resumed = start_or_resume_run(config, uri, experiment_id, run_name, manifest.content_hash(), parent_run_id)
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {uri}; Ray run '{run_name}' in {storage}")

    trainer = build_trainer(config, run_name, storage, run_id, uri, run_callbacks,
                            placement_group_file(storage, run_name) if note_placement_group else None)
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except BaseException:
        MlflowClient(uri).set_terminated(run_id, "FAILED")
        raise
    best = best_checkpoint(result)
    history = read_history(result.checkpoint) if publish else []  # a sweep reads trials' history from Tune
    published = None
    if best and publish:
        published = publish_best_model(config, uri, run_id, best.path, best.metrics, history, manifest)
    else:
        MlflowClient(uri).set_terminated(run_id, "FINISHED")
    return TrainingOutcome(
        run_name=run_name, mlflow_run_id=run_id,
        best_metrics=dict(best.metrics) if best else {}, best_checkpoint=best.path if best else None,
        model_version=published.version if published else None, promoted=bool(published and published.promoted),
        history=history, seconds=time.perf_counter() - started,
    )


def check_inputs(config: Config) -> Manifest:
    require_shards(config, ("train", "val"))
    train = read_manifest(locations.join(config.data.root, "train"))
    val = read_manifest(locations.join(config.data.root, "val"))
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
    return train


def storage_path(config: Config) -> str:
    """Checkpoint storage, checked writable up front (object-store URIs are left to Ray's filesystem)."""
    if "://" in config.tracking.storage_path:
        if config.scaling.num_workers == 0:
            raise ConfigError(f"tracking.storage_path = '{config.tracking.storage_path}': local mode "
                              "(scaling.num_workers = 0) keeps its checkpoints on local disk; give a local path")
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


def check_resume_compatible(storage: str, run_name: str, config: Config, manifest: Manifest) -> None:
    try:
        latest = latest_run_checkpoint(storage, run_name)
    except ValueError as error:  # an object store that cannot be listed (credentials, network)
        raise ConfigError(f"tracking.storage_path = '{storage}': {error}") from None
    if latest is not None:
        try:
            check_compatible(read_meta(latest), config.model.name, manifest.num_classes, f"run '{run_name}' ({latest})")
        except ValueError as error:
            raise ConfigError(str(error)) from None


def build_trainer(config: Config, run_name: str, storage: str, run_id: str, uri: str,
                  run_callbacks: list[Any] | None, placement_group_note: str | None = None) -> TorchTrainer:
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"), "mlflow_run_id": run_id, "tracking_uri": uri,
            # Local mode (num_workers=0, for tests and debugging) does not persist checkpoints itself.
            "local_checkpoint_root": f"{storage}/{run_name}" if config.scaling.num_workers == 0 else None,
            "placement_group_file": placement_group_note,
        },
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu, resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.tracking.keep_checkpoints,
                checkpoint_score_attribute=m.SELECTION_METRIC, checkpoint_score_order=m.SELECTION_MODE,
            ),
            # A controller that keeps failing (e.g. a worker group that never fits) ends the run
            # instead of retrying forever, Ray's default.
            failure_config=FailureConfig(max_failures=config.scaling.max_failures, controller_failure_limit=3),
            callbacks=run_callbacks or [],
            # Ray's per-report INFO lines drown the epoch table; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def placement_group_file(storage: str, run_name: str) -> str:
    """Where rank 0 notes its placement group id, on the run's storage (see train_loop.record_placement_group)."""
    return run_storage.join(storage, run_name, ".placement_group")


def best_checkpoint(result: Any):
    """The best reported checkpoint by the selection metric (Ray keeps it and the latest)."""
    scored = [(checkpoint, metrics) for checkpoint, metrics in (result.best_checkpoints or [])
              if m.SELECTION_METRIC in metrics]
    if not scored and result.checkpoint is not None and m.SELECTION_METRIC in (result.metrics or {}):
        scored = [(result.checkpoint, result.metrics)]  # local mode keeps only the last checkpoint
    if not scored:
        return None
    checkpoint, metrics = max(scored, key=lambda pair: pair[1][m.SELECTION_METRIC])
    return _Best(checkpoint.path, metrics)


@dataclass
class _Best:
    path: str
    metrics: dict[str, Any]


def read_history(checkpoint: Checkpoint | None) -> list[dict[str, Any]]:
    """The per-epoch metrics of the whole run, from the latest checkpoint's training state (downloaded
    first when the checkpoint lives in object storage)."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        return read_state(directory)["training_state"]["history"]


def ensure_ray() -> None:
    """Join the cluster when run as a Ray job (RAY_ADDRESS); otherwise start Ray in-process."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_TIMEOUT_S)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
