"""Rank 0's step metrics, and epochs a checkpoint holds that MLflow lacks."""

from mlflow.tracking import MlflowClient

from pipeline import metrics as m


def test_step_metrics_are_read_and_sent_once_per_window_and_at_each_epochs_end(monkeypatch):
    import torch

    from pipeline.tracking import step_log

    class Client:
        def __init__(self):
            self.batches = []

        def log_batch(self, run_id, metrics, synchronous):
            assert synchronous is False  # never waits for the server
            self.batches.append({metric.key: (metric.value, metric.step) for metric in metrics})

    client = Client()
    log = step_log.StepLog(client, "run", every=2)
    for step in range(1, 6):  # well within a second: the time floor holds every window back
        log(step, torch.tensor(float(step), dtype=torch.float64), 0.1, 8)
    assert client.batches == []
    log.flush()  # the epoch's end
    assert client.batches[0][m.STEP_LOSS] == (3.0, 5) and client.batches[0][m.STEP_LR] == (0.1, 5)
    monkeypatch.setattr(step_log, "MIN_SECONDS_BETWEEN_STEP_LOGS", 0.0)
    for step in range(6, 9):
        log(step, torch.tensor(1.0, dtype=torch.float64), 0.2, 8)
    assert [batch[m.STEP_LOSS][1] for batch in client.batches] == [5, 6, 8]
    log.flush()  # nothing left in the window: nothing sent
    assert len(client.batches) == 3


def test_epochs_a_kill_kept_from_mlflow_are_logged_from_the_checkpoint_record_once(tmp_path):
    """The checkpoint is reported before its epoch reaches MLflow: a worker killed (or a trial stopped) between
    the two leaves MLflow behind; the record fills exactly the missing epochs, and a second call adds nothing."""
    from pipeline.tracking.step_log import log_missing_epochs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("lag")).info.run_id
    history = [{m.EPOCH: epoch, m.TRAIN_LOSS: 2.0 / epoch, m.VAL_TOP1: 10.0 * epoch} for epoch in (1, 2, 3)]
    client.log_metric(run_id, m.TRAIN_LOSS, 2.0, step=1)
    client.log_metric(run_id, m.VAL_TOP1, 10.0, step=1)
    assert log_missing_epochs(client, run_id, history) == 2
    assert log_missing_epochs(client, run_id, history) == 0
    for key in (m.TRAIN_LOSS, m.VAL_TOP1):
        assert [(p.step, p.value) for p in client.get_metric_history(run_id, key)] == [
            (row[m.EPOCH], row[key]) for row in history
        ]
