"""What a finished sweep shows: the trial table, and the parent MLflow run's summary, counts and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import metrics as m  # noqa: E402
from pipeline.config import Config  # noqa: E402

STOPPED_TAG = "asha_stopped"
STOPPED_AT_TAG = "asha_stopped_at_epoch"


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped early | failed
    epochs_run: int  # epochs Tune received; for a stopped trial, the epoch ASHA stopped it at
    best_top1: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: str | None = None
    mlflow_run_id: str | None = None
    epochs_trained: int = 0  # epochs actually computed: a stopped trial may finish one more before it dies


def print_trial_table(trials: list[TrialSummary], keys: list[str]) -> None:
    header = ["trial", *keys, "best val top-1", "epochs", "status"]
    rows = [[t.trial_id, *[_short(t.params.get(k)) for k in keys],
             "-" if t.best_top1 is None else f"{t.best_top1:.2f}", str(t.epochs_run), t.status]
            for t in sorted(trials, key=lambda t: -(t.best_top1 or -1))]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_sweep_summary(client: MlflowClient, parent_run_id: str, config: Config, trials: list[TrialSummary],
                      best: TrialSummary | None) -> None:
    """Counts, compute spent against the no-early-stopping budget, best configuration, plots; child tags."""
    for trial in trials:
        if trial.mlflow_run_id is None:
            continue
        stopped = trial.status == "stopped early"
        client.set_tag(trial.mlflow_run_id, STOPPED_TAG, str(stopped).lower())
        if stopped:
            client.set_tag(trial.mlflow_run_id, STOPPED_AT_TAG, str(trial.epochs_run))
            client.set_terminated(trial.mlflow_run_id, "KILLED")
        elif trial.status == "failed":
            client.set_terminated(trial.mlflow_run_id, "FAILED")
        else:
            # Trained every epoch, but Tune may stop the trial at max_t before its driver closes the run: close it.
            client.set_terminated(trial.mlflow_run_id, "FINISHED")
    trial_epochs = sum(max(t.epochs_trained, t.epochs_run) for t in trials)
    budget = config.search.num_samples * config.optim.epochs
    counts = {status: sum(t.status == status for t in trials) for status in ("completed", "stopped early", "failed")}
    metrics = {
        "sweep/trials_completed": counts["completed"],
        "sweep/trials_stopped_early": counts["stopped early"],
        "sweep/trials_failed": counts["failed"],
        "sweep/trial_epochs": trial_epochs,
        "sweep/trial_epochs_budget": budget,
        "sweep/compute_share": trial_epochs / budget if budget else 0.0,
    }
    if best is not None:
        metrics[f"best/{m.VAL_TOP1.replace('/', '_')}"] = float(best.best_top1)
    client.log_batch(parent_run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
    if best is not None:
        client.set_tag(parent_run_id, "best_trial", best.trial_id)
        client.set_tag(parent_run_id, "best_config", str(best.params))
    client.set_tag(parent_run_id, "scheduler", f"ASHA(time_attr={m.EPOCH}, grace_period={config.search.grace_period}, "
                   f"reduction_factor={config.search.reduction_factor}, max_t={config.optim.epochs})")
    client.log_figure(parent_run_id, learning_curves(trials), "sweep_learning_curves.png")
    client.log_figure(parent_run_id, parameter_scatter(trials, list(config.search.space)), "sweep_parameters.png")
    client.set_terminated(parent_run_id, "FINISHED")
    print(f"compute: {trial_epochs} trial-epochs run of a {budget} budget without early stopping "
          f"({metrics['sweep/compute_share']:.0%}); {counts}")


def _metric(key: str, value: float):
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def learning_curves(trials: list[TrialSummary]):
    """Val top-1 by epoch for every trial; an X marks where ASHA stopped a trial."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for trial in trials:
        epochs = [row[m.EPOCH] for row in trial.history]
        top1 = [row[m.VAL_TOP1] for row in trial.history]
        if not epochs:
            continue
        (line,) = axes.plot(epochs, top1, marker="o", label=f"{trial.trial_id} ({trial.status})")
        if trial.status == "stopped early":
            axes.plot(epochs[-1], top1[-1], marker="X", markersize=14, color=line.get_color())
    axes.set_xlabel("epoch")
    axes.set_ylabel("val top-1, %")
    axes.set_title("trials (X: stopped by ASHA)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    plt.close(figure)
    return figure


def parameter_scatter(trials: list[TrialSummary], keys: list[str]):
    """Each searched hyperparameter against the trial's best val top-1."""
    figure, axes_list = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 4), squeeze=False)
    for axes, key in zip(axes_list[0], keys):
        points = [(t.params.get(key), t.best_top1) for t in trials if t.best_top1 is not None]
        axes.scatter([p[0] for p in points], [p[1] for p in points])
        if key.endswith("lr") or key.endswith("weight_decay"):
            axes.set_xscale("log")
        axes.set_xlabel(key)
        axes.set_ylabel("best val top-1, %")
    figure.tight_layout()
    plt.close(figure)
    return figure
