r"""Refit: a sweep's best configuration trained again on train + val, for the epochs it took to score best.

    imagenet-pipeline refit --sweep s1 -c jobs/configs/demo.yaml -c jobs/configs/demo_sweep.yaml
    ray job submit --working-dir . -- python -m jobs.refit --sweep s1 \
        -c jobs/configs/demo.yaml -c jobs/configs/demo_sweep.yaml

The sweep chose the configuration on val; the final model should learn from every labelled image it may see,
so it is trained again on train and val together (one exact plan over both splits' shards: every epoch covers
them as it would cover train alone), for the epoch count at which the chosen trial reached its best val top-1.
Nothing is left to validate on: no early stopping and no plateau schedule (refused), and the champion gate uses
the sweep's val score of the configuration, as the decision tag says. Test stays untouched until `evaluate`.

The configuration is the user's own (the sweep's config files and `--set`), never the artifact's: from the trial
run's `config.json` (JSON, validated as a Config) only the keys the sweep searched (`search.space`) are taken. A
run's artifacts may be written by anyone who can log to the experiment, and keys such as `data.shard_command`,
`data.root`, `data.shard_url_schemes` or `tracking.storage_path` decide what runs and what is read or written;
so any other key on which the artifact disagrees with the user's config is refused, naming the key (a `--set` of
that key decides it: the user's value is used).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import metrics as m
from pipeline.config import Config, with_overrides, with_text_overrides
from pipeline.errors import ConfigError
from pipeline.tracking.run_config import CONFIG_ARTIFACT, flatten, read_run_config
from pipeline.tracking.runs import find_run, metric_history, prepare_tracking
from pipeline.tracking.sweeps import BEST_TRIAL_TAG, SWEEP_TAG
from pipeline.train.driver import RefitOptions, TrainingOutcome, run_training
from pipeline.tune.trials import trial_run_name

REFIT_TAG = "pipeline.refit"  # "true" on a refit's run and model version
REFIT_SWEEP_TAG = "pipeline.refit_sweep"
REFIT_TRIAL_TAG = "pipeline.refit_trial"
REFIT_EPOCHS_TAG = "pipeline.refit_epochs"


def run_refit(locator: Config, sweep_name: str, overrides: list[str] | None = None) -> TrainingOutcome:
    """`locator` says where the sweep is (tracking.*); `overrides` (`key=value`) adjust the trial's config."""
    config, options = plan_refit(locator, sweep_name, overrides or [])
    print(
        f"refit of sweep '{sweep_name}' trial {options.tags[REFIT_TRIAL_TAG]}: {config.model.name}, "
        f"{config.optim.epochs} epochs on {'+'.join(config.data.fit_splits)} as run '{config.tracking.run_name}'"
    )
    return run_training(config, refit=options)


def plan_refit(locator: Config, sweep_name: str, overrides: list[str]) -> tuple[Config, RefitOptions]:
    """Everything that can be wrong (no such sweep, no finished best trial, a plateau schedule) fails here."""
    uri, experiment_id = prepare_tracking(locator)
    parent = find_run(uri, experiment_id, sweep_name)
    if parent is None or parent.data.tags.get(SWEEP_TAG) != "parent":
        raise ConfigError(
            f"--sweep {sweep_name!r}: no sweep of that name in experiment "
            f"'{locator.tracking.experiment}' (its MLflow parent run is named after the sweep)"
        )
    trial_id = parent.data.tags.get(BEST_TRIAL_TAG)
    trial_run = find_run(uri, experiment_id, trial_run_name(sweep_name, trial_id)) if trial_id else None
    if trial_run is None:
        raise ConfigError(
            f"--sweep {sweep_name!r}: the sweep has no best trial yet (still running, interrupted, "
            "or every trial failed); finish it with `imagenet-pipeline tune --resume` first"
        )
    scores = metric_history(uri, trial_run.info.run_id, m.SELECTION_METRIC)
    if not scores:
        raise ConfigError(f"--sweep {sweep_name!r}: trial {trial_id} logged no {m.SELECTION_METRIC}")
    best = max(scores, key=lambda point: (point.value, -point.step))  # the first epoch that reached the best
    what = f"refit of sweep {sweep_name!r} trial {trial_id}"
    trial_config = read_run_config(uri, trial_run.info.run_id, f"sweep {sweep_name!r} trial {trial_id}")
    refit_settings = {
        "data.fit_splits": ["train", "val"],
        "optim.epochs": int(best.step),
        "optim.patience": None,
        "tracking.knn_every": None,
        "tracking.run_name": f"{sweep_name}-refit",
        "tracking.tracking_uri": uri,
        "tracking.experiment": locator.tracking.experiment,
    }
    try:
        searched = trial_choices(locator, trial_config, overrides, set(refit_settings))
        config = with_text_overrides(with_overrides(locator, {**searched, **refit_settings}), overrides)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from None
    tags = {
        REFIT_TAG: "true",
        REFIT_SWEEP_TAG: sweep_name,
        REFIT_TRIAL_TAG: str(trial_id),
        REFIT_EPOCHS_TAG: str(config.optim.epochs),
    }
    note = (
        f"refit of sweep {sweep_name} trial {trial_id} on train+val, gated on the sweep's {m.SELECTION_METRIC} "
        f"{best.value:.2f} of its configuration at epoch {best.step}: a refit has no val split of its own"
    )
    return config, RefitOptions(
        parent_run_id=parent.info.run_id,
        tags=tags,
        gate_score=float(best.value),
        gate_note=note,
        trial_run_id=trial_run.info.run_id,
    )


# Keys a sweep sets per trial or per cluster, never a user's choice: they may differ without meaning anything.
_PER_TRIAL_KEYS = ("tracking.run_name", "tracking.tracking_uri", "search.max_concurrent_trials")


def trial_choices(user: Config, trial: Config, overrides: list[str], settled: set[str]) -> dict[str, Any]:
    """The values the sweep chose for this trial (the keys of the user's `search.space`), read from the trial's
    config; a difference in any other key, unless the user sets it with --set or the refit itself does
    (`settled`), is refused, naming the key."""
    mine = flatten(user.with_absolute_paths().model_dump(mode="json"))
    theirs = flatten(trial.with_absolute_paths().model_dump(mode="json"))
    searched = set(user.search.space)
    overridden = {text.partition("=")[0].strip() for text in overrides}
    for key in sorted(set(mine) | set(theirs)):
        if key in searched or key in settled or key in _PER_TRIAL_KEYS or mine.get(key) == theirs.get(key):
            continue
        if any(key == name or key.startswith(name + ".") for name in overridden):
            continue
        hint = (
            "pass the sweep's config files (-c ...) so its search.space names the keys the trial chose"
            if not searched
            else "refit with the config files the sweep ran with"
        )
        raise ConfigError(
            f"the trial's {CONFIG_ARTIFACT} has {key} = {_short(theirs.get(key))} but your config has "
            f"{_short(mine.get(key))}; only searched keys ({', '.join(sorted(searched)) or 'none'}) "
            f"are taken from a run's artifact: {hint}, or --set {key} to choose"
        )
    return {key: theirs[key] for key in searched if key in theirs}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
