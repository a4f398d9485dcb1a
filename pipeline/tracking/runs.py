"""MLflow runs: where they go, one run per job, and how each run ends.

This module owns the run lifecycle: runs are started or re-found here (`start_or_resume_run`), attached to by
rank 0 (`WorkerTracker`) or by any process that writes into a run it does not own (`attached`), and ended only
by their owner: the block that holds a run (`run_scope`) ends it FINISHED, FAILED with the cause, or KILLED,
through `end_run`. What a run records besides lives beside this module: its source tags and Description
(`provenance`), its config (`run_config`), step metrics (`step_log`), a sweep's summary (`sweeps`), a model's
registry entries and test record (`registry`, `models`, `heldout`).

The driver resolves the tracking URI (absolute: Ray workers change directory, so MLflow's relative
`sqlite:///mlflow.db` default would scatter databases), creates the SQLite database once (concurrent
first-time creation races in migrations), and creates or re-finds the job's run. Workers only
attach to that run id, so a restarted worker group or a resumed job keeps writing to one run.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow.entities import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import Config
from pipeline.errors import ConfigError, first_line
from pipeline.tracking.provenance import job_environment as job_environment  # re-exported: pipeline.cluster.jobs
from pipeline.tracking.provenance import source_tags
from pipeline.tracking.run_config import log_config
from pipeline.tracking.step_log import StepLog, log_missing_epochs
from pipeline.tracking.step_log import steps_between_logs as steps_between_logs  # re-exported: pipeline.train.worker
from pipeline.tracking.uri import artifact_root, resolve_tracking_uri, warn_if_credentials_cross_plain_http

RUN_NAME_TAG = "pipeline.run_name"
MANIFEST_TAG = "pipeline.manifest_hash"
WORKER_NODES_TAG = "pipeline.worker_nodes"  # Ray node ids of the workers, rank order: where a run really ran
END_CAUSE_TAG = "pipeline.end_cause"  # why a run ended FAILED or KILLED: the exception, in one line
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"  # MLflow 3.17's UI opens these on the training runs
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # MLflow's terminal run statuses
END_CAUSE_MAX_CHARS = 500


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
    """The one MLflow run of a job: re-found by its run name when the job is resumed.

    A new run gets MLflow's standard source tags, the config as params and as `config.json`, and its
    `datasets` (pipeline.tracking.datasets) as inputs. Its owner holds it in a `run_scope`, which ends it."""
    client = MlflowClient(uri)
    found = find_run(uri, experiment_id, run_name)
    if found:
        return found.info.run_id, True
    tags = {RUN_NAME_TAG: run_name, MANIFEST_TAG: manifest_hash, **source_tags(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the run under the sweep in the MLflow UI
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_config(client, run.info.run_id, config)
    if datasets:
        client.log_inputs(run.info.run_id, datasets=datasets)
    return run.info.run_id, False


@contextmanager
def run_scope(uri: str, run_id: str) -> Iterator[str]:
    """The block that owns run `run_id`. Leaving it ends the run; an exception goes on unchanged.

    - FINISHED when the block completes;
    - KILLED when it is interrupted: Ctrl-C (KeyboardInterrupt), or SIGTERM, which Ray's driver turns into
      `sys.exit(15)` (`ray job stop`);
    - FAILED on any other exception, its one-line message tagged on the run as `pipeline.end_cause`.
    """
    try:
        yield run_id
    except (KeyboardInterrupt, SystemExit) as stop:
        _end_with_cause(uri, run_id, KILLED, f"interrupted ({first_line(stop)})")
        raise
    except BaseException as error:
        _end_with_cause(uri, run_id, FAILED, first_line(error))
        raise
    end_run(uri, run_id, FINISHED)


def _end_with_cause(uri: str, run_id: str, status: str, cause: str) -> None:
    try:
        client = MlflowClient(uri)
        client.set_tag(run_id, END_CAUSE_TAG, cause[:END_CAUSE_MAX_CHARS])
        end_run(client, run_id, status)
    except Exception as error:  # the store may be what failed: the block's own exception is the one to show
        print(f"warning: MLflow run {run_id} not marked {status}: {first_line(error)}", file=sys.stderr)


def end_run(uri_or_client: str | MlflowClient, run_id: str, status: str = FINISHED) -> None:
    """Set a run's final status: FINISHED (ran to its end), FAILED (an error), KILLED (interrupted, or stopped
    by ASHA)."""
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


def find_run_in(uri: str, experiment_name: str, run_name: str):
    """The run tagged with `run_name` in the experiment named `experiment_name`; None if either is missing."""
    experiment = MlflowClient(uri).get_experiment_by_name(experiment_name)
    return find_run(uri, experiment.experiment_id, run_name) if experiment else None


def run_exists(uri: str, run_id: str) -> bool:
    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def metric_history(uri: str, run_id: str, key: str) -> list:
    """Every point of metric `key` in run `run_id` (mlflow.entities.Metric: value, step, timestamp)."""
    return MlflowClient(uri).get_metric_history(run_id, key)


@contextmanager
def attached(uri: str, run_id: str, log_system_metrics: bool = False) -> Iterator[None]:
    """This process writes into run `run_id` through MLflow's fluent API for the block (model logging, rank 0's
    metrics). Leaving the block detaches and puts back the status the run had (usually RUNNING): only its owner
    ends a run (`run_scope`).
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
            return StepLog.resuming(self.uri, self.run_id, self.every_n_steps)
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
