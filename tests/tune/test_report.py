"""A finished sweep's summary: every trial's MLflow run ends in the status that says what happened to it, and the
compute line counts the epochs up to ASHA's stop decisions and those run after them."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.tracking.sweeps import ENDED_AT_TAG
from pipeline.tune.report import TrialSummary, log_sweep_summary, print_trial_table


def _trials(client, experiment):
    runs = {
        status: client.create_run(experiment).info.run_id
        for status in ("completed", "stopped early", "failed", "no result")
    }
    history = [{"epoch": 1, "val/top1": 40.0}, {"epoch": 2, "val/top1": 55.0}]
    shape = {
        "completed": (2, 55.0, None, ""),
        "stopped early": (2, 55.0, 1, ""),
        "failed": (1, 40.0, None, ""),
        "no result": (0, None, None, "no checkpoint in /runs/s-t3"),
    }
    trials = []
    for index, (status, run_id) in enumerate(runs.items()):
        epochs, best, decided, note = shape[status]
        trials.append(
            TrialSummary(
                trial_id=f"t{index}",
                params={"optim.lr": 0.1 * (index + 1)},
                status=status,
                epochs_run=epochs,
                best_top1=best,
                history=history[:epochs],
                mlflow_run_id=run_id,
                stop_decided_at=decided,
                note=note,
            )
        )
    return runs, trials


def test_each_trial_run_is_closed_with_what_happened_to_it(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    runs, trials = _trials(client, experiment)
    config = load_config(
        overrides=[
            "optim.epochs=2",
            "search.num_samples=4",
            "search.space={optim.lr: {kind: loguniform, low: 0.01, high: 1.0}}",
        ]
    )

    # The completed trial's run is still RUNNING: Tune stopped its driver at max_t before it closed the run.
    log_sweep_summary(client.tracking_uri, parent, config, trials, best=trials[0])

    assert client.get_run(runs["completed"]).info.status == "FINISHED"
    stopped = client.get_run(runs["stopped early"])
    assert stopped.info.status == "KILLED" and stopped.data.tags[ENDED_AT_TAG] == "2"  # decided at 1, ran to 2
    assert client.get_run(runs["failed"]).info.status == "FAILED"
    assert client.get_run(runs["no result"]).info.status == "FAILED"
    summary = client.get_run(parent)
    assert summary.info.status == "RUNNING"  # its owner, the sweep's run_scope, ends it after publishing
    assert summary.data.metrics["sweep/trial_epochs"] == 5  # 2 + 2 + 1 + 0, as run
    assert summary.data.metrics["sweep/trial_epochs_to_stop_decisions"] == 4  # the stopped trial's second is late
    assert summary.data.metrics["sweep/trials_without_result"] == 1
    out = capsys.readouterr().out
    assert "5 trial-epochs run of a 8 budget" in out and "4 up to ASHA's stop decisions, 1 after them" in out


def test_the_table_says_where_asha_decided_and_why_a_trial_has_no_result(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, trials = _trials(client, client.create_experiment("sweep"))
    print_trial_table(trials, ["optim.lr"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["trial", "optim.lr", "best", "val", "top-1", "epochs", "status"]
    row = {line.split()[0]: line for line in lines[1:]}
    assert row["t1"].split()[2:] == ["55.00", "2", "stopped", "by", "ASHA", "at", "epoch", "1"]
    assert row["t3"].split()[2:4] == ["-", "0"] and row["t3"].endswith("no result (no checkpoint in /runs/s-t3)")
