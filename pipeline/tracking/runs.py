"""MLflow runs: where they go, one run per training job, what rank 0 writes into it, and how each run ends.

This module owns the run lifecycle: runs are started or re-found here (`start_or_resume_run`), attached to by
rank 0 (`WorkerTracker`), and every final status (FINISHED, FAILED, KILLED) is set through `end_run`.

The driver resolves the tracking URI (absolute: Ray workers change directory, so MLflow's relative
`sqlite:///mlflow.db` default would scatter databases), creates the SQLite database once (concurrent
first-time creation races in migrations), and creates or re-finds the job's run. Workers only
attach to that run id, so a restarted worker group or a resumed job keeps writing to one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT, Config
from pipeline.errors import ConfigError
from pipeline.tracking.uri import artifact_root, redact, resolve_tracking_uri, warn_if_credentials_cross_plain_http

RUN_NAME_TAG = "pipeline.run_name"
MANIFEST_TAG = "pipeline.manifest_hash"
WORKER_NODES_TAG = "pipeline.worker_nodes"  # Ray node ids of the workers, rank order: where a run really ran
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
    if experiment is not None:
        return uri, experiment.experiment_id
    return uri, client.create_experiment(config.tracking.experiment, artifact_location=artifact_root(uri))


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
    config: Config, uri: str, experiment_id: str, run_name: str, manifest_hash: str,
    parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """The one MLflow run of a training job: re-found by its run name when the job is resumed."""
    client = MlflowClient(uri)
    found = find_run(uri, experiment_id, run_name)
    if found:
        return found.info.run_id, True
    tags = {RUN_NAME_TAG: run_name, MANIFEST_TAG: manifest_hash, **git_tags(), **ray_job_tags(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the run under the sweep in the MLflow UI
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(key, str(value)[:6000]) for key, value in flatten(loggable(config)).items()
    ])
    return run.info.run_id, False


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


def git_tags() -> dict[str, str]:
    """The commit the code came from. A Ray job's uploaded working directory has no .git (.rayignore), so
    `imagenet-pipeline job submit` passes the submitter's commit as PIPELINE_GIT_COMMIT / PIPELINE_GIT_DIRTY."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return {"git.commit": os.environ["PIPELINE_GIT_COMMIT"], "git.dirty": os.environ.get("PIPELINE_GIT_DIRTY", "unknown")}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit or "unknown", "git.dirty": str(dirty).lower()} if commit else {}


def ray_job_tags() -> dict[str, str]:
    """The Ray job id (`ray job submit`'s submission id) when this driver runs as a Ray job."""
    # The job supervisor hands the entrypoint its metadata, submission id included, in this variable.
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        metadata = {}
    job_id = metadata.get("job_submission_id") or os.environ.get("RAY_JOB_SUBMISSION_ID")
    return {"ray.job_id": job_id} if job_id else {}


def end_run(uri_or_client: str | MlflowClient, run_id: str, status: str = FINISHED) -> None:
    """Set a run's final status: FINISHED (trained to its end), FAILED (an error), KILLED (stopped by ASHA)."""
    if status not in (FINISHED, FAILED, KILLED):
        raise AssertionError(f"not a terminal MLflow run status: {status}")
    client = uri_or_client if isinstance(uri_or_client, MlflowClient) else MlflowClient(uri_or_client)
    client.set_terminated(run_id, status)


def find_run(uri: str, experiment_id: str, run_name: str):
    """The run tagged with `run_name`, or None."""
    found = MlflowClient(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
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
    """Rank 0 attaches to the job's run and logs per-epoch metrics; other ranks do nothing."""

    def __init__(self, run_id: str | None, uri: str | None) -> None:
        self.run_id, self.uri = run_id, uri
        self._active = False

    @classmethod
    def for_rank(cls, rank: int, run_id: str | None, uri: str | None) -> "WorkerTracker":
        return cls(run_id if rank == 0 else None, uri)

    def __enter__(self) -> "WorkerTracker":
        if self.run_id and self.uri:
            self._attachment = attached(self.uri, self.run_id, log_system_metrics=True)
            self._attachment.__enter__()
            self._active = True
        return self

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._active:
            mlflow.set_tags(tags)

    def log_epoch(self, epoch_metrics: dict[str, float]) -> None:
        if self._active:
            step = int(epoch_metrics["epoch"])
            mlflow.log_metrics({k: float(v) for k, v in epoch_metrics.items() if k != "epoch"}, step=step)

    def __exit__(self, *exc_info: object) -> None:
        if self._active:
            # A restarted worker group re-attaches; the driver sets the final status at the end.
            self._attachment.__exit__(*exc_info)
            self._active = False
