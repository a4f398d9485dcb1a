"""Hyperparameter search: Ray Tune runs one full Ray Train job per trial, ASHA stops the weak ones early.

    imagenet-pipeline tune -c jobs/configs/demo.yaml -c jobs/configs/demo_sweep.yaml --set tracking.run_name=s1
    imagenet-pipeline tune ... --set tracking.run_name=s1 --resume     # after the driver was killed

Ray 2.60 wiring (Train V2): a Tune function trainable, `trial_driver`, builds the trial's config and calls
the same `run_training` as `imagenet-pipeline train`, whose `TorchTrainer` forwards each rank-0 report to
Tune with `TuneReportCallback`. Each trial's Ray Train run is named after the sweep and trial id, so a
restarted trial resumes its own checkpoint. ASHA's time unit is our `epoch` metric, never Tune's
`training_iteration` (it restarts at 0 when a trial restarts without a Tune checkpoint).

The sweep selects on the `val` split only; it never reads `test`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import metrics as m
from pipeline import storage
from pipeline.config import Config, SearchSpaceParam, require_shards, with_overrides
from pipeline.data.manifest import read_manifest
from pipeline.errors import ConfigError
from pipeline.tracking.run_config import flatten
from pipeline.tracking.runs import prepare_tracking, run_scope, start_or_resume_run
from pipeline.tracking.sweeps import SWEEP_TAG, tag_stop_decision, tag_trial_end
from pipeline.tracking.uri import redact, resolve_tracking_uri
from pipeline.train.driver import TrainingOutcome, TrialOptions, publish, run_training, storage_path
from pipeline.tune.cluster_fit import cluster_fit_problem as cluster_fit_problem  # re-exported: tests/test_infra
from pipeline.tune.cluster_fit import concurrent_trials as concurrent_trials  # re-exported: tests/test_job_configs
from pipeline.tune.cluster_fit import fit_concurrency_to_cluster, wait_for_room
from pipeline.tune.report import TrialSummary, log_sweep_summary, print_trial_table
from pipeline.tune.trials import summarize_trials, trial_run_name
from pipeline.upstream import ray_54305


@dataclass
class SearchOutcome:
    sweep_name: str
    parent_run_id: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    model_version: str | None
    promoted: bool


def run_search(config: Config, resume: bool = False) -> SearchOutcome:
    config = config.with_absolute_paths()
    check_search(config)
    sweep_name = config.tracking.run_name or f"sweep-{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_root = storage_path(config)
    config = fit_concurrency_to_cluster(config)
    manifest = read_manifest(storage.join(config.data.root, "train"), config.data.shard_url_schemes)
    uri, experiment_id = prepare_tracking(config)
    # Trial actors may run where the driver's MLFLOW_TRACKING_URI is unset: hand them the resolved URI.
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"tracking_uri": uri})})
    parent_run_id, reused = start_or_resume_run(
        config,
        uri,
        experiment_id,
        sweep_name,
        manifest.content_hash(),
        extra_tags={SWEEP_TAG: "parent"},
    )
    print(f"sweep '{sweep_name}': MLflow parent run {parent_run_id} ({'reused' if reused else 'new'}) in {redact(uri)}")

    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base_config=config, sweep_name=sweep_name, parent_run_id=parent_run_id),
        # The trial driver only waits on its trainer, whose workers hold the CPUs and GPUs. Reserving memory,
        # not CPU: even 0.01 CPU on a node sized for whole workers leaves no room for one there (seen on a
        # 2-node cluster of 1 CPU each: both trainers waited forever).
        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY_BYTES},
    )
    path = f"{storage_root}/{sweep_name}"
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"tracking.run_name = '{sweep_name}': no sweep to resume in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        if tune.Tuner.can_restore(path):
            raise ConfigError(
                f"tracking.run_name = '{sweep_name}': a sweep of that name exists in {path}; "
                "pass --resume to continue it or choose another name"
            )
        recorder = StopRecorder(uri, experiment_id, sweep_name)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune_config(config, recorder),
            run_config=tune.RunConfig(
                name=sweep_name,
                storage_path=storage_root,
                failure_config=tune.FailureConfig(max_failures=config.search.max_trial_failures),
                callbacks=[ray_54305.release_callback(storage_root, sweep_name)],
            ),
        )
    with run_scope(uri, parent_run_id):
        return finish_search(config, tuner.fit(), uri, experiment_id, sweep_name, parent_run_id, manifest)


def finish_search(
    config: Config,
    results,
    uri: str,
    experiment_id: str,
    sweep_name: str,
    parent_run_id: str,
    manifest,
) -> SearchOutcome:
    """Summarise the trials, close their runs, then register the best trial's model (the caller ends the
    parent run)."""
    trials = summarize_trials(
        results, uri, experiment_id, sweep_name, config.optim.epochs, config.tracking.storage_path
    )  # absolute or a URI: run_search pinned it
    print_trial_table(trials, list(config.search.space))
    best = max((t for t in trials if t.best_top1 is not None), key=lambda t: t.best_top1, default=None)
    log_sweep_summary(uri, parent_run_id, config, trials, best)
    published = None
    if best is not None and best.best_checkpoint:
        trial_config = apply_params(config, best.params, trial_run_name(sweep_name, best.trial_id))
        published = publish(
            trial_config, uri, best.mlflow_run_id, best.best_checkpoint, best.best_metrics, best.history, manifest
        )
    return SearchOutcome(
        sweep_name,
        parent_run_id,
        trials,
        best,
        published.version if published else None,
        bool(published and published.promoted),
    )


def trial_driver(params: dict[str, Any], base_config: Config, sweep_name: str, parent_run_id: str) -> None:
    """One Tune trial: a full Ray Train run with the sampled values, nested in the sweep's MLflow run."""
    trial_id = tune.get_context().get_trial_id()
    config = apply_params(base_config, params, trial_run_name(sweep_name, trial_id))
    waited = wait_for_room(config, trial_id)
    outcome: TrainingOutcome = run_training(
        config, trial=TrialOptions(parent_run_id=parent_run_id, callbacks=(TuneReportCallback(),))
    )
    tag_trial_end(resolve_tracking_uri(config), outcome.mlflow_run_id, waited)


