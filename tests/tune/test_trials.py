"""A finished sweep's trials, each summarised from its own folder, checkpoints and MLflow run (no Ray: the Tune
results are stand-ins with the attributes Tune's `Result` has)."""

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import RUN_NAME_TAG
from pipeline.tracking.sweeps import STOP_DECIDED_TAG
from pipeline.tune.report import FAILED_STATUS, NO_RESULT
from pipeline.tune.trials import summarize_trials, trial_id_of, trial_run_name


def test_trial_id_comes_from_the_trial_folder_when_a_trial_never_reported():
    class FailedEarly:
        metrics = {}
        path = "/runs/sweep-a/trial_driver_98fb1_00003_3_model_dropout=0.1,optim_lr=0.4_2026-11-30_03-03-20"

    assert trial_id_of(FailedEarly()) == "98fb1_00003"
    FailedEarly.metrics = {"trial_id": "98fb1_00007"}
    assert trial_id_of(FailedEarly()) == "98fb1_00007"


def _result(trial_id: str, error: Exception | None = None):
    return SimpleNamespace(
        metrics={"trial_id": trial_id}, path=f"/runs/s/trial_{trial_id}_0", error=error, config={"optim.lr": 0.1}
    )


def test_trials_without_checkpoints_are_summarised_as_failed_or_without_result_from_their_own_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    stopped_name = trial_run_name("s", "abcde_00001")
    stopped = client.create_run(experiment, tags={RUN_NAME_TAG: stopped_name, STOP_DECIDED_TAG: "1"})
    storage_root = str(tmp_path / "ray")
    results = [
        _result("abcde_00001"),
        _result("abcde_00002", error=RuntimeError("worker lost\nTraceback the table should not carry")),
    ]

    summaries = summarize_trials(results, uri, experiment, "s", max_epochs=3, storage_root=storage_root)

    no_result, failed = summaries
    assert (no_result.trial_id, no_result.status, no_result.epochs_run) == ("abcde_00001", NO_RESULT, 0)
    assert no_result.mlflow_run_id == stopped.info.run_id and no_result.stop_decided_at == 1
    assert no_result.note == f"no checkpoint in {storage_root}/s-abcde_00001"
    assert no_result.params == {"optim.lr": 0.1} and no_result.best_top1 is None
    assert failed.status == FAILED_STATUS and failed.mlflow_run_id is None  # it never opened a run
    assert failed.note == "RuntimeError: worker lost"  # why it failed, in one line of the trial table
