"""A finished sweep's summary: every trial's MLflow run ends in the status that says what happened to it."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.tune.report import STOPPED_AT_TAG, TrialSummary, log_sweep_summary


def test_each_trial_run_is_closed_with_what_happened_to_it(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    runs = {status: client.create_run(experiment).info.run_id for status in ("completed", "stopped early", "failed")}
    history = [{"epoch": 1, "val/top1": 40.0}, {"epoch": 2, "val/top1": 55.0}]
    trials = [TrialSummary(trial_id=f"t{index}", params={"optim.lr": 0.1 * (index + 1)}, status=status,
                           epochs_run=2 if status == "completed" else 1, best_top1=55.0, history=history,
                           mlflow_run_id=run_id)
              for index, (status, run_id) in enumerate(runs.items())]
    config = load_config(overrides=["optim.epochs=2", "search.num_samples=3",
                                    "search.space={optim.lr: {kind: loguniform, low: 0.01, high: 1.0}}"])

    # The completed trial's run is still RUNNING: Tune stopped its driver at max_t before it closed the run.
    log_sweep_summary(client, parent, config, trials, best=trials[0])

    assert client.get_run(runs["completed"]).info.status == "FINISHED"
    assert client.get_run(runs["stopped early"]).info.status == "KILLED"
    assert client.get_run(runs["stopped early"]).data.tags[STOPPED_AT_TAG] == "1"
    assert client.get_run(runs["failed"]).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"
