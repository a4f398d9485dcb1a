"""Timeline events and the sample log: off unless a file is named, shared by processes, robust to a cut line."""

from __future__ import annotations

import multiprocessing

from pipeline import events


def test_nothing_is_written_unless_a_file_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv(events.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    events.record("first_step", rank=0)
    assert list(tmp_path.iterdir()) == []


def _record_from_child(path: str) -> None:
    events.use_file(path)
    events.record("child_started", rank=1)


def test_records_from_several_processes_land_in_one_file_in_order(monkeypatch, tmp_path):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(events.ENV_VAR, str(path))
    events.record("driver_started")
    child = multiprocessing.get_context("spawn").Process(target=_record_from_child, args=(str(path),))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    records = events.read(path)
    assert [record["event"] for record in records] == ["driver_started", "child_started"]
    assert records[1]["rank"] == 1 and records[0]["pid"] != records[1]["pid"]
    times = events.first_times(records, since=records[0]["unix_time"])
    assert times["driver_started"] == 0.0 and times["child_started"] >= 0.0


def test_a_line_cut_short_by_a_killed_process_is_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "a", "unix_time": 1.0, "pid": 1}\n{"event": "b", "unix_ti')
    assert [record["event"] for record in events.read(path)] == ["a"]


def test_the_sample_log_keeps_one_line_per_step_without_masked_slots(monkeypatch, tmp_path):
    path = tmp_path / "samples.jsonl"
    monkeypatch.setenv(events.SAMPLE_LOG_ENV_VAR, str(path))
    events.record_batch(rank=0, epoch=1, step=3, keys=["n01_1", "", "n01_2"])
    assert events.read(path) == [{"rank": 0, "epoch": 1, "step": 3, "keys": ["n01_1", "n01_2"]}]
