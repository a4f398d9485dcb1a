"""The test-once record under foreign and concurrent tags: other suffixes ignored, no record overwritten, and of
two evaluations started together exactly one claims the test split."""

from __future__ import annotations

import json
import threading

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import ConfigError
from pipeline.tracking.heldout import (
    CLAIM_TAG_PREFIX,
    TEST_EVALUATION_TAG,
    ModelRecordPlace,
    claim_test_evaluation,
    record_test_evaluation,
    release_claim,
)

FIGURES = {"test/top1": 61.0, "test/top5": 90.0}


@pytest.fixture
def place(tmp_path):
    """A registered version and its run, in a fresh SQLite store: (client, place)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'heldout.db'}")
    run = client.create_run(client.create_experiment("heldout")).info.run_id
    client.create_registered_model("m")
    version = client.create_model_version("m", "file:///nowhere", run_id=run).version
    return client, ModelRecordPlace(f"models:/m/{version}", run_id=run, name="m", version=str(version))


def _evaluate(client, place, reason=None) -> str:
    claim = claim_test_evaluation(client, place, reason)
    return record_test_evaluation(client, claim, FIGURES, "hash", 24)


def test_a_foreign_tag_with_a_non_numeric_suffix_is_ignored(place):
    client, place = place
    client.set_model_version_tag("m", place.version, f"{TEST_EVALUATION_TAG}.note", "reviewed by alice")
    assert _evaluate(client, place) == TEST_EVALUATION_TAG
    with pytest.raises(ConfigError, match=r"already evaluated on test \(at .*: test/top1 61.00") as caught:
        claim_test_evaluation(client, place, None)
    assert "\n" not in str(caught.value)


def test_a_record_is_written_to_the_next_free_number_and_never_over_another(place):
    client, place = place
    client.set_tag(place.run_id, TEST_EVALUATION_TAG, json.dumps({"time": "2026-01-01T00:00:00Z", "figures": {}}))
    client.set_tag(place.run_id, f"{TEST_EVALUATION_TAG}.3", "someone else's")
    assert _evaluate(client, place, reason="a second look") == f"{TEST_EVALUATION_TAG}.4"
    tags = place.tags(client)
    assert tags[f"{TEST_EVALUATION_TAG}.3"] == "someone else's"
    assert json.loads(tags[f"{TEST_EVALUATION_TAG}.4"])["reason"] == "a second look"
    assert not [key for key in tags if key.startswith(CLAIM_TAG_PREFIX)]  # the claim became the record


def test_of_two_concurrent_evaluations_exactly_one_claims_the_test_split(place):
    client, place = place
    start, outcomes = threading.Barrier(2), []

    def evaluate() -> None:
        start.wait()
        try:
            outcomes.append(claim_test_evaluation(MlflowClient(client.tracking_uri), place, None))
        except ConfigError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=evaluate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    refused = [outcome for outcome in outcomes if isinstance(outcome, ConfigError)]
    claims = [outcome for outcome in outcomes if not isinstance(outcome, ConfigError)]
    assert len(claims) == 1 and len(refused) == 1, outcomes
    assert "another test evaluation claimed its test split" in str(refused[0])
    record_test_evaluation(client, claims[0], FIGURES, "hash", 24)
    with pytest.raises(ConfigError, match="already evaluated on test"):
        claim_test_evaluation(client, place, None)


def test_a_failed_pass_releases_its_claim_and_a_stopped_one_blocks_until_a_reason_is_given(place):
    client, place = place
    release_claim(client, claim_test_evaluation(client, place, None))
    stopped = claim_test_evaluation(client, place, None)  # its process was killed: the claim stays
    with pytest.raises(ConfigError, match="has not recorded a result .*--again --reason"):
        claim_test_evaluation(client, place, None)
    claim = claim_test_evaluation(client, place, "the first evaluation was killed")
    assert record_test_evaluation(client, claim, FIGURES, "hash", 24) == TEST_EVALUATION_TAG
    assert stopped.key in place.tags(client)  # the stopped claim is left for its owner to see, not deleted
