"""What a sweep writes into MLflow besides its trials' training: each trial's end (how, and where ASHA decided to
stop it), each trial run closed in the status that says what happened, and the parent run's summary."""

import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.tracking.runs import FAILED, FINISHED, KILLED, RUN_NAME_TAG
from pipeline.tracking.sweeps import (
    COMPLETED_TAG,
    ENDED_AT_TAG,
    STOP_DECIDED_TAG,
    STOPPED_TAG,
    WAITED_TAG,
    close_trial_run,
    tag_stop_decision,
    tag_trial_end,
    write_sweep_summary,
)


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment


def test_a_trial_that_trained_to_its_end_is_tagged_completed_and_says_how_long_it_waited(store):
    uri, client, experiment = store
    waited, prompt = client.create_run(experiment).info.run_id, client.create_run(experiment).info.run_id
    tag_trial_end(uri, waited, waited_s=42.4)
    tag_trial_end(uri, prompt, waited_s=0.3)  # under a second is no wait worth showing
    assert client.get_run(waited).data.tags[COMPLETED_TAG] == "true"
    assert client.get_run(waited).data.tags[WAITED_TAG] == "42"
    assert client.get_run(prompt).data.tags[COMPLETED_TAG] == "true"
    assert WAITED_TAG not in client.get_run(prompt).data.tags


def test_ashas_stop_decision_is_tagged_on_the_trial_run_of_that_name_if_it_has_one(store):
    uri, client, experiment = store
    run_id = client.create_run(experiment, tags={RUN_NAME_TAG: "s-abcde_00001"}).info.run_id
    tag_stop_decision(uri, experiment, "s-abcde_00001", epoch=2)
    tag_stop_decision(uri, experiment, "s-abcde_00009", epoch=1)  # no run yet: nothing to tag, no error
    assert client.get_run(run_id).data.tags[STOP_DECIDED_TAG] == "2"


@pytest.mark.parametrize(
    "status, stopped", [(KILLED, "true"), (FAILED, "false"), (FINISHED, "false")], ids=["asha", "error", "done"]
)
def test_a_trial_run_is_closed_with_its_status_where_it_ended_and_the_epochs_mlflow_lacked(store, status, stopped):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, m.TRAIN_LOSS, 1.5, step=1)  # MLflow has epoch 1; the checkpoints hold 2
    history = [{m.EPOCH: 1, m.TRAIN_LOSS: 1.5}, {m.EPOCH: 2, m.TRAIN_LOSS: 1.2, m.VAL_TOP1: 61.0}]
    close_trial_run(uri, run_id, history, status, epochs_run=2)
    run = client.get_run(run_id)
    assert run.info.status == status
    assert (run.data.tags[STOPPED_TAG], run.data.tags[ENDED_AT_TAG]) == (stopped, "2")
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, m.TRAIN_LOSS)] == [(1, 1.5), (2, 1.2)]
    assert [p.step for p in client.get_metric_history(run_id, m.VAL_TOP1)] == [2]


def test_a_trial_run_is_never_closed_in_a_status_that_is_not_terminal(store):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    with pytest.raises(AssertionError, match="not a terminal MLflow run status: RUNNING"):
        close_trial_run(uri, run_id, [], "RUNNING", epochs_run=0)
    assert client.get_run(run_id).info.status == "RUNNING"


def test_the_sweep_summary_lands_on_the_parent_run_which_stays_open_for_its_owner(store):
    uri, client, experiment = store
    parent = client.create_run(experiment).info.run_id
    figure = Figure()
    figure.subplots().plot([1, 2], [40.0, 55.0])
    write_sweep_summary(uri, parent, {"sweep/trials_completed": 3}, {"best_trial": "abcde_00001"}, {"c.png": figure})
    run = client.get_run(parent)
    assert run.data.metrics["sweep/trials_completed"] == 3.0 and run.data.tags["best_trial"] == "abcde_00001"
    assert [p.step for p in client.get_metric_history(parent, "sweep/trials_completed")] == [0]
    assert [a.path for a in client.list_artifacts(parent)] == ["c.png"]
    assert run.info.status == "RUNNING"
