"""The CLI's error boundary (pipeline/cli/common.py): the project's own errors are one line and exit status 2;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from pipeline.cli import app, common
from pipeline.errors import ConfigError, DataError

runner = CliRunner()


def test_a_pipeline_error_is_one_line_and_exit_status_2(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConfigError("optim.lr = -1: must be positive")

    monkeypatch.setattr(common, "load_config", refuse)
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: optim.lr = -1: must be positive"


def test_errors_of_every_area_pass_the_boundary_the_same_way(monkeypatch):
    def refuse(*args, **kwargs):
        raise DataError("manifest.json is not valid JSON")

    monkeypatch.setattr(common, "load_config", refuse)
    result = runner.invoke(app, ["load"])
    assert result.exit_code == 2 and "error: manifest.json is not valid JSON" in result.output


def test_a_library_value_error_is_not_passed_off_as_a_user_error(monkeypatch):
    def library_bug(*args, **kwargs):
        raise ValueError("an internal torch or Ray failure")

    monkeypatch.setattr(common, "load_config", library_bug)
    result = runner.invoke(app, ["config"])
    assert result.exit_code != 0 and result.exit_code != 2
    assert isinstance(result.exception, ValueError) and "error:" not in result.output


def test_bad_config_value_is_one_line_and_exit_code_2():
    result = runner.invoke(app, ["config", "--set", "optim.lr=-1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: optim.lr = -1: Input should be greater than 0"]
