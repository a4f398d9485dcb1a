"""Training metrics beyond the per-epoch log: rank 0's step metrics (`StepLog`), and epochs a checkpoint holds
but MLflow lacks, written from the checkpoint's record (`log_missing_epochs`)."""

from __future__ import annotations

import time

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline import metrics as m

MIN_SECONDS_BETWEEN_STEP_LOGS = 1.0


def steps_between_logs(setting: int | None, steps_per_epoch: int) -> int:
    """tracking.log_every_n_steps: None means about 100 points per epoch; 0 means per-epoch metrics only."""
    if setting is None:
        return max(1, steps_per_epoch // 100)
    return setting


def log_missing_epochs(client: MlflowClient, run_id: str, history: list[dict[str, float]]) -> int:
    """Log the epochs of a run's checkpointed `history` that come after the last epoch MLflow holds; returns how
    many. The checkpoint is reported before its epoch's metrics reach MLflow, so a worker killed between the two
    (a node lost, or Tune stopping a trial as soon as it reports its last epoch) leaves MLflow one epoch behind
    the checkpoints; the resumed attempt, or the sweep's summary, writes it from the checkpoint's record."""
    logged = max((point.step for point in client.get_metric_history(run_id, m.TRAIN_LOSS)), default=0)
    timestamp = int(time.time() * 1000)
    missing = [row for row in history if int(row.get(m.EPOCH, 0)) > logged]
    for row in missing:
        step = int(row[m.EPOCH])
        client.log_batch(
            run_id, metrics=[Metric(key, float(value), timestamp, step) for key, value in row.items() if key != m.EPOCH]
        )
    return len(missing)


class StepLog:
    """The step hook of `pipeline.train.step.train_one_epoch` on rank 0: it adds up each step's loss on the
    device and reads it only every `every` steps (one device wait per interval, not per step), then sends one
    batch of three metrics without waiting for the server (MLflow's asynchronous logging), so a slow tracking
    server never holds up a step."""

    def __init__(self, client: MlflowClient, run_id: str, every: int, logged_through: int = 0) -> None:
        self.client, self.run_id, self.every = client, run_id, every
        self.logged_through = logged_through  # steps up to this one are in MLflow already
        self._reset()

    @classmethod
    def resuming(cls, uri: str, run_id: str, every: int) -> "StepLog":
        """A step log that skips the steps run `run_id` holds already."""
        client = MlflowClient(uri)
        # A resumed attempt replays the steps its predecessor ran after the checkpoint (and logged): the same
        # values when the loader is deterministic, so those points stay and only later steps are logged.
        logged = [point.step for point in client.get_metric_history(run_id, m.STEP_LOSS)]
        return cls(client, run_id, every, logged_through=max(logged, default=0))

    def _reset(self) -> None:
        self._loss_sum = None
        self._steps = 0
        self._images = 0
        self._started = time.perf_counter()

    def __call__(self, step: int, loss, lr: float, images: int) -> None:
        if step <= self.logged_through:
            return
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps += 1
        self._images += images
        self._last = (step, lr)
        # Every `every` steps, and at most once a second: small epochs would otherwise log every step, and on a
        # few cores MLflow's logging thread then competes with the step (measured by bench-train's overhead).
        if step % self.every or time.perf_counter() - self._started < MIN_SECONDS_BETWEEN_STEP_LOGS:
            return
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what the window holds (the worker calls it at each epoch's end: the last step is always logged).
        `wait`: return once every point sent so far is stored, so a checkpoint taken next never gets ahead of
        MLflow (a resume from it logs only later steps: queued points lost to a kill would leave a gap)."""
        self._send()
        if wait:
            mlflow.flush_async_logging()

    def _send(self) -> None:
        if not self._steps:
            return
        step, lr = self._last
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        stamp = int(time.time() * 1000)
        figures = {
            m.STEP_LOSS: float(self._loss_sum) / self._steps,
            m.STEP_LR: lr,
            m.STEP_IMAGES_PER_SECOND: self._images / elapsed,
        }
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), stamp, step) for key, value in figures.items()],
            synchronous=False,
        )
        self._reset()
