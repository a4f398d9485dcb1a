"""What a sweep writes into MLflow besides its trials' own training runs: the tags that mark the parent run and
each trial's end (how it ended, where ASHA decided to stop it), each trial run closed with what happened to it,
and the parent run's summary (counts, best trial, plots). `pipeline.tune` decides what; this module writes it.
The parent run itself is opened and ended by its owner (`pipeline.tune.search`, in a `run_scope`)."""

from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import FAILED, FINISHED, KILLED, end_run, find_run
from pipeline.tracking.step_log import log_missing_epochs

SWEEP_TAG = "pipeline.sweep"  # "parent" on a sweep's parent run
COMPLETED_TAG = "pipeline.completed"  # set by a trial that trained to its end (or its own early stop)
WAITED_TAG = "pipeline.waited_for_resources_s"  # set by a trial that waited for room on the cluster to start
BEST_TRIAL_TAG = "best_trial"
STOPPED_TAG = "asha_stopped"
# ASHA's stop reaches a trial asynchronously, so a stopped trial may train one more epoch before it ends: the epoch
# the stop was decided at (tagged when ASHA decides) and the epoch the trial ended at (tagged on every trial).
STOP_DECIDED_TAG = "asha_stop_decided_at_epoch"
ENDED_AT_TAG = "ended_at_epoch"


def tag_trial_end(uri: str, run_id: str, waited_s: float) -> None:
    """A trial that trained to its end (or its own early stop), and the seconds it waited for room first."""
    client = MlflowClient(uri)
    if waited_s >= 1:
        client.set_tag(run_id, WAITED_TAG, f"{waited_s:.0f}")
    client.set_tag(run_id, COMPLETED_TAG, "true")


def tag_stop_decision(uri: str, experiment_id: str, run_name: str, epoch: int) -> None:
    """Tag the epoch ASHA decided to stop the trial run named `run_name` at (nothing if it has no run yet)."""
    run = find_run(uri, experiment_id, run_name)
    if run is not None:
        MlflowClient(uri).set_tag(run.info.run_id, STOP_DECIDED_TAG, str(epoch))


def close_trial_run(uri: str, run_id: str, history: list[dict[str, Any]], status: str, epochs_run: int) -> None:
    """End a trial's run with what happened to it: `status` KILLED (stopped by ASHA), FAILED (an error, or no
    result) or FINISHED (trained every epoch, though Tune may have stopped its driver at max_t before the driver
    closed the run); first the epochs its checkpoints hold that MLflow lacks (a stop can land before the last
    log), and where it ended."""
    client = MlflowClient(uri)
    log_missing_epochs(client, run_id, history)
    client.set_tag(run_id, STOPPED_TAG, str(status == KILLED).lower())
    client.set_tag(run_id, ENDED_AT_TAG, str(epochs_run))
    if status not in (KILLED, FAILED, FINISHED):
        raise AssertionError(f"not a terminal MLflow run status: {status}")
    end_run(client, run_id, status)


def write_sweep_summary(
    uri: str, parent_run_id: str, metrics: dict[str, float], tags: dict[str, str], figures: dict[str, Any]
) -> None:
    """The parent run's summary: `metrics` (at step 0), `tags`, and `figures` (matplotlib, by artifact file)."""
    client = MlflowClient(uri)
    timestamp = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(key, float(value), timestamp, 0) for key, value in metrics.items()])
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    for name, figure in figures.items():
        client.log_figure(parent_run_id, figure, name)
