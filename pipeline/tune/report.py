"""What a finished sweep shows: the trial table, and the parent MLflow run's summary, counts and plots (written
by `pipeline.tracking.sweeps`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import metrics as m
from pipeline.config import Config
from pipeline.tracking.plots import parameter_scatter, sweep_learning_curves
from pipeline.tracking.runs import FAILED, FINISHED, KILLED
from pipeline.tracking.sweeps import BEST_TRIAL_TAG, close_trial_run, write_sweep_summary

COMPLETED, STOPPED, FAILED_STATUS, NO_RESULT = "completed", "stopped early", "failed", "no result"
STATUSES = (COMPLETED, STOPPED, FAILED_STATUS, NO_RESULT)


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # one of STATUSES; "no result": no checkpoint of the trial could be found
    epochs_run: int  # epochs the trial's checkpoints record: where it actually ended
    best_top1: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: str | None = None
    mlflow_run_id: str | None = None
    stop_decided_at: int | None = None  # ASHA's decision epoch, for a stopped trial
    note: str = ""  # why a trial has no result, or waited

    @property
    def status_text(self) -> str:
        if self.status == STOPPED and self.stop_decided_at is not None:
            return f"stopped by ASHA at epoch {self.stop_decided_at}"
        return f"{self.status} ({self.note})" if self.note else self.status


def print_trial_table(trials: list[TrialSummary], keys: list[str]) -> None:
    header = ["trial", *keys, "best val top-1", "epochs", "status"]
    rows = [
        [
            t.trial_id,
            *[_short(t.params.get(k)) for k in keys],
            "-" if t.best_top1 is None else f"{t.best_top1:.2f}",
            str(t.epochs_run),
            t.status_text,
        ]
        for t in sorted(trials, key=lambda t: -(t.best_top1 or -1))
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_sweep_summary(
    uri: str, parent_run_id: str, config: Config, trials: list[TrialSummary], best: TrialSummary | None
) -> None:
    """Close each trial's run with what happened to it; on the parent run, counts, compute spent against the
    no-early-stopping budget, the best configuration and plots. The parent run's owner ends it."""
    for trial in trials:
        if trial.mlflow_run_id is not None:
            close_trial_run(uri, trial.mlflow_run_id, trial.history, _run_status(trial), trial.epochs_run)
    trial_epochs = sum(t.epochs_run for t in trials)
    # The epochs the sweep asked for: a stopped trial's up to ASHA's decision, every other trial's as it ran.
    decided_epochs = sum(t.stop_decided_at if t.stop_decided_at is not None else t.epochs_run for t in trials)
    budget = config.search.num_samples * config.optim.epochs
    counts = {status: sum(t.status == status for t in trials) for status in STATUSES}
    metrics = {
        "sweep/trials_completed": counts["completed"],
        "sweep/trials_stopped_early": counts["stopped early"],
        "sweep/trials_failed": counts["failed"],
        "sweep/trials_without_result": counts["no result"],
        "sweep/trial_epochs": trial_epochs,
        "sweep/trial_epochs_to_stop_decisions": decided_epochs,
        "sweep/trial_epochs_budget": budget,
        "sweep/compute_share": trial_epochs / budget if budget else 0.0,
    }
    tags = {}
    if best is not None:
        metrics[f"best/{m.VAL_TOP1.replace('/', '_')}"] = float(best.best_top1)
        tags = {BEST_TRIAL_TAG: best.trial_id, "best_config": json.dumps(best.params, sort_keys=True)}
    tags["scheduler"] = (
        f"ASHA(time_attr={m.EPOCH}, grace_period={config.search.grace_period}, "
        f"reduction_factor={config.search.reduction_factor}, max_t={config.optim.epochs})"
    )
    figures = {
        "sweep_learning_curves.png": sweep_learning_curves(trials),
        "sweep_parameters.png": parameter_scatter(trials, list(config.search.space)),
    }
    write_sweep_summary(uri, parent_run_id, metrics, tags, figures)
    late = trial_epochs - decided_epochs
    print(
        f"compute: {trial_epochs} trial-epochs run of a {budget} budget without early stopping "
        f"({metrics['sweep/compute_share']:.0%}); {decided_epochs} up to ASHA's stop decisions, {late} after "
        f"them (a stop lands asynchronously); {counts}"
    )


def _run_status(trial: TrialSummary) -> str:
    """The MLflow status a trial's run ends with: KILLED when ASHA stopped it, FAILED without a result."""
    if trial.status == STOPPED:
        return KILLED
    return FAILED if trial.status in (FAILED_STATUS, NO_RESULT) else FINISHED
