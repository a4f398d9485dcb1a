"""What a training run leaves in MLflow, read back with the client: on SQLite and through a real server."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.tracking.registry import CHAMPION_ALIAS, DECISION_TAG, champion_gate
from pipeline.tracking.runs import MANIFEST_TAG, RUN_NAME_TAG, resolve_tracking_uri
from pipeline.train.driver import run_training
from tests.conftest import training_config

EPOCH_METRICS = [m.TRAIN_LOSS, m.TRAIN_LR, m.TRAIN_IMAGES_PER_SECOND, m.TRAIN_DATA_WAIT_SHARE,
                 m.VAL_LOSS, m.VAL_TOP1, m.VAL_TOP5]


def _check_run_contents(client: MlflowClient, run_id: str, config, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(config.optim.lr)
    assert run.data.params["model.name"] == config.model.name
    assert run.data.tags[RUN_NAME_TAG] == config.tracking.run_name
    assert len(run.data.tags[MANIFEST_TAG]) == 16
    assert len(run.data.tags["git.commit"]) == 40 and run.data.tags["git.dirty"] in ("true", "false")
    for key in EPOCH_METRICS:
        assert [p.step for p in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "learning_curve.png" in artifacts
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
    assert system, "system metrics (CPU, memory) were not recorded"
    import mlflow

    logged_model = mlflow.models.Model.load(f"models:/test-model/{trained_run.outcome.model_version}")
    assert logged_model.metadata["embedding"] == {"layer": "avgpool", "dim": 512, "normalised": "l2"}


def test_champion_moves_only_when_val_top1_beats_the_current_champion(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'gate.db'}")
    client.create_registered_model("gate")
    run = client.create_run(client.create_experiment("gate"))
    for _ in range(3):
        client.create_model_version("gate", "file:///nowhere", run_id=run.info.run_id)
    assert champion_gate(client, "gate", "1", 60.0)[0] is True
    client.set_model_version_tag("gate", "1", m.VAL_TOP1, "60.0")
    promoted, decision = champion_gate(client, "gate", "2", 55.0)
    assert not promoted and "kept version 1" in decision
    assert str(client.get_model_version_by_alias("gate", CHAMPION_ALIAS).version) == "1"
    promoted, decision = champion_gate(client, "gate", "3", 61.5)
    assert promoted and "61.50 > 60.00" in decision
    assert str(client.get_model_version_by_alias("gate", CHAMPION_ALIAS).version) == "3"


def test_default_tracking_uri_is_an_absolute_sqlite_file_in_the_project(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(load_config()) == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    relative = load_config(overrides=["tracking.tracking_uri=sqlite:///runs/x.db"])
    assert resolve_tracking_uri(relative) == f"sqlite:///{PROJECT_ROOT / 'runs' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri(load_config()) == "http://mlflow.internal:5000"


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.ray
def test_training_through_a_real_mlflow_server(ray_session, learnable_shards, tmp_path, mlflow_server):
    # Local mode keeps this quick; the 2-worker path is covered on SQLite above.
    config = training_config(learnable_shards, tmp_path, "via-server", "optim.epochs=2", "scaling.num_workers=0",
                             f"tracking.tracking_uri={mlflow_server}", "tracking.registered_model=server-model")
    outcome = run_training(config)
    client = MlflowClient(mlflow_server)
    _check_run_contents(client, outcome.mlflow_run_id, config, epochs=2)
    assert str(client.get_model_version_by_alias("server-model", CHAMPION_ALIAS).version) == outcome.model_version


def test_a_ray_job_driver_tags_its_run_with_the_submission_id(monkeypatch):
    from pipeline.tracking.runs import ray_job_tags

    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_tags() == {}
    # What Ray's job supervisor sets for `ray job submit --submission-id nightly-r50`.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       '{"runtime_env": {}, "metadata": {"job_submission_id": "nightly-r50", "job_name": "x"}}')
    assert ray_job_tags() == {"ray.job_id": "nightly-r50"}


def test_a_job_without_git_takes_the_submitters_commit(monkeypatch):
    from pipeline.tracking.runs import git_tags

    monkeypatch.setenv("PIPELINE_GIT_COMMIT", "abc123")
    monkeypatch.setenv("PIPELINE_GIT_DIRTY", "true")
    assert git_tags() == {"git.commit": "abc123", "git.dirty": "true"}


def test_a_sqlite_store_inside_a_ray_jobs_working_dir_copy_is_refused(monkeypatch):
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking.uri import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(overrides=[
        "tracking.tracking_uri=sqlite:////tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_1/mlflow.db"])
    with pytest.raises(ConfigError, match="would vanish with the job; set MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(config)
