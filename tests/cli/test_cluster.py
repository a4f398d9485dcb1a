"""`job ...` and `cluster ...` (pipeline/cli/cluster.py): what is refused or answered before any cluster is reached.
The commands against a real cluster are tested in tests/cluster/test_local.py."""

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.fixture
def no_cluster_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_submit_without_an_entrypoint_is_one_line_before_connecting(no_cluster_env):
    # Port 1: nothing listens there, so reaching the cluster would fail with a different message.
    result = runner.invoke(app, ["job", "submit", "--address", "http://127.0.0.1:1", "--no-wait"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: no entrypoint: put the command after `--`, e.g. -- python -m jobs.train -c jobs/configs/demo.yaml"
    ]


def test_submit_of_a_missing_working_dir_is_one_line(no_cluster_env, tmp_path):
    missing = tmp_path / "project"
    result = runner.invoke(
        app,
        ["job", "submit", "--address", "http://127.0.0.1:1", "--working-dir", str(missing), "--", "python", "-V"],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: --working-dir '{missing}': no such directory"]


@pytest.mark.parametrize("command", [["status", "raysubmit_1"], ["stop", "raysubmit_1"], ["list"]])
def test_a_client_address_is_refused_in_one_line_naming_the_dashboards(no_cluster_env, command):
    result = runner.invoke(app, ["job", *command, "--address", "ray://head:10001"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: address 'ray://head:10001'") and "http://<head>:8265" in line


def test_cluster_down_without_a_running_cluster_says_so_and_succeeds(tmp_path):
    result = runner.invoke(app, ["cluster", "down", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0
    assert result.output.strip() == f"no local cluster runs from {tmp_path / 'state'}"
    assert not (tmp_path / "state").exists()
