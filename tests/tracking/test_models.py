"""Model sources in MLflow: `models:/<name>@<alias>`, `models:/<name>/<version>` and `runs:/<run_id>/<path>`
resolve to the version and the run behind them, and one that names nothing is a one-line ModelSourceError
before anything is downloaded."""

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import ModelSourceError
from pipeline.tracking.models import (
    check_model_source,
    model_version,
    source_run_id,
    tag_model_version,
    versions_logged_by,
)


@pytest.fixture
def registry(tmp_path):
    """A SQLite store with registered model `m`: version 1 logged by one run, version 2 by another, @champion on 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("models")
    client.create_registered_model("m")
    run_ids = [client.create_run(experiment).info.run_id for _ in range(2)]
    for run_id in run_ids:
        client.create_model_version("m", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("m", "champion", "2")
    return uri, run_ids


def test_a_registry_source_resolves_to_its_version_and_the_run_that_logged_it(registry):
    uri, (first_run, second_run) = registry
    assert str(model_version("models:/m@champion", uri).version) == "2"
    assert str(model_version("models:/m/1", uri).version) == "1"
    assert source_run_id("models:/m@champion", uri) == second_run
    assert source_run_id("models:/m/1", uri) == first_run
    assert source_run_id(f"runs:/{first_run}/model", uri) == first_run  # read from the source itself
    assert source_run_id("/checkpoints/run-a/checkpoint_000002", uri) is None  # not from MLflow


@pytest.mark.parametrize(
    "source, message",
    [
        ("models:/m@staging", "models:/m@staging: registered model 'm' has no alias 'staging'"),
        ("models:/m/7", "models:/m/7: registered model 'm' has no version 7"),
        ("models:/nope@champion", "models:/nope@champion: no registered model 'nope' in sqlite:///"),
        ("models:/m", "models:/m: expected models:/<name>@<alias> or models:/<name>/<version>"),
        ("runs:/0123abcd/model", "runs:/0123abcd/model: no MLflow run 0123abcd in sqlite:///"),
        ("s3://bucket/model.pt", "s3://bucket/model.pt: expected runs:/<run_id>/<artifact path>"),
    ],
    ids=["no-alias", "no-version", "no-model", "malformed", "no-run", "not-mlflow"],
)
def test_a_source_that_names_nothing_is_one_line_naming_it(registry, source, message):
    uri, _ = registry
    with pytest.raises(ModelSourceError) as caught:
        check_model_source(source, uri)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_source_that_names_a_version_or_a_run_passes_the_check(registry):
    uri, (first_run, _) = registry
    for source in ("models:/m@champion", "models:/m/1", f"runs:/{first_run}/model"):
        check_model_source(source, uri)  # no error


def test_the_versions_a_run_logged_are_found_and_tagged(registry):
    uri, (first_run, second_run) = registry
    assert versions_logged_by(uri, "m", first_run) == ["1"]
    assert versions_logged_by(uri, "m", "0" * 32) == []
    tag_model_version(uri, "m", "2", "index_run.val", second_run)
    assert MlflowClient(uri).get_model_version("m", "2").tags["index_run.val"] == second_run
