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

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import metrics as m
from pipeline import storage
from pipeline.config import Config, SearchSpaceParam, require_shards, with_overrides
from pipeline.data.manifest import read_manifest
from pipeline.errors import ConfigError
from pipeline.tracking.runs import (
    FAILED, end_run, find_run, flatten, prepare_tracking, resolve_tracking_uri, start_or_resume_run,
)
from pipeline.tracking.uri import redact
from pipeline.train.checkpoints import META_FILE, checkpoint_uri
from pipeline.train.driver import TrainingOutcome, TrialOptions, ensure_ray, publish, run_training, storage_path
from pipeline.tune.report import TrialSummary, log_sweep_summary, print_trial_table
from pipeline.upstream import ray_54305

SWEEP_TAG = "pipeline.sweep"
COMPLETED_TAG = "pipeline.completed"  # set by a trial that trained to its end (or its own early stop)


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
    check_cluster_fits(config)
    manifest = read_manifest(storage.join(config.data.root, "train"), config.data.shard_url_schemes)
    uri, experiment_id = prepare_tracking(config)
    # Trial actors may run where the driver's MLFLOW_TRACKING_URI is unset: hand them the resolved URI.
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"tracking_uri": uri})})
    parent_run_id, reused = start_or_resume_run(
        config, uri, experiment_id, sweep_name, manifest.content_hash(), extra_tags={SWEEP_TAG: "parent"},
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
        tuner = tune.Tuner(trainable, param_space=param_space(config), tune_config=tune_config(config),
                           run_config=tune.RunConfig(
                               name=sweep_name, storage_path=storage_root,
                               failure_config=tune.FailureConfig(max_failures=config.search.max_trial_failures),
                               callbacks=[ray_54305.release_callback(storage_root, sweep_name)],
                           ))
    client = MlflowClient(uri)
    try:
        return finish_search(config, tuner.fit(), client, uri, experiment_id, sweep_name, parent_run_id, manifest)
    except BaseException:
        end_run(uri, parent_run_id, FAILED)
        raise


def finish_search(config: Config, results, client: MlflowClient, uri: str, experiment_id: str, sweep_name: str,
                  parent_run_id: str, manifest) -> SearchOutcome:
    """Summarise the trials, close the runs, then register the best trial's model."""
    trials = summarize_trials(results, client, experiment_id, sweep_name, config.optim.epochs,
                              config.tracking.storage_path)  # absolute or a URI: run_search pinned it
    print_trial_table(trials, list(config.search.space))
    best = max((t for t in trials if t.best_top1 is not None), key=lambda t: t.best_top1, default=None)
    log_sweep_summary(client, parent_run_id, config, trials, best)
    published = None
    if best is not None and best.best_checkpoint:
        trial_config = apply_params(config, best.params, f"{sweep_name}-{best.trial_id}")
        published = publish(trial_config, uri, best.mlflow_run_id, best.best_checkpoint, best.best_metrics,
                            best.history, manifest)
    return SearchOutcome(sweep_name, parent_run_id, trials, best,
                         published.version if published else None, bool(published and published.promoted))


def trial_driver(params: dict[str, Any], base_config: Config, sweep_name: str, parent_run_id: str) -> None:
    """One Tune trial: a full Ray Train run with the sampled values, nested in the sweep's MLflow run."""
    trial_id = tune.get_context().get_trial_id()
    config = apply_params(base_config, params, f"{sweep_name}-{trial_id}")
    outcome: TrainingOutcome = run_training(
        config, trial=TrialOptions(parent_run_id=parent_run_id, callbacks=(TuneReportCallback(),)))
    MlflowClient(resolve_tracking_uri(config)).set_tag(outcome.mlflow_run_id, COMPLETED_TAG, "true")


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
        raise ConfigError("search.space is empty: add at least one parameter, e.g. optim.lr: "
                          "{kind: loguniform, low: 0.01, high: 1.0}")
    for key, spec in space.items():
        for value in _extreme_values(spec):
            apply_params(config, {key: value})
    if config.search.grace_period > config.optim.epochs:
        raise ConfigError(f"search.grace_period = {config.search.grace_period} exceeds optim.epochs = "
                          f"{config.optim.epochs}: ASHA could never stop a trial")


def _extreme_values(spec: SearchSpaceParam) -> list[Any]:
    if spec.kind == "choice":
        return list(spec.values or [])
    return [spec.low, spec.high]


TRIAL_DRIVER_MEMORY_BYTES = 256 * 1024**2  # a Python process waiting on Ray calls


def check_cluster_fits(config: Config) -> None:
    """A trial whose trainer cannot be placed would wait until Ray Train gives up on it: say so up front."""
    ensure_ray()
    problem = cluster_fit_problem(config, [node["Resources"] for node in ray.nodes() if node.get("Alive")])
    if problem:
        raise ConfigError(problem)


def cluster_fit_problem(config: Config, nodes: list[dict[str, float]]) -> str | None:
    """Why `nodes` (each node's resources) cannot run one trial, or the configured trials at once; None if they can.

    Ray Train places each worker whole on one node, so a cluster of 2 nodes x 4 GPUs holds four 2-GPU
    workers, not one 8-GPU worker; the count is per node, then summed.
    """
    per_worker = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        per_worker["GPU"] = config.scaling.gpus_per_worker
    slots = sum(min(int(node.get(name, 0) // amount) for name, amount in per_worker.items()) for node in nodes)
    workers = config.scaling.world_size
    each = " + ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
    if slots < workers:
        totals = ", ".join(f"{sum(node.get(name, 0) for node in nodes):g} {name}" for name in per_worker)
        return (f"scaling: one trial needs {workers} workers of {each} each, but the cluster's {len(nodes)} node(s) "
                f"({totals}) hold {slots}; lower scaling.num_workers or the per-worker resources")
    concurrent = slots // workers
    if config.search.max_concurrent_trials > concurrent:
        return (f"search.max_concurrent_trials = {config.search.max_concurrent_trials}: the cluster places at most "
                f"{concurrent} trial(s) of {workers} workers ({each} each) at once; a trial left waiting fails "
                f"when Ray Train's start timeout runs out, so set it to {concurrent} or less")
    return None


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


def tune_config(config: Config) -> tune.TuneConfig:
    search = config.search
    scheduler = ASHAScheduler(
        time_attr=m.EPOCH, max_t=config.optim.epochs, grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return tune.TuneConfig(
            metric=m.SELECTION_METRIC, mode=m.SELECTION_MODE, scheduler=scheduler,
            search_alg=OptunaSearch(seed=search.seed), num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
        )
    # Tune ignores max_concurrent_trials for a seeded random generator: the generator limits itself.
    algorithm = BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials)
    return tune.TuneConfig(
        metric=m.SELECTION_METRIC, mode=m.SELECTION_MODE, scheduler=scheduler, search_alg=algorithm,
        num_samples=search.num_samples,
    )


def summarize_trials(results, client: MlflowClient, experiment_id: str, sweep_name: str,
                     max_epochs: int, storage_root: str) -> list[TrialSummary]:
    summaries = []
    for result in results:
        trial_id = trial_id_of(result)
        run_name = f"{sweep_name}-{trial_id}"
        run = find_run(client.tracking_uri, experiment_id, run_name)
        frame = result.metrics_dataframe
        history = [] if frame is None or frame.empty else _epoch_rows(frame)
        best_row = _best_kept_row(history, storage_root)
        completed = bool(run and run.data.tags.get(COMPLETED_TAG) == "true")
        epochs_run = int(max((row[m.EPOCH] for row in history), default=0))
        if result.error is not None:
            status = "failed"
        elif not completed and epochs_run < max_epochs:
            status = "stopped early"
        else:
            status = "completed"
        summaries.append(TrialSummary(
            trial_id=trial_id, params={k: v for k, v in (result.config or {}).items()},
            status=status, epochs_run=epochs_run, history=history,
            best_top1=best_row[m.VAL_TOP1] if best_row else None,
            best_metrics=best_row or {}, best_checkpoint=(best_row or {}).get("checkpoint_path"),
            mlflow_run_id=run.info.run_id if run else None,
            epochs_trained=len(client.get_metric_history(run.info.run_id, m.VAL_TOP1)) if run else epochs_run,
        ))
    return summaries


def trial_id_of(result) -> str:
    """The Tune trial id, also for a trial that failed before its first report (no metrics): Tune names
    the trial folder `<trainable>_<trial id>_<index>_...`."""
    reported = (result.metrics or {}).get("trial_id")
    if reported:
        return reported
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(str(result.path)).name)
    return match.group(1) if match else "unknown"


def _best_kept_row(history: list[dict[str, Any]], storage_root: str) -> dict[str, Any] | None:
    """The best epoch whose checkpoint Ray kept (with ties, Ray may have kept another of equal score)."""
    ranked = sorted(history, key=lambda row: -row.get(m.VAL_TOP1, float("-inf")))
    for row in ranked:
        path = str(row.get("checkpoint_path") or "")
        if path and storage.is_file(storage.join(checkpoint_uri(path, storage_root), META_FILE)):
            return row
    return ranked[0] if ranked else None


def _epoch_rows(frame) -> list[dict[str, Any]]:
    """One row per epoch (the last report wins if a restarted trial reported an epoch twice)."""
    rows: dict[int, dict[str, Any]] = {}
    for row in frame.to_dict("records"):
        if m.EPOCH in row and row[m.EPOCH] == row[m.EPOCH]:  # skip NaN epochs
            rows[int(row[m.EPOCH])] = row
    return [rows[epoch] for epoch in sorted(rows)]
