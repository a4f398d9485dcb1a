"""What a training run leaves in MLflow, read back with the client: on SQLite and through a real server."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.data.manifest import read_manifest
from pipeline.tracking.provenance import GIT_COMMIT_TAG, GIT_DIRTY_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG, USER_TAG
from pipeline.tracking.registry import CHAMPION_ALIAS, DECISION_TAG
from pipeline.tracking.run_config import CONFIG_ARTIFACT
from pipeline.tracking.runs import END_CAUSE_TAG, EXPERIMENT_KIND_TAG, MANIFEST_TAG, RUN_NAME_TAG, run_scope
from pipeline.tracking.uri import resolve_tracking_uri
from pipeline.train.driver import run_training
from tests.conftest import training_config

EPOCH_METRICS = [
    m.TRAIN_LOSS,
    m.TRAIN_LR,
    m.TRAIN_IMAGES_PER_SECOND,
    m.TRAIN_DATA_WAIT_SHARE,
    m.VAL_LOSS,
    m.VAL_TOP1,
    m.VAL_TOP5,
]


def _check_run_contents(client: MlflowClient, run_id: str, config, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(config.optim.lr)
    assert run.data.params["model.name"] == config.model.name
    assert run.data.tags[RUN_NAME_TAG] == config.tracking.run_name
    assert len(run.data.tags[MANIFEST_TAG]) == 16
    # MLflow's own names, which its runs table and run page read (Source, User, Version).
    assert len(run.data.tags[GIT_COMMIT_TAG]) == 40 and run.data.tags[GIT_DIRTY_TAG] in ("true", "false")
    assert "git.commit" not in run.data.tags
    assert run.data.tags[SOURCE_TYPE_TAG] == "LOCAL" and run.data.tags[SOURCE_NAME_TAG] and run.data.tags[USER_TAG]
    assert run.data.tags["mlflow.note.content"].startswith(f"{config.model.name} trained on train of ")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    for key in EPOCH_METRICS:
        assert [p.step for p in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key
    # Step metrics: ~100 points per epoch by default, so every step of these tiny epochs, at global steps.
    steps = [p.step for p in client.get_metric_history(run_id, m.STEP_LOSS)]
    assert steps == sorted(steps) and len(steps) >= epochs and steps[-1] > epochs
    assert len(client.get_metric_history(run_id, m.STEP_IMAGES_PER_SECOND)) == len(steps)
    # The splits as MLflow datasets: the UI's Dataset column and the run's "Datasets used".
    inputs = {inp.dataset.name: inp for inp in run.inputs.dataset_inputs}
    for split in ("train", "val"):
        manifest = read_manifest(Path(config.data.root) / split)
        assert inputs[split].dataset.digest == manifest.content_hash()
        assert [t.value for t in inputs[split].tags if t.key == "mlflow.data.context"] == [split]
        assert json.loads(inputs[split].dataset.profile)["num_samples"] == manifest.num_samples
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"learning_curve.png", CONFIG_ARTIFACT} <= artifacts
    assert DECISION_TAG in run.data.tags


def test_sqlite_run_has_params_epoch_metrics_plot_model_version_and_alias(trained_run):
    client = MlflowClient(trained_run.tracking_uri)
    _check_run_contents(client, trained_run.outcome.mlflow_run_id, trained_run.config, epochs=3)
    version = client.get_model_version("test-model", trained_run.outcome.model_version)
    assert version.run_id == trained_run.outcome.mlflow_run_id
    champion = client.get_model_version_by_alias("test-model", CHAMPION_ALIAS)
    assert str(champion.version) == trained_run.outcome.model_version  # the first model is always promoted
    assert float(version.tags[m.VAL_TOP1]) == pytest.approx(trained_run.outcome.best_metrics[m.VAL_TOP1])
    system = [key for key in client.get_run(version.run_id).data.metrics if key.startswith("system/")]
    # One monitor per node, under MLflow's node id: both workers of this run share node 0.
    assert system and all(key.startswith("system/node_0/") for key in system), system
    registered = client.get_registered_model("test-model")
    assert "@champion" in registered.description and "champion history test-model" in registered.description
    assert version.description.startswith("resnet18, 4 classes, trained on train of ")
    assert "Best: " in version.description and "Made by: " in version.description
    import mlflow

    logged_model = mlflow.models.Model.load(f"models:/test-model/{trained_run.outcome.model_version}")
    assert logged_model.metadata["embedding"] == {"layer": "avgpool", "dim": 512, "normalised": "l2"}


def test_default_tracking_uri_is_an_absolute_sqlite_file_in_the_project(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(load_config()) == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    relative = load_config(overrides=["tracking.tracking_uri=sqlite:///runs/x.db"])
    assert resolve_tracking_uri(relative) == f"sqlite:///{PROJECT_ROOT / 'runs' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri(load_config()) == "http://mlflow.internal:5000"


@pytest.mark.slow
@pytest.mark.ray
def test_training_through_a_real_mlflow_server(ray_session, learnable_shards, tmp_path, mlflow_server):
    # Local mode keeps this quick; the 2-worker path is covered on SQLite above.
    config = training_config(
        learnable_shards,
        tmp_path,
        "via-server",
        "optim.epochs=2",
        "scaling.num_workers=0",
        f"tracking.tracking_uri={mlflow_server}",
        "tracking.registered_model=server-model",
    )
    outcome = run_training(config)
    client = MlflowClient(mlflow_server)
    _check_run_contents(client, outcome.mlflow_run_id, config, epochs=2)
    assert str(client.get_model_version_by_alias("server-model", CHAMPION_ALIAS).version) == outcome.model_version


def test_a_sqlite_store_inside_a_ray_jobs_working_dir_copy_is_refused(monkeypatch):
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking.uri import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(
        overrides=[
            "tracking.tracking_uri=sqlite:////tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_1/mlflow.db"
        ]
    )
    with pytest.raises(ConfigError, match="would vanish with the job; set MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(config)


def _open_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'scope.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("scope")).info.run_id


def test_a_run_scope_that_completes_ends_its_run_finished(tmp_path):
    uri, client, run_id = _open_run(tmp_path)
    with run_scope(uri, run_id) as scoped:
        assert scoped == run_id and client.get_run(run_id).info.status == "RUNNING"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and END_CAUSE_TAG not in run.data.tags


def test_a_run_scope_left_by_an_error_ends_its_run_failed_with_the_errors_first_line(tmp_path):
    uri, client, run_id = _open_run(tmp_path)
    with pytest.raises(ValueError, match="worker 3 lost"):  # the error itself goes on, unchanged
        with run_scope(uri, run_id):
            raise ValueError("worker 3 lost\nTraceback lines a run page should not carry")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[END_CAUSE_TAG] == "ValueError: worker 3 lost"


def test_an_interrupted_run_scope_ends_its_run_killed(tmp_path):
    uri, client, run_id = _open_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with run_scope(uri, run_id):
            raise KeyboardInterrupt
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[END_CAUSE_TAG] == "interrupted (KeyboardInterrupt)"


def test_a_sigterm_turned_into_an_exit_ends_the_run_killed(tmp_path):
    """Ray's driver turns SIGTERM (`ray job stop`) into sys.exit(15); the run says it was stopped, not failed."""
    import os
    import signal
    import sys

    uri, client, run_id = _open_run(tmp_path)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
    try:
        with pytest.raises(SystemExit):
            with run_scope(uri, run_id):
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()  # the handler raises here at the latest
    finally:
        signal.signal(signal.SIGTERM, previous)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[END_CAUSE_TAG] == "interrupted (SystemExit: 15)"


def test_a_store_that_fails_while_a_run_fails_does_not_hide_the_runs_own_error(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="the real cause"):
        with run_scope(f"sqlite:///{tmp_path / 'scope.db'}", "no-such-run"):
            raise RuntimeError("the real cause")
    assert "MLflow run no-such-run not marked FAILED" in capsys.readouterr().err
