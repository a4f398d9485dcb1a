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
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import metrics as m
from pipeline import storage
from pipeline.cluster.session import ensure_ray
from pipeline.config import Config, SearchSpaceParam, require_shards, with_overrides
from pipeline.data.manifest import read_manifest
from pipeline.errors import CheckpointError, ConfigError, StorageError, first_line
from pipeline.tracking.runs import (
    FAILED,
    end_run,
    find_run,
    flatten,
    prepare_tracking,
    resolve_tracking_uri,
    start_or_resume_run,
)
from pipeline.tracking.uri import redact
from pipeline.train.checkpoints import read_run_record
from pipeline.train.driver import TrainingOutcome, TrialOptions, publish, run_training, storage_path
from pipeline.tune.report import (
    COMPLETED,
    FAILED_STATUS,
    NO_RESULT,
    STOP_DECIDED_TAG,
    STOPPED,
    TrialSummary,
    log_sweep_summary,
    print_trial_table,
    tag_stop_decision,
)
from pipeline.upstream import ray_54305

SWEEP_TAG = "pipeline.sweep"
COMPLETED_TAG = "pipeline.completed"  # set by a trial that trained to its end (or its own early stop)
WAITED_TAG = "pipeline.waited_for_resources_s"  # set by a trial that waited for room on the cluster to start


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
    client = MlflowClient(uri)
    try:
        return finish_search(config, tuner.fit(), client, uri, experiment_id, sweep_name, parent_run_id, manifest)
    except BaseException:
        end_run(uri, parent_run_id, FAILED)
        raise


def finish_search(
    config: Config,
    results,
    client: MlflowClient,
    uri: str,
    experiment_id: str,
    sweep_name: str,
    parent_run_id: str,
    manifest,
) -> SearchOutcome:
    """Summarise the trials, close the runs, then register the best trial's model."""
    trials = summarize_trials(
        results, client, experiment_id, sweep_name, config.optim.epochs, config.tracking.storage_path
    )  # absolute or a URI: run_search pinned it
    print_trial_table(trials, list(config.search.space))
    best = max((t for t in trials if t.best_top1 is not None), key=lambda t: t.best_top1, default=None)
    log_sweep_summary(client, parent_run_id, config, trials, best)
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
    client = MlflowClient(resolve_tracking_uri(config))
    if waited >= 1:
        client.set_tag(outcome.mlflow_run_id, WAITED_TAG, f"{waited:.0f}")
    client.set_tag(outcome.mlflow_run_id, COMPLETED_TAG, "true")


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """A trial's Ray Train run and MLflow run name: a restarted trial finds its own checkpoints by it."""
    return f"{sweep_name}-{trial_id}"


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


def fit_concurrency_to_cluster(config: Config) -> Config:
    """The config with search.max_concurrent_trials lowered to what the cluster places at once (Tune keeps the
    other trials pending until one ends); a ConfigError if not even one trial fits."""
    ensure_ray()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = cluster_fit_problem(config, nodes)
    if problem:
        raise ConfigError(problem)
    room = concurrent_trials(config, nodes)
    if config.search.max_concurrent_trials <= room:
        return config
    print(
        f"search.max_concurrent_trials = {config.search.max_concurrent_trials}: the cluster places {room} "
        f"trial(s) of {config.scaling.world_size} workers at once; running {room} at a time, the others wait"
    )
    return with_overrides(config, {"search.max_concurrent_trials": room})


def _per_worker(config: Config) -> dict[str, float]:
    per_worker = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        per_worker["GPU"] = config.scaling.gpus_per_worker
    return per_worker


def _worker_slots(config: Config, nodes: list[dict[str, float]]) -> int:
    """Workers the nodes hold. Ray Train places each worker whole on one node, so a cluster of 2 nodes x 4 GPUs
    holds four 2-GPU workers, not one 8-GPU worker; the count is per node, then summed."""
    per_worker = _per_worker(config)
    return sum(min(int(node.get(name, 0) // amount) for name, amount in per_worker.items()) for node in nodes)


def cluster_fit_problem(config: Config, nodes: list[dict[str, float]]) -> str | None:
    """Why `nodes` (each node's resources) cannot run one trial; None if they can."""
    per_worker = _per_worker(config)
    slots, workers = _worker_slots(config, nodes), config.scaling.world_size
    if slots >= workers:
        return None
    each = " + ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
    totals = ", ".join(f"{sum(node.get(name, 0) for node in nodes):g} {name}" for name in per_worker)
    return (
        f"scaling: one trial needs {workers} workers of {each} each, but the cluster's {len(nodes)} node(s) "
        f"({totals}) hold {slots}; lower scaling.num_workers or the per-worker resources"
    )


def concurrent_trials(config: Config, nodes: list[dict[str, float]]) -> int:
    return _worker_slots(config, nodes) // config.scaling.world_size


ROOM_POLL_S = 2.0


def wait_for_room(config: Config, trial_id: str) -> float:
    """Wait (without limit) until the cluster has free room for this trial's workers, and return the seconds
    waited. Ray Train gives a worker group a start timeout and then fails the run, so a trial started while other
    work holds the cluster would fail; waiting here, before its trainer exists, costs nothing. Free resources
    are the cluster's total (Ray gives no per-node view publicly): if they fit only across nodes, Ray Train's own
    timeout still applies."""
    if config.scaling.num_workers == 0:
        return 0.0  # local mode trains in the trial's own process
    started = time.monotonic()
    announced = False
    while (problem := cluster_fit_problem(config, [ray.available_resources()])) is not None:
        if not announced:
            print(f"trial {trial_id} waiting for resources: {problem.replace('hold', 'have free room for')}")
            announced = True
        time.sleep(ROOM_POLL_S)
    waited = time.monotonic() - started
    if announced:
        print(f"trial {trial_id} starts after waiting {waited:.0f} s for resources")
    return waited


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
        run = find_run(self.tracking_uri, self.experiment_id, trial_run_name(self.sweep_name, trial_id))
        if run is not None:
            tag_stop_decision(MlflowClient(self.tracking_uri), run.info.run_id, epoch)


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


def summarize_trials(
    results, client: MlflowClient, experiment_id: str, sweep_name: str, max_epochs: int, storage_root: str
) -> list[TrialSummary]:
    """Every trial from its own record, its checkpoints (what publishing loads too), never from whichever Tune
    result arrived last: a trial resumed after the sweep's driver died may have reported its end only to a
    Tune that no longer exists."""
    summaries = []
    for result in results:
        trial_id = trial_id_of(result)
        run_name = trial_run_name(sweep_name, trial_id)
        run = find_run(client.tracking_uri, experiment_id, run_name)
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
        status, note = FAILED_STATUS, note or first_line(result.error)
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
