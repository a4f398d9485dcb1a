"""Each trial of a finished sweep as a `TrialSummary`: read from the trial's own record, its checkpoints, and its
MLflow run's tags, never from whichever Tune result arrived last."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import metrics as m
from pipeline import storage
from pipeline.errors import CheckpointError, StorageError, first_line
from pipeline.tracking.runs import find_run
from pipeline.tracking.sweeps import COMPLETED_TAG, STOP_DECIDED_TAG, WAITED_TAG
from pipeline.train.checkpoints import read_run_record
from pipeline.tune.report import COMPLETED, FAILED_STATUS, NO_RESULT, STOPPED, TrialSummary


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """A trial's Ray Train run and MLflow run name: a restarted trial finds its own checkpoints by it."""
    return f"{sweep_name}-{trial_id}"


def summarize_trials(
    results, uri: str, experiment_id: str, sweep_name: str, max_epochs: int, storage_root: str
) -> list[TrialSummary]:
    """Every trial from its own record, its checkpoints (what publishing loads too), never from whichever Tune
    result arrived last: a trial resumed after the sweep's driver died may have reported its end only to a
    Tune that no longer exists."""
    summaries = []
    for result in results:
        trial_id = trial_id_of(result)
        run_name = trial_run_name(sweep_name, trial_id)
        run = find_run(uri, experiment_id, run_name)
        summaries.append(summarize_trial(trial_id, result, run, run_name, storage_root, max_epochs))
    return summaries


def summarize_trial(trial_id: str, result, run, run_name: str, storage_root: str, max_epochs: int) -> TrialSummary:
    note = ""
    try:
        record = read_run_record(storage_root, run_name)
        if record is None:
            note = f"no checkpoint in {storage.join(storage_root, run_name)}"
    except (CheckpointError, StorageError) as error:
        record, note = None, first_line(error, with_type=False)
    tags = run.data.tags if run else {}
    decided = tags.get(STOP_DECIDED_TAG, "")
    best = record.best_kept(m.SELECTION_METRIC) if record else None
    if result.error is not None:
        status, note = FAILED_STATUS, first_line(result.error)  # why it failed, not the missing checkpoint it left
    elif record is None or not record.history:
        status = NO_RESULT
    elif tags.get(COMPLETED_TAG) == "true" or record.finished(max_epochs):
        status = COMPLETED
        if tags.get(WAITED_TAG):
            note = f"waited {tags[WAITED_TAG]} s for resources"
    else:
        status = STOPPED
    return TrialSummary(
        trial_id=trial_id,
        params=dict(result.config or {}),
        status=status,
        epochs_run=record.epochs if record else 0,
        history=record.history if record else [],
        best_top1=best[0][m.SELECTION_METRIC] if best else None,
        best_metrics=dict(best[0]) if best else {},
        best_checkpoint=best[1] if best else None,
        mlflow_run_id=run.info.run_id if run else None,
        stop_decided_at=int(decided) if decided.isdigit() else None,
        note=note,
    )


def trial_id_of(result) -> str:
    """The Tune trial id, also for a trial that failed before its first report (no metrics): Tune names
    the trial folder `<trainable>_<trial id>_<index>_...`."""
    reported = (result.metrics or {}).get("trial_id")
    if reported:
        return reported
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(str(result.path)).name)
    return match.group(1) if match else "unknown"
