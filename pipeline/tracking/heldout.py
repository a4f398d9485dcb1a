"""The test split is read once per model: each test evaluation is recorded on the model, a second is refused.

Tuning on val and reporting test once keeps test an unbiased estimate; a test split read after every change
quietly becomes a second validation set. So `evaluate --split test` records its figures on the registry version
and on the run that logged it as `test_evaluation` (JSON: time, figures, data), and a later test
evaluation of the same model is refused, with the first result in the message, unless it is asked for with a
reason, which is recorded too (`test_evaluation.2`, `.3`, ...). A checkpoint folder has no place to keep the
record: its evaluations are not guarded, and the report says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.errors import ConfigError

TEST_EVALUATION_TAG = "test_evaluation"


@dataclass(frozen=True)
class ModelRecordPlace:
    """Where a model's test record lives: on its registry version and on the run that logged it, so the same
    model named as models:/<name>/<version> or as runs:/<id>/model shares one record."""

    label: str  # models:/<name>/<version> or runs:/<id>/model, for messages
    run_id: str | None = None
    name: str | None = None
    version: str | None = None

    def tags(self, client: MlflowClient) -> dict[str, str]:
        tags = dict(client.get_run(self.run_id).data.tags) if self.run_id else {}
        if self.version is not None:
            tags.update(client.get_model_version(self.name, self.version).tags)
        return tags

    def set_tag(self, client: MlflowClient, key: str, value: str) -> None:
        if self.version is not None:
            client.set_model_version_tag(self.name, self.version, key, value)
        if self.run_id:
            client.set_tag(self.run_id, key, value)


def recorded_test_evaluations(client: MlflowClient, place: ModelRecordPlace) -> list[dict[str, Any]]:
    """The recorded test evaluations, first one first. Tags come from a shared store: parsed as JSON only."""
    tags = place.tags(client)
    keys = sorted((key for key in tags if key == TEST_EVALUATION_TAG or key.startswith(TEST_EVALUATION_TAG + ".")),
                  key=lambda key: int(key.rpartition(".")[2]) if key != TEST_EVALUATION_TAG else 1)
    records = []
    for key in keys:
        try:
            record = json.loads(tags[key])
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {"unreadable": tags[key][:200]})
    return records


def check_test_once(client: MlflowClient, place: ModelRecordPlace, again_reason: str | None) -> None:
    """Refuse a second test evaluation of the same model unless a reason is given; before any work starts."""
    previous = recorded_test_evaluations(client, place)
    if previous and not again_reason:
        raise ConfigError(
            f"{place.label} was already evaluated on test ({describe(previous[0])}"
            + (f"; {len(previous)} test evaluations in all" if len(previous) > 1 else "")
            + "); the test split is read once per model, or it becomes a second validation set; pass "
            "--again --reason '...' to evaluate it again (the reason is recorded)")


def record_test_evaluation(client: MlflowClient, place: ModelRecordPlace, figures: dict[str, float],
                           manifest_hash: str, num_samples: int, again_reason: str | None) -> str:
    """Record this evaluation; returns the tag it was written to."""
    count = len(recorded_test_evaluations(client, place))
    key = TEST_EVALUATION_TAG if count == 0 else f"{TEST_EVALUATION_TAG}.{count + 1}"
    record: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "figures": {name: round(value, 4) for name, value in figures.items()},
                              "manifest_hash": manifest_hash, "num_samples": num_samples}
    if again_reason:
        record["reason"] = again_reason
    place.set_tag(client, key, json.dumps(record))
    return key


def describe(record: dict[str, Any]) -> str:
    if "unreadable" in record:
        return "an unreadable record"
    figures = record.get("figures") or {}
    shown = ", ".join(f"{name} {value:.2f}" for name, value in figures.items()
                      if name in ("test/top1", "test/top5") and isinstance(value, (int, float)))
    return f"at {record.get('time', '?')}: {shown or 'no figures'}"
