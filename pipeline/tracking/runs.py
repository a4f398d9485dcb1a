"""MLflow runs: where they go, one run per training job, what rank 0 writes into it, and how each run ends.

This module owns the run lifecycle: runs are started or re-found here (`start_or_resume_run`), attached to by
rank 0 (`WorkerTracker`), and every final status (FINISHED, FAILED, KILLED) is set through `end_run`.

The driver resolves the tracking URI (absolute: Ray workers change directory, so MLflow's relative
`sqlite:///mlflow.db` default would scatter databases), creates the SQLite database once (concurrent
first-time creation races in migrations), and creates or re-finds the job's run. Workers only
attach to that run id, so a restarted worker group or a resumed job keeps writing to one run.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, Metric
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import PROJECT_ROOT, Config
from pipeline.errors import ConfigError
from pipeline.tracking.uri import artifact_root, redact, resolve_tracking_uri, warn_if_credentials_cross_plain_http

RUN_NAME_TAG = "pipeline.run_name"
MANIFEST_TAG = "pipeline.manifest_hash"
WORKER_NODES_TAG = "pipeline.worker_nodes"  # Ray node ids of the workers, rank order: where a run really ran
GIT_DIRTY_TAG = "pipeline.git_dirty"  # MLflow names the commit, not whether the tree had uncommitted changes
RAY_JOB_TAG = "ray.job_id"
# MLflow's own names: its runs table (Source, User, Version columns) and its UI read these.
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"
GIT_COMMIT_TAG, USER_TAG = "mlflow.source.git.commit", "mlflow.user"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"  # MLflow 3.17's UI opens these on the training runs
NOTE_TAG = "mlflow.note.content"  # the run page's Description
CONFIG_ARTIFACT = "config.json"  # the run's whole typed config; a refit rebuilds a trial's config from it
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # MLflow's terminal run statuses


def prepare_tracking(config: Config) -> tuple[str, str]:
    """Check the tracking store is usable, create it once; return (uri, experiment id)."""
    uri = resolve_tracking_uri(config)
    warn_if_credentials_cross_plain_http(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return uri, client.create_experiment(
            config.tracking.experiment,
            artifact_location=artifact_root(uri),
            tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND},
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag existed (or by hand): the UI would
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return uri, experiment.experiment_id


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as error:
        raise ConfigError(
            f"tracking.tracking_uri = {uri!r}: MLflow server not reachable ({getattr(error, 'reason', error)}); "
            "start it or unset MLFLOW_TRACKING_URI to use the local SQLite store"
        ) from None
    raise ConfigError(f"tracking.tracking_uri = {uri!r}: server answered /health with an error")


def start_or_resume_run(
    config: Config,
    uri: str,
    experiment_id: str,
    run_name: str,
    manifest_hash: str,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    datasets: list[DatasetInput] | None = None,
) -> tuple[str, bool]:
    """The one MLflow run of a training job: re-found by its run name when the job is resumed.

    A new run gets MLflow's standard source tags, the config as params and as `config.json`, and its
    `datasets` (pipeline.tracking.datasets) as inputs."""
    client = MlflowClient(uri)
    found = find_run(uri, experiment_id, run_name)
    if found:
        return found.info.run_id, True
    tags = {RUN_NAME_TAG: run_name, MANIFEST_TAG: manifest_hash, **source_tags(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the run under the sweep in the MLflow UI
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(key, str(value)[:6000]) for key, value in flatten(loggable(config)).items()],
    )
    client.log_dict(run.info.run_id, loggable(config), CONFIG_ARTIFACT)
    if datasets:
        client.log_inputs(run.info.run_id, datasets=datasets)
    return run.info.run_id, False


def training_note(config: Config) -> dict[str, str]:
    """A training run's Description on its MLflow page, as a tag for `start_or_resume_run`'s extra_tags."""
    validated = "validated on val" if config.data.validates else "no validation split (a refit)"
    note = (
        f"{config.model.name} trained on {'+'.join(config.data.fit_splits)} of {redact(config.data.root)} "
        f"({validated}): {config.optim.optimizer} lr {config.optim.lr:g}, global batch {config.optim.batch_size}, "
        f"up to {config.optim.epochs} epochs on {config.scaling.world_size} worker(s). Command: "
        f"{entrypoint_name()}."
    )
    return {NOTE_TAG: note}


def loggable(config: Config) -> dict[str, Any]:
    """The config as MLflow params: credentials in the tracking URI never reach a param."""
    data = config.model_dump(mode="json")
    data["tracking"]["tracking_uri"] = redact(data["tracking"]["tracking_uri"])
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def source_tags() -> dict[str, str]:
    """Who ran what, from which commit, under MLflow's own tag names (plus the Ray job id when there is one)."""
    job = ray_job_tags()
    tags = {SOURCE_NAME_TAG: entrypoint_name(), SOURCE_TYPE_TAG: "JOB" if job else "LOCAL", USER_TAG: user_name()}
    return {**tags, **git_tags(), **job}


