"""A run's typed config in MLflow: flattened into searchable params, whole in config.json, and read back from
config.json as a validated Config (a refit rebuilds a trial's config from it); what cannot be read is one line."""

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, load_config
from pipeline.tracking.run_config import CONFIG_ARTIFACT, PARAM_VALUE_MAX_CHARS, flatten, log_config, read_run_config


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("config", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, client.create_run(experiment).info.run_id


def test_a_logged_config_is_searchable_params_and_reads_back_as_the_same_config(store):
    uri, client, run_id = store
    config = load_config(
        overrides=["optim.lr=0.37", "model.dropout=0.2", "tracking.tracking_uri=https://alice:hunter2@mlflow:5000"]
    )
    log_config(client, run_id, config)
    params = client.get_run(run_id).data.params
    assert params["optim.lr"] == "0.37" and params["model.dropout"] == "0.2"
    assert params["tracking.tracking_uri"] == "https://***@mlflow:5000"
    back = read_run_config(uri, run_id, "trial t1")
    # The saved tracking URI is dropped (it was redacted): the reader's own applies.
    assert back.model_dump(exclude={"tracking"}) == config.model_dump(exclude={"tracking"})
    assert back.tracking.tracking_uri != config.tracking.tracking_uri


def test_nested_keys_flatten_to_dotted_params_and_an_empty_section_stays_one_param():
    assert flatten({"optim": {"lr": 0.1, "betas": {"a": 1}}, "search": {"space": {}}}) == {
        "optim.lr": 0.1,
        "optim.betas.a": 1,
        "search.space": {},
    }


def test_a_param_longer_than_mlflow_allows_is_cut_not_refused(store):
    uri, client, run_id = store
    values = ", ".join(f"{0.0001 * (i + 1):.4f}" for i in range(1000))  # ~8000 characters as a param
    config = load_config(overrides=[f"search.space={{optim.lr: {{kind: choice, values: [{values}]}}}}"])
    log_config(client, run_id, config)
    assert len(client.get_run(run_id).data.params["search.space.optim.lr.values"]) == PARAM_VALUE_MAX_CHARS
    assert read_run_config(uri, run_id, "trial t1").search.space == config.search.space  # whole in config.json


@pytest.mark.parametrize(
    "content, message",
    [
        (None, f"trial t1: its run .* has no {CONFIG_ARTIFACT}"),
        ("{not json", f"trial t1: {CONFIG_ARTIFACT} of run .* is not JSON"),
        ("[1, 2]", f"trial t1: {CONFIG_ARTIFACT} of run .* is not a JSON object"),
        ('{"optim": {"lr": -1}}', rf"trial t1: {CONFIG_ARTIFACT} of run .*: .*optim\.lr"),
    ],
    ids=["missing", "not-json", "not-an-object", "invalid"],
)
def test_a_config_that_cannot_be_read_back_is_one_line_naming_the_run(store, tmp_path, content, message):
    uri, client, run_id = store
    if content is not None:
        written = tmp_path / CONFIG_ARTIFACT
        written.write_text(content)
        client.log_artifact(run_id, str(written))
    with pytest.raises(ConfigError, match=message) as caught:
        read_run_config(uri, run_id, "trial t1")
    assert "\n" not in str(caught.value)
