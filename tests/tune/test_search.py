"""Ray Tune sweeps: bad spaces refused up front; a real 4-trial ASHA sweep; resume after the driver dies."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import ConfigError
from pipeline.tracking.registry import CHAMPION_ALIAS, DECISION_TAG
from pipeline.tracking.runs import RUN_NAME_TAG
from pipeline.tracking.sweeps import ENDED_AT_TAG, STOP_DECIDED_TAG, STOPPED_TAG, SWEEP_TAG
from pipeline.train.checkpoints import read_run_record
from pipeline.tune.cluster_fit import fit_concurrency_to_cluster
from pipeline.tune.refit import REFIT_SWEEP_TAG, REFIT_TAG, REFIT_TRIAL_TAG, run_refit
from pipeline.tune.search import apply_params, check_search, run_search
from tests.conftest import training_config

# Seed 0 samples lr 1.6, 1.6, 1e-6, 1e-6: the two hopeless trials start only after a good one has set
# ASHA's first rung (2 at a time), so ASHA must stop them after the grace epoch. Without warmup a good
# trial is at >= 75 % val top-1 after one epoch on this data; a hopeless one stays at chance (25 %).
SWEEP = [
    "scaling.num_workers=1",
    "optim.epochs=3",
    "optim.batch_size=8",
    "optim.warmup_epochs=0",
    "search.num_samples=4",
    "search.max_concurrent_trials=2",
    "search.grace_period=1",
    "search.reduction_factor=2",
    "search.seed=0",
    "search.space={optim.lr: {kind: choice, values: [0.000001, 1.6]}, "
    "model.dropout: {kind: uniform, low: 0.0, high: 0.3}}",
]


def _sweep_config(shards, workdir, name, *extra):
    return training_config(shards, workdir, name, *SWEEP, *extra)


@pytest.fixture(scope="module")
def shards_without_test(learnable_shards, tmp_path_factory):
    """A sweep must never read the test split: give it a data root that has none."""
    root = tmp_path_factory.mktemp("no_test")
    for split in ("train", "val"):
        shutil.copytree(learnable_shards / split, root / split)
    return root


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.space={}"], "search.space is empty"),
        (
            ["scaling.num_workers=2", "search.space={optim.batch_size: {kind: choice, values: [16, 33]}}"],
            r"optim\.batch_size = 33 is not divisible by scaling\.num_workers = 2",
        ),
        (["search.space={optim.lrr: {kind: uniform, low: 0.1, high: 0.2}}"], r"optim\.lrr: unknown config key"),
        (["search.space={optim.lr: {kind: uniform, low: -1, high: 0.2}}"], r"optim\.lr = -1.*greater than 0"),
        (["search.grace_period=5"], r"search\.grace_period = 5 exceeds optim\.epochs = 3"),
    ],
    ids=["empty", "batch-not-divisible", "unknown-key", "negative-lr", "grace-period"],
)
def test_invalid_search_fails_before_any_trial(learnable_shards, tmp_path, overrides, message):
    config = _sweep_config(learnable_shards, tmp_path, "bad", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_search(config)


@pytest.mark.ray
def test_trial_needing_more_than_the_cluster_is_refused(ray_session, learnable_shards, tmp_path):
    config = _sweep_config(learnable_shards, tmp_path, "big", "scaling.num_workers=8")
    with pytest.raises(
        ConfigError, match=r"one trial needs 8 workers of 1 CPU each, but the cluster's 1 node\(s\) \(4 CPU\) hold 4"
    ):
        fit_concurrency_to_cluster(config)


@pytest.mark.ray
def test_more_concurrent_trials_than_fit_run_as_many_as_fit_and_the_rest_wait(
    ray_session, learnable_shards, tmp_path, capsys
):
    config = _sweep_config(learnable_shards, tmp_path, "one", "scaling.cpus_per_worker=3")  # 4 CPUs hold 1
    fitted = fit_concurrency_to_cluster(config)
    assert (config.search.max_concurrent_trials, fitted.search.max_concurrent_trials) == (2, 1)
    assert "places 1 trial(s) of 1 workers at once; running 1 at a time, the others wait" in capsys.readouterr().out
    assert fit_concurrency_to_cluster(fitted) is fitted


def test_sampled_values_land_in_the_trial_config(learnable_shards, tmp_path):
    base = _sweep_config(learnable_shards, tmp_path, "x")
    trial = apply_params(base, {"optim.lr": 0.123, "model.dropout": 0.2}, "x-trial1")
    assert trial.optim.lr == 0.123 and trial.model.dropout == 0.2 and trial.tracking.run_name == "x-trial1"
    assert trial.optim.momentum == base.optim.momentum


def _children(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
@pytest.mark.ray
def test_asha_sweep_on_a_cluster_holding_one_trial_finishes_all_four_and_registers_the_best(
    ray_session, shards_without_test, tmp_path, capsys
):
    """4 trials, 2 asked to run at once, on a cluster that holds 1 (3-CPU workers on 4 CPUs): one at a time."""
    config = _sweep_config(
        shards_without_test, tmp_path, "sweep-a", "tracking.registered_model=sweep-model", "scaling.cpus_per_worker=3"
    )
    outcome = run_search(config)

    assert "running 1 at a time, the others wait" in capsys.readouterr().out
    assert len(outcome.trials) == 4 and all(t.status in ("completed", "stopped early") for t in outcome.trials)
    hopeless = [t for t in outcome.trials if t.params["optim.lr"] < 1e-3]
    assert len(hopeless) == 2
    # ASHA decides at the grace epoch; its stop lands asynchronously, so the trial may end one epoch later.
    assert all(t.status == "stopped early" and t.stop_decided_at == 1 and t.epochs_run in (1, 2) for t in hopeless)
    # A good trial may also stop at the epoch-2 rung if it trails the other good one: ASHA keeps the top half.
    assert outcome.best.params["optim.lr"] == 1.6 and outcome.best.best_top1 > 50
    stopped = sum(t.status == "stopped early" for t in outcome.trials)
    client = MlflowClient(config.tracking.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags[SWEEP_TAG] == "parent" and parent.info.status == "FINISHED"  # ended by its run_scope
    assert parent.data.metrics["sweep/trials_completed"] == 4 - stopped
    assert parent.data.metrics["sweep/trials_stopped_early"] == stopped
    assert parent.data.metrics["sweep/trials_failed"] == parent.data.metrics["sweep/trials_without_result"] == 0
    trained = sum(t.epochs_run for t in outcome.trials)
    assert parent.data.metrics["sweep/trial_epochs"] == trained < 12
    decided = sum(t.stop_decided_at or t.epochs_run for t in outcome.trials)
    assert parent.data.metrics["sweep/trial_epochs_to_stop_decisions"] == decided <= trained
    assert parent.data.metrics["sweep/trial_epochs_budget"] == 4 * 3
    assert {a.path for a in client.list_artifacts(outcome.parent_run_id)} >= {
        "sweep_learning_curves.png",
        "sweep_parameters.png",
    }
    children = _children(client, parent.info.experiment_id, outcome.parent_run_id)
    assert len(children) == 4
    for child in children:
        steps = [p.step for p in client.get_metric_history(child.info.run_id, m.VAL_TOP1)]
        ended = int(child.data.tags[ENDED_AT_TAG])
        if child.data.tags[STOPPED_TAG] == "true":
            assert ended <= int(child.data.tags[STOP_DECIDED_TAG]) + 1
        else:
            assert ended == 3
        # A stop may land between an epoch's checkpoint and its MLflow metrics; the summary logs what MLflow lacks.
        assert steps == list(range(1, ended + 1))
    champion = client.get_model_version_by_alias("sweep-model", CHAMPION_ALIAS)
    assert str(champion.version) == outcome.model_version
    assert champion.run_id == outcome.best.mlflow_run_id
    _check_refit(client, config, outcome)


def _check_refit(client, config, outcome):
    """The sweep's best configuration on train + val, for the epochs its trial needed, gated on its sweep score."""
    scores = client.get_metric_history(outcome.best.mlflow_run_id, m.VAL_TOP1)
    best = max(scores, key=lambda point: (point.value, -point.step))
    refit = run_refit(config, "sweep-a", ["scaling.num_workers=0"])  # local mode: the same loop, no group start
    run = client.get_run(refit.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
    assert (run.data.tags[REFIT_SWEEP_TAG], run.data.tags[REFIT_TRIAL_TAG]) == ("sweep-a", outcome.best.trial_id)
    assert [p.step for p in client.get_metric_history(run.info.run_id, m.TRAIN_LOSS)] == list(range(1, best.step + 1))
    assert not [key for key in run.data.metrics if key.startswith("val/")]  # nothing left to validate on
    # One plan over both splits: (80 train + 16 val) // batch 8 = 12 steps an epoch (one process, as in the trial).
    assert client.get_metric_history(run.info.run_id, m.STEP_LOSS)[-1].step == 12 * best.step
    contexts = {inp.dataset.name: [t.value for t in inp.tags] for inp in run.inputs.dataset_inputs}
    assert contexts == {"train": ["train"], "val": ["train"]}
    version = client.get_model_version("sweep-model", refit.model_version)
    assert version.tags[REFIT_TAG] == "true" and float(version.tags[m.VAL_TOP1]) == pytest.approx(best.value)
    assert (
        f"refit of sweep sweep-a trial {outcome.best.trial_id} on train+val, gated on the sweep's"
        in (version.tags[DECISION_TAG])
    )
    # It retrains the champion's own configuration on more data: it takes the alias at the same score.
    assert refit.promoted and version.tags[DECISION_TAG].startswith("promoted: retrains version")
    assert "trained on train+val of" in version.description


def _wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(1)
    return False


def _trials_at_epoch(storage, epoch) -> list[str]:
    """The trial runs whose last registered checkpoint is of `epoch`."""
    return [
        path.name
        for path in storage.glob("sweep-r-*")
        if (record := read_run_record(str(storage), path.name)) and record.epochs == epoch
    ]


def _events(path, name):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if f'"{name}"' in line]


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_killed_after_a_trials_last_checkpoint_resumes_with_that_trials_true_result(
    shards_without_test, tmp_path
):
    """The sweep's driver dies after a trial's last checkpoint and before Tune records that epoch. Made exact by
    freezing the driver (SIGSTOP) once a trial ends its first epoch: the trial's Ray Train run, in its own
    processes, trains and checkpoints its last (epoch 2) and hands the result to a Tune that cannot record it;
    then SIGKILL."""
    # The two good trials (seed 0 samples lr 1.6 twice first), running together, of 2 epochs (the last is the
    # one Tune must not miss).
    overrides = [f"--set={o}" for o in SWEEP] + [
        "--set=search.num_samples=2",
        "--set=optim.epochs=2",
        f"--set=data.root={shards_without_test}",
        "--set=data.train_image_size=32",
        "--set=data.eval_image_size=32",
        "--set=data.loader_workers=0",
        f"--set=tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"--set=tracking.storage_path={tmp_path / 'ray'}",
        "--set=tracking.run_name=sweep-r",
        "--set=tracking.experiment=tests",
        "--set=tracking.registered_model=resume-model",
    ]
    command = [sys.executable, "-m", "pipeline.cli", "tune", *overrides]
    events = tmp_path / "events.jsonl"
    # "local": a fresh Ray of its own, not the session-wide one this test process may have started.
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
        "PIPELINE_EVENTS_FILE": str(events),
    }
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def epoch_ended(epoch):
        return any(event.get("epoch") == epoch for event in _events(events, "epoch_end"))

    try:
        reached = _wait_for(lambda: epoch_ended(1) or driver.poll() is not None, 400)
        assert reached and driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGSTOP)  # Tune stops here; the trials' own processes go on
        assert _wait_for(lambda: epoch_ended(2), 300), (tmp_path / "driver.log").read_text()[-3000:]
        # Ray Train's controller registers the reported checkpoint just after the worker's report, and the worker
        # logs that epoch to MLflow right after: both must land before the kill, or the resume's fill-in of missing
        # epochs races the old worker's own log (a duplicate step). The record is polled; the log has no event yet.
        assert _wait_for(lambda: _trials_at_epoch(tmp_path / "ray", 2), 60)
        time.sleep(3)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    finished = _trials_at_epoch(tmp_path / "ray", 2)
    assert finished  # one trial, or both that were running: each ended epoch 2 after Tune froze
    for run_name in finished:
        trial_id = run_name.removeprefix("sweep-r-")
        recorded = "".join(p.read_text() for p in (tmp_path / "ray" / "sweep-r").glob(f"*{trial_id}*/result.json"))
        assert '"epoch": 2' not in recorded  # Tune never saw the trial's last epoch

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(SWEEP_TAG) == "parent"]
    assert len(parents) == 1, "the resumed sweep must reuse its MLflow parent run"
    children = {
        r.data.tags[RUN_NAME_TAG]: r for r in _children(client, experiment.experiment_id, parents[0].info.run_id)
    }
    assert len(children) == 2
    for run_name in finished:
        history = client.get_metric_history(children[run_name].info.run_id, m.VAL_TOP1)
        assert [p.step for p in history] == [1, 2]  # resumed from its last checkpoint, not trained again
        true_best = max(p.value for p in history)
        trial_id = run_name.removeprefix("sweep-r-")
        row = next(line.split() for line in resumed.stdout.splitlines() if line.strip().startswith(trial_id))
        assert row[3:6] == [f"{true_best:.2f}", "2", "completed"], resumed.stdout[-3000:]
        # Tune got the last epoch too: the resumed run, with nothing left to train, reported its recorded end.
        results = "".join(p.read_text() for p in (tmp_path / "ray" / "sweep-r").glob(f"*{trial_id}*/result.json"))
        assert '"epoch": 2' in results
    summary = client.get_run(parents[0].info.run_id).data
    assert summary.metrics["sweep/trials_failed"] == summary.metrics["sweep/trials_without_result"] == 0
    best_trial = summary.tags["best_trial"]
    best_scores = {
        name: max(p.value for p in client.get_metric_history(run.info.run_id, m.VAL_TOP1))
        for name, run in children.items()
    }
    assert best_scores[f"sweep-r-{best_trial}"] == max(best_scores.values())
    champion = client.get_model_version_by_alias("resume-model", CHAMPION_ALIAS)
    assert champion.run_id == children[f"sweep-r-{best_trial}"].info.run_id  # this trial, if it is the best
