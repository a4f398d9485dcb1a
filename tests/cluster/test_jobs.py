"""Job submission settings resolved before any network call: address, token, tracking URI, entrypoint."""

from __future__ import annotations

import json
import stat

import pytest

from pipeline.cluster.jobs import ClusterAddress, JobClientError, job_tracking_uri, read_token, resolve_address, submit
from pipeline.cluster.local import STATE_FILE, LocalCluster, write_token
from pipeline.config import PROJECT_ROOT


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_the_address_comes_from_the_option_then_the_environment_then_localhost(clean_env):
    assert resolve_address().dashboard_url == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address, as Ray sets it inside every job
    assert resolve_address().dashboard_url == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address().dashboard_url == "http://head:8265"
    clean_env.setenv("RAY_API_SERVER_ADDRESS", "head-api:8265")  # Ray's job CLI prefers this one
    assert resolve_address().dashboard_url == "http://head-api:8265"
    assert resolve_address("https://ray.example.com/").dashboard_url == "https://ray.example.com"


def test_a_gcs_or_client_address_is_refused_with_the_right_one_named(clean_env):
    with pytest.raises(JobClientError, match=r"ray://head:10001.*dashboard's HTTP address \(http://<head>:8265\)"):
        resolve_address("ray://head:10001")


def test_the_token_is_looked_up_in_rays_order(clean_env, tmp_path):
    assert read_token() is None
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("from-home\n")
    assert read_token() == "from-home"
    path_token = tmp_path / "path_token"
    path_token.write_text("from-path")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert read_token() == "from-path"
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_token() == "from-env"
    given = tmp_path / "given"
    given.write_text("from-file")
    assert read_token(given) == "from-file"
    with pytest.raises(JobClientError, match="--token-file .*: no such file"):
        read_token(tmp_path / "missing")


def test_a_relative_sqlite_uri_is_pinned_to_the_project_not_the_jobs_temporary_copy(clean_env):
    local = ClusterAddress("http://127.0.0.1:8265", None)
    assert job_tracking_uri(local, "sqlite:///mlflow.db") == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert job_tracking_uri(local, None) is None  # the cluster's own MLFLOW_TRACKING_URI then applies
    # This shell's URI (often a port-forward) is not forwarded: only --mlflow-uri is.
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert job_tracking_uri(local, None) is None


def test_a_file_store_is_refused_for_a_remote_cluster(clean_env):
    remote = ClusterAddress("http://ray-head.example:8265", None)
    with pytest.raises(JobClientError, match="cannot reach; pass an MLflow server"):
        job_tracking_uri(remote, "sqlite:////data/mlflow.db")
    assert job_tracking_uri(remote, "https://mlflow.example") == "https://mlflow.example"


def test_a_token_sent_over_plain_http_to_another_host_is_warned_about(clean_env, caplog):
    clean_env.setenv("RAY_AUTH_TOKEN", "secret-token")
    resolve_address("http://127.0.0.1:8265")  # a port-forward or tunnel: fine
    assert caplog.text == ""
    resolve_address("http://ray-head.example:8265")
    assert "over plain http" in caplog.text and "secret-token" not in caplog.text


def test_a_ray_address_that_is_no_job_server_is_ignored_out_loud(clean_env, caplog):
    clean_env.setenv("RAY_ADDRESS", "ray://head:10001")
    assert resolve_address().dashboard_url == "http://127.0.0.1:8265"
    assert "RAY_ADDRESS=ray://head:10001 is not a job server" in caplog.text


def test_submit_refuses_an_empty_entrypoint_or_a_missing_working_dir_before_connecting(clean_env, tmp_path):
    nowhere = ClusterAddress("http://127.0.0.1:9", None)  # nothing listens: these must fail first
    with pytest.raises(JobClientError, match="no entrypoint: put the command after `--`"):
        submit(nowhere, [])
    with pytest.raises(JobClientError, match="--working-dir .*: no such directory"):
        submit(nowhere, ["python", "-V"], working_dir=tmp_path / "missing")


def test_an_unreachable_job_server_is_one_line(clean_env):
    with pytest.raises(JobClientError, match="http://127.0.0.1:9") as error:
        ClusterAddress("http://127.0.0.1:9", None).client()
    assert "\n" not in str(error.value)


def test_the_local_clusters_token_is_private_and_fresh(tmp_path):
    write_token(tmp_path / "auth_token")
    first = (tmp_path / "auth_token").read_text()
    assert stat.S_IMODE((tmp_path / "auth_token").stat().st_mode) == 0o600 and len(first) == 64
    write_token(tmp_path / "auth_token")
    assert (tmp_path / "auth_token").read_text() != first


def test_a_stale_cluster_record_is_cleaned_up_not_reused(tmp_path):
    # Written by an earlier version (its extra mlflow_started key is ignored).
    record = {
        "state_dir": str(tmp_path),
        "temp_dir": str(tmp_path / "gone"),
        "gcs_port": 1,
        "dashboard_port": 2,
        "mlflow_port": 3,
        "mlflow_pid": None,
        "mlflow_started": None,
        "nodes": 2,
        "cpus_per_node": 1,
    }
    (tmp_path / STATE_FILE).write_text(json.dumps(record))
    assert LocalCluster.load(tmp_path) is None
    assert not (tmp_path / STATE_FILE).exists()


def test_a_cluster_needs_at_least_one_node(tmp_path):
    with pytest.raises(ValueError, match="nodes = 0, cpus_per_node = 1: both must be at least 1"):
        LocalCluster.start(tmp_path, nodes=0)