def entrypoint_name(argv: list[str] | None = None) -> str:
    """`imagenet-pipeline train`, or the script's path inside the project (`jobs/train.py`)."""
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else ""
    if program == "-c":
        return "python -c"
    if program == "imagenet-pipeline" or program == "__main__.py":
        command = next((arg for arg in argv[1:] if not arg.startswith("-")), "")
        return f"imagenet-pipeline {command}".strip()
    try:
        return os.path.relpath(os.path.abspath(argv[0]), PROJECT_ROOT) if argv else "unknown"
    except ValueError:  # another drive (Windows)
        return program or "unknown"


def user_name() -> str:
    """The submitter, not the cluster's service account: `job submit` passes it as PIPELINE_USER."""
    try:
        return os.environ.get("PIPELINE_USER") or getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return "unknown"


def git_state() -> tuple[str, str] | None:
    """(commit, dirty "true"/"false") of the code. A Ray job's uploaded working directory has no .git
    (.rayignore), so `imagenet-pipeline job submit` passes the submitter's as PIPELINE_GIT_COMMIT / _DIRTY."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"], os.environ.get("PIPELINE_GIT_DIRTY", "unknown")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, str(dirty).lower()) if commit else None


def git_tags() -> dict[str, str]:
    state = git_state()
    return {GIT_COMMIT_TAG: state[0], GIT_DIRTY_TAG: state[1]} if state else {}


def job_environment() -> dict[str, str]:
    """What a submitted Ray job needs to tag its runs as the submitter's: commit, dirty flag, user."""
    state = git_state()
    env = {"PIPELINE_USER": user_name()}
    if state:
        env.update(PIPELINE_GIT_COMMIT=state[0], PIPELINE_GIT_DIRTY=state[1])
    return env


def ray_job_tags() -> dict[str, str]:
    """The Ray job id (`ray job submit`'s submission id) when this driver runs as a Ray job."""
    # The job supervisor hands the entrypoint its metadata, submission id included, in this variable.
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        metadata = {}
    job_id = metadata.get("job_submission_id") or os.environ.get("RAY_JOB_SUBMISSION_ID")
    return {RAY_JOB_TAG: job_id} if job_id else {}


def end_run(uri_or_client: str | MlflowClient, run_id: str, status: str = FINISHED) -> None:
    """Set a run's final status: FINISHED (trained to its end), FAILED (an error), KILLED (stopped by ASHA)."""
    if status not in (FINISHED, FAILED, KILLED):
        raise AssertionError(f"not a terminal MLflow run status: {status}")
    client = uri_or_client if isinstance(uri_or_client, MlflowClient) else MlflowClient(uri_or_client)
    client.set_terminated(run_id, status)


