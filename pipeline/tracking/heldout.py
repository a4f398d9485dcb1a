"""The test split is read once per model: each test evaluation is recorded on the model, a second is refused.

Tuning on val and reporting test once keeps test an unbiased estimate; a test split read after every change
quietly becomes a second validation set. So `evaluate --split test` records its figures on the registry version
and on the run that logged it as `test_evaluation` (JSON: time, figures, data), and a later test
evaluation of the same model is refused, with the first result in the message, unless it is asked for with a
reason, which is recorded too (`test_evaluation.2`, `.3`, ...). A checkpoint folder has no place to keep the
record: its evaluations are not guarded, and the report says so.

The tags live in a shared store that other people and jobs write to, so the records are read defensively:
- only `test_evaluation` and `test_evaluation.<digits>` are records; any other suffix (`test_evaluation.note`) is
  someone else's tag and is ignored; a record is written to the next free number and never overwrites one;
- the test split is claimed before the pass, not after it. MLflow tags have no compare-and-set, but experiment
  names are unique in its store: the first plain evaluation of a model creates the experiment
  `pipeline test-once <run id>` (then moves it to the trash, out of the UI's list; its name stays taken), so of
  two evaluations started together exactly one creates it and the other is refused in one line before it reads
  a test image. The winner also tags a claim (`test_evaluation_claim.<time>.<random>`), replaced by the record
  when the pass ends; a pass that fails removes its claim and frees the name. A claim left by a killed
  evaluation blocks plain evaluations (the message says so) until one with a reason runs.

`record_test_results` is the one writer of an evaluation's results: the figures as test metrics of the run that
logged the model, and the record; `pipeline.inference.evaluate` calls it once per test evaluation.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError
from pipeline.tracking.datasets import split_input

TEST_EVALUATION_TAG = "test_evaluation"
CLAIM_TAG_PREFIX = "test_evaluation_claim."
LOCK_EXPERIMENT_PREFIX = "pipeline test-once "
_RECORD_KEY = re.compile(rf"^{TEST_EVALUATION_TAG}(?:\.(?P<number>[0-9]{{1,6}}))?$")
_CLAIM_KEY = re.compile(rf"^{re.escape(CLAIM_TAG_PREFIX)}[0-9]{{20}}\.[0-9a-f]{{8}}$")


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

    def delete_tag(self, client: MlflowClient, key: str) -> None:
        if self.version is not None:
            client.delete_model_version_tag(self.name, self.version, key)
        if self.run_id:
            client.delete_tag(self.run_id, key)


@dataclass(frozen=True)
class TestClaim:
    """This process's claim on the test split of one model, held from before the pass until its record."""

    place: ModelRecordPlace
    key: str
    again_reason: str | None
    lock_id: str | None  # the experiment whose unique name was taken; None for an evaluation with a reason


def _record_number(key: str) -> int | None:
    """1 for `test_evaluation`, n for `test_evaluation.n`; None for any other tag."""
    match = _RECORD_KEY.match(key)
    if not match:
        return None
    return int(match["number"]) if match["number"] else 1


