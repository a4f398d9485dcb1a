"""`champion history` (pipeline/cli/models.py). Its table of decisions is tested with the registry in
tests/tracking/test_runs.py."""

from typer.testing import CliRunner

from pipeline.cli import app


def test_without_a_name_it_reads_the_configured_registered_model(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_registered_model("zoo")
    result = CliRunner().invoke(
        app, ["champion", "history", "--set", f"tracking.tracking_uri={uri}", "--set", "tracking.registered_model=zoo"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "zoo: no @champion decision recorded yet"
