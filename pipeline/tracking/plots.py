"""The pictures logged to MLflow: a run's learning curve, a sweep's trial curves and parameter scatter.

Figures are built with `matplotlib.figure.Figure`, not pyplot, so no backend (and no display) is ever chosen:
`mlflow.log_figure` renders them to PNG itself.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import metrics as m


def learning_curve(history: list[dict[str, Any]]):
    """Train and val loss, val top-1 by epoch: over- and under-fitting at a glance in the MLflow UI. A refit
    (trained on train + val) has no val curve: its figure is the train loss alone."""
    epochs = [row[m.EPOCH] for row in history]
    validated = all(m.VAL_LOSS in row for row in history)
    figure = Figure(figsize=(10, 4) if validated else (5, 4))
    loss_axes, top1_axes = figure.subplots(1, 2) if validated else (figure.subplots(), None)
    loss_axes.plot(epochs, [row[m.TRAIN_LOSS] for row in history], marker="o", label="train loss")
    if validated:
        loss_axes.plot(epochs, [row[m.VAL_LOSS] for row in history], marker="o", label="val loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_ylabel("cross-entropy")
    loss_axes.legend()
    if top1_axes is None:
        figure.tight_layout()
        return figure
    top1_axes.plot(epochs, [row[m.VAL_TOP1] for row in history], marker="o", color="tab:green", label="val top-1")
    top1_axes.plot(epochs, [row[m.VAL_TOP5] for row in history], marker="o", color="tab:olive", label="val top-5")
    top1_axes.set_xlabel("epoch")
    top1_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    top1_axes.set_ylabel("accuracy, %")
    top1_axes.legend()
    figure.tight_layout()
    return figure


def sweep_learning_curves(trials: list[Any]):
    """Val top-1 by epoch for every trial; an X marks the epoch ASHA decided to stop a trial at."""
    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    for trial in trials:
        epochs = [row[m.EPOCH] for row in trial.history]
        top1 = [row[m.VAL_TOP1] for row in trial.history]
        if not epochs:
            continue
        (line,) = axes.plot(epochs, top1, marker="o", label=f"{trial.trial_id} ({trial.status_text})")
        if trial.stop_decided_at is not None and trial.stop_decided_at in epochs:
            at = epochs.index(trial.stop_decided_at)
            axes.plot(epochs[at], top1[at], marker="X", markersize=14, color=line.get_color())
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("val top-1, %")
    axes.set_title("trials (X: the epoch ASHA decided to stop at)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def parameter_scatter(trials: list[Any], keys: list[str]):
    """Each searched hyperparameter against the trial's best val top-1."""
    figure = Figure(figsize=(4 * max(1, len(keys)), 4))
    axes_list = figure.subplots(1, max(1, len(keys)), squeeze=False)
    for axes, key in zip(axes_list[0], keys):
        points = [(t.params.get(key), t.best_top1) for t in trials if t.best_top1 is not None]
        axes.scatter([p[0] for p in points], [p[1] for p in points])
        if key.endswith("lr") or key.endswith("weight_decay"):
            axes.set_xscale("log")
        axes.set_xlabel(key)
        axes.set_ylabel("best val top-1, %")
    figure.tight_layout()
    return figure