def recorded_test_evaluations(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The recorded test evaluations in `tags`, first one first. Parsed as JSON only, never trusted for shape."""
    numbered = sorted((number, key) for key in tags if (number := _record_number(key)) is not None)
    records = []
    for _, key in numbered:
        try:
            record = json.loads(tags[key])
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {"unreadable": tags[key][:200]})
    return records


def _claims(tags: dict[str, str]) -> list[str]:
    return sorted(key for key in tags if _CLAIM_KEY.match(key))


def _client(store: str | MlflowClient) -> MlflowClient:
    return store if isinstance(store, MlflowClient) else MlflowClient(store)


def claim_test_evaluation(store: str | MlflowClient, place: ModelRecordPlace, again_reason: str | None) -> TestClaim:
    """Claim the test split of `place`'s model before any test image is read, or refuse in one line: it was
    evaluated already (without a reason to do it again), or another evaluation holds or won the claim. `store`:
    the tracking URI (or a client of it).

    An evaluation with a reason takes no lock: it is asked for on purpose and recorded beside the others."""
    client = _client(store)
    lock_id = None
    if not again_reason:
        _refuse_if_taken(place, place.tags(client))
        lock_id = _take_lock(client, place)
    key = f"{CLAIM_TAG_PREFIX}{time.time_ns():020d}.{secrets.token_hex(4)}"
    place.set_tag(client, key, json.dumps({"time": _now(), "reason": again_reason}))
    return TestClaim(place, key, again_reason, lock_id)


def _refuse_if_taken(place: ModelRecordPlace, tags: dict[str, str]) -> None:
    previous = recorded_test_evaluations(tags)
    if previous:
        raise ConfigError(
            f"{place.label} was already evaluated on test ({describe(previous[0])}"
            + (f"; {len(previous)} test evaluations in all" if len(previous) > 1 else "")
            + "); the test split is read once per model, or it becomes a second validation set; pass "
            "--again --reason '...' to evaluate it again (the reason is recorded)"
        )
    claims = _claims(tags)
    if claims:
        raise ConfigError(
            f"{place.label}: another test evaluation claimed its test split at {_claim_time(claims[0])} "
            "and has not recorded a result (it is still running, or it was stopped); wait for it, or "
            "pass --again --reason '...' if it was stopped"
        )


def _lock_name(place: ModelRecordPlace) -> str:
    # The run when there is one: models:/<name>/<n> and runs:/<id>/model of the same model share one lock.
    return f"{LOCK_EXPERIMENT_PREFIX}{place.run_id or place.label}"


def _take_lock(client: MlflowClient, place: ModelRecordPlace) -> str:
    from mlflow.exceptions import MlflowException

    try:
        lock_id = client.create_experiment(_lock_name(place))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        raise ConfigError(
            f"{place.label}: another test evaluation claimed its test split first (MLflow experiment "
            f"'{_lock_name(place)}' exists); the test split is read once per model"
        ) from None
    client.delete_experiment(lock_id)  # out of the UI's experiment list; the name stays taken
    return lock_id


def _claim_time(key: str) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(key.split(".")[1]) / 1e9))


@dataclass(frozen=True)
class TestResults:
    record_tag: str  # the tag the record was written to, on the model's version and run
    logged_to_run: str | None  # the run whose test metrics hold the figures; None when not logged


def record_test_results(
    uri: str,
    claim: TestClaim,
    figures: dict[str, float],
    manifest: Manifest,
    location: str,
    num_samples: int,
    log_to_run: bool = True,
) -> TestResults:
    """Everything a claimed test evaluation writes: `figures` as metrics of the run that logged the model, with
    the test split (`manifest`, read from `location`) as the run's dataset input, unless `log_to_run` is off;
    then the test-once record of `num_samples` scored images (`record_test_evaluation`), which drops the claim.

    Only the held-out test split is logged to the run: val figures already sit there as a per-epoch curve,
    which another point would distort."""
    client = MlflowClient(uri)
    run_id = claim.place.run_id if log_to_run else None
    if run_id:
        timestamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, timestamp, 0) for key, value in figures.items()])
        client.log_inputs(run_id, datasets=[split_input(manifest, location, "test")])
    tag = record_test_evaluation(client, claim, figures, manifest.content_hash(), num_samples)
    return TestResults(tag, run_id or None)


def record_test_evaluation(
    store: str | MlflowClient, claim: TestClaim, figures: dict[str, float], manifest_hash: str, num_samples: int
) -> str:
    """Record this evaluation at the next free number (never over another record), then drop the claim;
    returns the tag it was written to."""
    client = _client(store)
    numbers = [number for key in claim.place.tags(client) if (number := _record_number(key)) is not None]
    key = TEST_EVALUATION_TAG if not numbers else f"{TEST_EVALUATION_TAG}.{max(numbers) + 1}"
    if _record_number(key) is None:  # someone tagged test_evaluation.999999: no number is left to read back
        raise ConfigError(f"{claim.place.label}: no free test_evaluation.<n> tag is left; remove foreign ones")
    record: dict[str, Any] = {
        "time": _now(),
        "figures": {name: round(value, 4) for name, value in figures.items()},
        "manifest_hash": manifest_hash,
        "num_samples": num_samples,
    }
    if claim.again_reason:
        record["reason"] = claim.again_reason
    claim.place.set_tag(client, key, json.dumps(record))
    claim.place.delete_tag(client, claim.key)
    return key


def release_claim(store: str | MlflowClient, claim: TestClaim) -> None:
    """A pass that failed leaves no claim behind (it reported no figure), and frees the lock's name for the next
    plain evaluation (a deleted experiment keeps its name until renamed)."""
    from mlflow.exceptions import MlflowException

    client = _client(store)

    try:
        claim.place.delete_tag(client, claim.key)
    except MlflowException:  # already gone: the record replaced it before the failure
        pass
    if claim.lock_id is not None:
        client.restore_experiment(claim.lock_id)
        client.rename_experiment(claim.lock_id, f"{_lock_name(claim.place)} released {secrets.token_hex(4)}")
        client.delete_experiment(claim.lock_id)


def describe(record: dict[str, Any]) -> str:
    if "unreadable" in record:
        return "an unreadable record"
    figures = record.get("figures") if isinstance(record.get("figures"), dict) else {}
    shown = ", ".join(
        f"{name} {value:.2f}"
        for name, value in figures.items()
        if name in ("test/top1", "test/top5") and isinstance(value, (int, float))
    )
    return f"at {str(record.get('time', '?'))[:40]}: {shown or 'no figures'}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