def find_run(uri: str, experiment_id: str, run_name: str):
    """The run tagged with `run_name`, or None."""
    found = MlflowClient(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    return found[0] if found else None


@contextmanager
def attached(uri: str, run_id: str, log_system_metrics: bool = False) -> Iterator[None]:
    """This process writes into run `run_id` through MLflow's fluent API for the block (model logging, rank 0's
    metrics). Leaving the block detaches and puts back the status the run had (usually RUNNING): only its owner
    ends a run, through `end_run`.
    """
    status = MlflowClient(uri).get_run(run_id).info.status
    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
    try:
        yield
    finally:
        mlflow.end_run(status=status)  # fluent end_run must be given a status: the one found


class WorkerTracker:
    """What a training worker writes into the job's run. Rank 0 attaches and logs per-epoch metrics and, every
    `every_n_steps` optimizer steps, step metrics (`step_hook`). The first worker on each node (local rank 0)
    records that node's system metrics (CPU, memory, GPU utilisation and memory) under MLflow's node id
    `node_<rank>`, so a multi-node run shows every node, not only rank 0's. Other workers write nothing."""

    def __init__(
        self,
        run_id: str | None,
        uri: str | None,
        logs_metrics: bool = False,
        node_id: str | None = None,
        every_n_steps: int = 0,
    ) -> None:
        self.run_id, self.uri = run_id, uri
        self.logs_metrics = bool(run_id and uri and logs_metrics)
        self.node_id = node_id if run_id and uri else None
        self.every_n_steps = every_n_steps
        self._active = False
        self._monitor = None

    @classmethod
    def for_rank(
        cls, rank: int, local_rank: int, node_rank: int, run_id: str | None, uri: str | None, every_n_steps: int = 0
    ) -> "WorkerTracker":
        return cls(
            run_id,
            uri,
            logs_metrics=rank == 0,
            node_id=f"node_{node_rank}" if local_rank == 0 else None,
            every_n_steps=every_n_steps,
        )

    def __enter__(self) -> "WorkerTracker":
        if self.node_id:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a restarted worker group continues the node's series instead of restarting at 0.
            self._monitor = SystemMetricsMonitor(
                self.run_id, node_id=self.node_id, tracking_uri=self.uri, resume_logging=True
            )
            self._monitor.start()
        if self.logs_metrics:
            self._attachment = attached(self.uri, self.run_id)
            self._attachment.__enter__()
            self._active = True
        return self

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._active:
            mlflow.set_tags(tags)

    def log_epoch(self, epoch_metrics: dict[str, float]) -> None:
        if self._active:
            step = int(epoch_metrics[m.EPOCH])
            mlflow.log_metrics({k: float(v) for k, v in epoch_metrics.items() if k != m.EPOCH}, step=step)

    def log_missing_epochs(self, history: list[dict[str, float]]) -> None:
        """A resumed attempt's restored epochs that MLflow lacks (see `log_missing_epochs`)."""
        if self._active:
            log_missing_epochs(MlflowClient(self.uri), self.run_id, history)

    def step_hook(self) -> StepLog | None:
        if self._active and self.every_n_steps:
            client = MlflowClient(self.uri)
            # A resumed attempt replays the steps its predecessor ran after the checkpoint (and logged): the same
            # values when the loader is deterministic, so those points stay and only later steps are logged.
            logged = [point.step for point in client.get_metric_history(self.run_id, m.STEP_LOSS)]
            return StepLog(client, self.run_id, self.every_n_steps, logged_through=max(logged, default=0))
        return None

    def __exit__(self, *exc_info: object) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self._active:
            mlflow.flush_async_logging()  # the step metrics still queued
            # A restarted worker group re-attaches; the driver sets the final status at the end.
            self._attachment.__exit__(*exc_info)
            self._active = False


def log_missing_epochs(client: MlflowClient, run_id: str, history: list[dict[str, float]]) -> int:
    """Log the epochs of a run's checkpointed `history` that come after the last epoch MLflow holds; returns how
    many. The checkpoint is reported before its epoch's metrics reach MLflow, so a worker killed between the two
    (a node lost, or Tune stopping a trial as soon as it reports its last epoch) leaves MLflow one epoch behind
    the checkpoints; the resumed attempt, or the sweep's summary, writes it from the checkpoint's record."""
    logged = max((point.step for point in client.get_metric_history(run_id, m.TRAIN_LOSS)), default=0)
    timestamp = int(time.time() * 1000)
    missing = [row for row in history if int(row.get(m.EPOCH, 0)) > logged]
    for row in missing:
        step = int(row[m.EPOCH])
        client.log_batch(
            run_id, metrics=[Metric(key, float(value), timestamp, step) for key, value in row.items() if key != m.EPOCH]
        )
    return len(missing)


def steps_between_logs(setting: int | None, steps_per_epoch: int) -> int:
    """tracking.log_every_n_steps: None means about 100 points per epoch; 0 means per-epoch metrics only."""
    if setting is None:
        return max(1, steps_per_epoch // 100)
    return setting


MIN_SECONDS_BETWEEN_STEP_LOGS = 1.0


class StepLog:
    """The step hook of `pipeline.train.step.train_one_epoch` on rank 0: it adds up each step's loss on the
    device and reads it only every `every` steps (one device wait per interval, not per step), then sends one
    batch of three metrics without waiting for the server (MLflow's asynchronous logging), so a slow tracking
    server never holds up a step."""

    def __init__(self, client: MlflowClient, run_id: str, every: int, logged_through: int = 0) -> None:
        self.client, self.run_id, self.every = client, run_id, every
        self.logged_through = logged_through  # steps up to this one are in MLflow already
        self._reset()

    def _reset(self) -> None:
        self._loss_sum = None
        self._steps = 0
        self._images = 0
        self._started = time.perf_counter()

    def __call__(self, step: int, loss, lr: float, images: int) -> None:
        if step <= self.logged_through:
            return
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps += 1
        self._images += images
        self._last = (step, lr)
        # Every `every` steps, and at most once a second: small epochs would otherwise log every step, and on a
        # few cores MLflow's logging thread then competes with the step (measured by bench-train's overhead).
        if step % self.every or time.perf_counter() - self._started < MIN_SECONDS_BETWEEN_STEP_LOGS:
            return
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what the window holds (the worker calls it at each epoch's end: the last step is always logged).
        `wait`: return once every point sent so far is stored, so a checkpoint taken next never gets ahead of
        MLflow (a resume from it logs only later steps: queued points lost to a kill would leave a gap)."""
        self._send()
        if wait:
            mlflow.flush_async_logging()

    def _send(self) -> None:
        if not self._steps:
            return
        step, lr = self._last
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        stamp = int(time.time() * 1000)
        figures = {
            m.STEP_LOSS: float(self._loss_sum) / self._steps,
            m.STEP_LR: lr,
            m.STEP_IMAGES_PER_SECOND: self._images / elapsed,
        }
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), stamp, step) for key, value in figures.items()],
            synchronous=False,
        )
        self._reset()