def apply_params(config: Config, params: dict[str, Any], run_name: str | None = None) -> Config:
    """The config with a trial's sampled values set, through the same mechanism as `--set`."""
    known = flatten(config.model_dump(mode="json"))
    for key in params:
        if key not in known:
            raise ConfigError(f"search.space.{key}: unknown config key (see jobs/configs/default.yaml)")
    values = dict(params) | ({"tracking.run_name": run_name} if run_name is not None else {})
    try:
        return with_overrides(config, values)
    except ConfigError as error:
        raise ConfigError(f"search.space {params}: {error}") from None


def check_search(config: Config) -> None:
    """Everything about the space that can be wrong fails here, before any trial starts."""
    require_shards(config, ("train", "val"))
    space = config.search.space
    if not space:
        raise ConfigError(
            "search.space is empty: add at least one parameter, e.g. optim.lr: {kind: loguniform, low: 0.01, high: 1.0}"
        )
    for key, spec in space.items():
        for value in _extreme_values(spec):
            apply_params(config, {key: value})
    if config.tracking.checkpoint_every_steps:
        raise ConfigError(
            f"tracking.checkpoint_every_steps = {config.tracking.checkpoint_every_steps}: a sweep's "
            "trials checkpoint at epoch ends (every Tune report is an ASHA result, scored by val); "
            "unset it for sweeps"
        )
    if config.search.grace_period > config.optim.epochs:
        raise ConfigError(
            f"search.grace_period = {config.search.grace_period} exceeds optim.epochs = "
            f"{config.optim.epochs}: ASHA could never stop a trial"
        )


def _extreme_values(spec: SearchSpaceParam) -> list[Any]:
    if spec.kind == "choice":
        return list(spec.values or [])
    return [spec.low, spec.high]


TRIAL_DRIVER_MEMORY_BYTES = 256 * 1024**2  # a Python process waiting on Ray calls


def param_space(config: Config) -> dict[str, Any]:
    space = {}
    for key, spec in config.search.space.items():
        if spec.kind == "loguniform":
            space[key] = tune.loguniform(spec.low, spec.high)
        elif spec.kind == "uniform":
            space[key] = tune.uniform(spec.low, spec.high)
        else:
            space[key] = tune.choice(spec.values)
    return space


@dataclass(frozen=True)
class StopRecorder:
    """Tags the epoch of each ASHA stop decision on the trial's MLflow run, when the decision is made (the trial
    may still train one more epoch before the stop lands). Pickled with the Tuner, so a resumed sweep has it."""

    tracking_uri: str
    experiment_id: str
    sweep_name: str

    def __call__(self, trial_id: str, epoch: int) -> None:
        tag_stop_decision(self.tracking_uri, self.experiment_id, trial_run_name(self.sweep_name, trial_id), epoch)


class RecordedASHA(ASHAScheduler):
    """ASHA that hands each early stop (one before max_t) to `recorder`."""

    def __init__(self, *, recorder: StopRecorder | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._recorder = recorder

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = int(result.get(m.EPOCH, 0))
        if decision == TrialScheduler.STOP and epoch < self._max_t and self._recorder is not None:
            self._recorder(trial.trial_id, epoch)
        return decision


def tune_config(config: Config, recorder: StopRecorder | None = None) -> tune.TuneConfig:
    search = config.search
    scheduler = RecordedASHA(
        time_attr=m.EPOCH,
        max_t=config.optim.epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
        recorder=recorder,
    )
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return tune.TuneConfig(
            metric=m.SELECTION_METRIC,
            mode=m.SELECTION_MODE,
            scheduler=scheduler,
            search_alg=OptunaSearch(seed=search.seed),
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
        )
    # Tune ignores max_concurrent_trials for a seeded random generator: the generator limits itself.
    algorithm = BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials)
    return tune.TuneConfig(
        metric=m.SELECTION_METRIC,
        mode=m.SELECTION_MODE,
        scheduler=scheduler,
        search_alg=algorithm,
        num_samples=search.num_samples,
    )
