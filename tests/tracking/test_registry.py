"""The champion gate: a version takes the `champion` alias only when its val top-1 beats the current champion's
(read from the champion's run, never from a tag) and the floor above chance; every decision is kept as history,
and `champion history` prints it."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import load_config
from pipeline.tracking.registry import CHAMPION_ALIAS, champion_floor, champion_gate, champion_history, champion_on


def _registered(tmp_path, name: str, versions: int = 3) -> MlflowClient:
    """A registered model `name` with `versions` versions, each logged by a run of its own, in a fresh SQLite store."""
    client = MlflowClient(f"sqlite:///{tmp_path / f'{name}.db'}")
    client.create_registered_model(name)
    experiment = client.create_experiment(name)
    for _ in range(versions):
        client.create_model_version(name, "file:///nowhere", run_id=client.create_run(experiment).info.run_id)
    return client


def test_champion_moves_only_when_val_top1_beats_the_current_champion(tmp_path):
    client = _registered(tmp_path, "gate")
    assert champion_gate(client, "gate", "1", 60.0)[0] is True
    client.set_model_version_tag("gate", "1", m.VAL_TOP1, "60.0")
    promoted, decision = champion_gate(client, "gate", "2", 55.0)
    decision_2 = decision
    assert not promoted and "kept version 1" in decision
    assert str(client.get_model_version_by_alias("gate", CHAMPION_ALIAS).version) == "1"
    promoted, decision = champion_gate(client, "gate", "3", 61.5)
    assert promoted and "61.50 > 60.00" in decision
    assert str(client.get_model_version_by_alias("gate", CHAMPION_ALIAS).version) == "3"
    # Two promotions and one refusal, answerable from the registered model alone.
    events = champion_history(client, "gate")
    assert [(e.version, e.promoted, e.champion_before, e.champion_after) for e in events] == [
        ("1", True, None, "1"),
        ("2", False, "1", "1"),
        ("3", True, "1", "3"),
    ]
    assert events[1].decision == decision_2 and events[1].score == 55.0
    assert champion_on(events, events[1].time_ms) == "1" and champion_on(events, events[2].time_ms) == "3"
    assert champion_on(events, events[0].time_ms - 1) is None


@pytest.mark.parametrize("forged", ["abc", "inf", "nan", "1e308"])
def test_the_champions_score_comes_from_its_runs_metric_never_from_a_forged_tag(tmp_path, forged):
    client = _registered(tmp_path, "forged")
    assert champion_gate(client, "forged", "1", 60.0)[0] is True
    client.set_model_version_tag("forged", "1", m.VAL_TOP1, forged)  # anyone may tag a version
    assert champion_gate(client, "forged", "2", 55.0) == (False, "kept version 1: 55.00 <= 60.00")
    promoted, decision = champion_gate(client, "forged", "3", 61.0)
    assert promoted and decision == "promoted: 61.00 > 60.00 of version 1"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 250.0])
def test_a_champion_whose_run_holds_no_finite_score_does_not_block_promotion(tmp_path, value):
    client = _registered(tmp_path, "broken")
    assert champion_gate(client, "broken", "1", 60.0)[0] is True
    client.log_metric(client.get_model_version("broken", "1").run_id, m.GATE_SCORE, value)
    promoted, decision = champion_gate(client, "broken", "2", 50.0)
    assert promoted and "version 1 has no registry/gate_score percentage" in decision
    assert champion_gate(client, "broken", "3", float("nan"))[0] is False  # nor is a diverged run champion


def test_champion_history_prints_every_decision(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    uri = f"sqlite:///{tmp_path / 'history.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("hist")
    experiment = client.create_experiment("hist")
    for version, score in (("1", 50.0), ("2", 40.0), ("3", 70.0)):
        client.create_model_version("hist", "file:///nowhere", run_id=client.create_run(experiment).info.run_id)
        client.set_model_version_tag("hist", version, m.VAL_TOP1, str(score))
        champion_gate(client, "hist", version, score)
    client.set_registered_model_tag("hist", "champion_history.999999999999999.9", "{not json")  # a vandalised tag
    result = CliRunner().invoke(app, ["champion", "history", "hist", "--set", f"tracking.tracking_uri={uri}"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:3] == ["time", "(UTC)", "version"]
    assert "promoted: first champion" in lines[1] and lines[1].rstrip().endswith("1")
    assert "kept version 1: 40.00 <= 50.00" in lines[2] and lines[2].rstrip().endswith("1")
    assert "promoted: 70.00 > 50.00 of version 1" in lines[3] and lines[3].rstrip().endswith("3")
    assert "unreadable history tag" in lines[4]
    missing = CliRunner().invoke(app, ["champion", "history", "nope", "--set", f"tracking.tracking_uri={uri}"])
    assert missing.exit_code == 2 and "registered model 'nope': not found" in missing.output


def test_a_model_at_chance_is_registered_but_never_champion_not_even_the_first(tmp_path):
    client = _registered(tmp_path, "floor")
    floor = champion_floor(load_config(), num_classes=10)
    assert floor == (20.0, "twice chance for 10 classes, tracking.min_champion_top1")
    promoted, decision = champion_gate(client, "floor", "1", 10.0, floor=floor)  # the first version, at chance
    assert not promoted and decision.startswith("no champion: val/top1 10.00 is not above 20.00 (twice chance")
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("floor", CHAMPION_ALIAS)
    assert champion_gate(client, "floor", "2", 35.0, floor=floor)[0] is True
    client.set_model_version_tag("floor", "2", m.VAL_TOP1, "35.0")
    own = champion_floor(load_config(overrides=["tracking.min_champion_top1=50"]), num_classes=10)
    promoted, decision = champion_gate(client, "floor", "3", 45.0, floor=own)
    assert not promoted and decision.startswith(
        "kept version 2: val/top1 45.00 is not above 50.00 (tracking.min_champion_top1; chance is 10.00)"
    )
    assert [e.promoted for e in champion_history(client, "floor")] == [False, True, False]


def test_a_refit_of_the_champions_own_run_takes_the_alias_at_an_equal_score_and_no_other_version_does(tmp_path):
    client = _registered(tmp_path, "refit", versions=3)
    champion_run = client.get_model_version("refit", "1").run_id
    assert champion_gate(client, "refit", "1", 60.0)[0] is True
    # Version 2 retrains some other run's configuration: an equal score does not move the alias.
    promoted, decision = champion_gate(client, "refit", "2", 60.0, supersedes_run_id="another-run")
    assert not promoted and decision == "kept version 1: 60.00 <= 60.00"
    promoted, decision = champion_gate(client, "refit", "3", 60.0, note="a refit", supersedes_run_id=champion_run)
    assert promoted and decision == "promoted: retrains version 1's configuration on more data, at its 60.00 (a refit)"
    assert str(client.get_model_version_by_alias("refit", CHAMPION_ALIAS).version) == "3"
