"""Structured timeline events: named moments of a run, recorded as JSON lines for benchmarks to read.

    PIPELINE_EVENTS_FILE=/tmp/job-events.jsonl imagenet-pipeline train ...
    events.record("first_step", rank=0)       # anywhere: driver, Ray workers, DataLoader processes
    events.read(Path("/tmp/job-events.jsonl")) # [{"event": "first_step", "unix_time": ..., "pid": ..., "rank": 0}]

    PIPELINE_SAMPLE_LOG=/tmp/samples.jsonl imagenet-pipeline train ...
    # one line per rank and training step: {"rank": 0, "epoch": 1, "step": 3, "keys": [...]} (an audit trail)

Off unless the variable names a file, so a normal run writes nothing. Each record is one short `write` in append
mode (atomic for lines under the pipe buffer size), so processes on one machine can share the file. The driver
hands the file to Ray workers through the run wiring, since Ray does not forward the driver's environment.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENV_VAR = "PIPELINE_EVENTS_FILE"
SAMPLE_LOG_ENV_VAR = "PIPELINE_SAMPLE_LOG"


def current_file() -> str | None:
    return os.environ.get(ENV_VAR) or None


def sample_log_file() -> str | None:
    return os.environ.get(SAMPLE_LOG_ENV_VAR) or None


def use_file(path: str | None, sample_log: str | None = None) -> None:
    """Record into `path` (and the batches trained on into `sample_log`) from now on in this process (a Ray worker
    given the driver's files)."""
    if path:
        os.environ[ENV_VAR] = path
    if sample_log:
        os.environ[SAMPLE_LOG_ENV_VAR] = sample_log


def record_batch(rank: int, epoch: int, step: int, keys: list[str]) -> None:
    """The sample keys `rank` trained on at `step` (0-based, within `epoch`, 0-based); masked slots are left out."""
    path = sample_log_file()
    if not path:
        return
    line = json.dumps({"rank": rank, "epoch": epoch, "step": step, "keys": [key for key in keys if key]}) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def record(name: str, **fields: Any) -> None:
    path = current_file()
    if not path:
        return
    line = json.dumps({"event": name, "unix_time": time.time(), "pid": os.getpid(), **fields}) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def read(path: Path) -> list[dict[str, Any]]:
    """Every record in `path`, in file order; a line cut short by a killed process is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def first_times(records: list[dict[str, Any]], since: float) -> dict[str, float]:
    """Seconds after `since` (a unix time) of the first record of each event name."""
    times: dict[str, float] = {}
    for entry in sorted(records, key=lambda entry: entry["unix_time"]):
        times.setdefault(entry["event"], entry["unix_time"] - since)
    return times
