"""Refit: a sweep's best configuration trained again on train + val, for the epochs it took to score best.

    imagenet-pipeline refit --sweep s1
    ray job submit --working-dir . -- python -m jobs.refit --sweep s1

The sweep chose the configuration on val; the final model should learn from every labelled image it may see,
so it is trained again on train and val together (one exact plan over both splits' shards: every epoch covers
them as it would cover train alone), for the epoch count at which the chosen trial reached its best val top-1.
Nothing is left to validate on: no early stopping and no plateau schedule (refused), and the champion gate uses
the sweep's val score of the configuration, as the decision tag says. Test stays untouched until `evaluate`.

The trial's configuration is read back from its MLflow run's `config.json` (JSON, validated as a Config: a
shared store's file runs no code). `--set` overrides apply on top of it (e.g. scaling or data.root on another
cluster).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import Config, validate_saved_config, with_overrides, with_text_overrides
from pipeline.errors import ConfigError
from pipeline.tracking.runs import CONFIG_ARTIFACT, find_run, prepare_tracking
from pipeline.train.driver import RefitOptions, TrainingOutcome, run_training
from pipeline.tune.report import BEST_TRIAL_TAG
from pipeline.tune.search import SWEEP_TAG, trial_run_name

REFIT_TAG = "pipeline.refit"  # "true" on a refit's run and model version
REFIT_SWEEP_TAG = "pipeline.refit_sweep"
REFIT_TRIAL_TAG = "pipeline.refit_trial"
REFIT_EPOCHS_TAG = "pipeline.refit_epochs"


def run_refit(locator: Config, sweep_name: str, overrides: list[str] | None = None) -> TrainingOutcome:
    """`locator` says where the sweep is (tracking.*); `overrides` (`key=value`) adjust the trial's config."""
    config, options = plan_refit(locator, sweep_name, overrides or [])
    print(f"refit of sweep '{sweep_name}' trial {options.tags[REFIT_TRIAL_TAG]}: {config.model.name}, "
          f"{config.optim.epochs} epochs on {'+'.join(config.data.fit_splits)} as run '{config.tracking.run_name}'")
    return run_training(config, refit=options)


def plan_refit(locator: Config, sweep_name: str, overrides: list[str]) -> tuple[Config, RefitOptions]:
    """Everything that can be wrong (no such sweep, no finished best trial, a plateau schedule) fails here."""
    uri, experiment_id = prepare_tracking(locator)
    client = MlflowClient(uri)
    parent = find_run(uri, experiment_id, sweep_name)
    if parent is None or parent.data.tags.get(SWEEP_TAG) != "parent":
        raise ConfigError(f"--sweep {sweep_name!r}: no sweep of that name in experiment "
                          f"'{locator.tracking.experiment}' (its MLflow parent run is named after the sweep)")
    trial_id = parent.data.tags.get(BEST_TRIAL_TAG)
    trial_run = find_run(uri, experiment_id, trial_run_name(sweep_name, trial_id)) if trial_id else None
    if trial_run is None:
        raise ConfigError(f"--sweep {sweep_name!r}: the sweep has no best trial yet (still running, interrupted, "
                          "or every trial failed); finish it with `imagenet-pipeline tune --resume` first")
    scores = client.get_metric_history(trial_run.info.run_id, m.SELECTION_METRIC)
    if not scores:
        raise ConfigError(f"--sweep {sweep_name!r}: trial {trial_id} logged no {m.SELECTION_METRIC}")
    best = max(scores, key=lambda point: (point.value, -point.step))  # the first epoch that reached the best
    trial_config = read_run_config(client, trial_run.info.run_id, f"sweep {sweep_name!r} trial {trial_id}")
    refit_settings = {
        "data.fit_splits": ["train", "val"], "optim.epochs": int(best.step), "optim.patience": None,
        "tracking.knn_every": None, "tracking.run_name": f"{sweep_name}-refit", "tracking.tracking_uri": uri,
        "tracking.experiment": locator.tracking.experiment,
    }
    try:
        config = with_text_overrides(with_overrides(trial_config, refit_settings), overrides)
    except ConfigError as error:
        raise ConfigError(f"refit of sweep {sweep_name!r} trial {trial_id}: {error}") from None
    tags = {REFIT_TAG: "true", REFIT_SWEEP_TAG: sweep_name, REFIT_TRIAL_TAG: str(trial_id),
            REFIT_EPOCHS_TAG: str(config.optim.epochs)}
    note = (f"refit of sweep {sweep_name} trial {trial_id} on train+val, gated on the sweep's {m.SELECTION_METRIC} "
            f"{best.value:.2f} of its configuration at epoch {best.step}: a refit has no val split of its own")
    return config, RefitOptions(parent_run_id=parent.info.run_id, tags=tags, gate_score=float(best.value),
                                gate_note=note, trial_run_id=trial_run.info.run_id)


def read_run_config(client: MlflowClient, run_id: str, what: str) -> Config:
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, scratch))
        except (MlflowException, OSError):
            raise ConfigError(f"{what}: its run {run_id} has no {CONFIG_ARTIFACT} (logged since refit exists); "
                              "run the sweep again to refit it") from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{what}: {CONFIG_ARTIFACT} of run {run_id} is not JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {CONFIG_ARTIFACT} of run {run_id} is not a JSON object")
    data.get("tracking", {}).pop("tracking_uri", None)  # logged redacted; the refit's own URI replaces it
    try:
        return validate_saved_config(data)
    except ConfigError as error:
        raise ConfigError(f"{what}: {CONFIG_ARTIFACT} of run {run_id}: {error}") from None
