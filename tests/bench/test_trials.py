"""The trial-gap benchmark's parts (pipeline/bench/trials.py): inputs checked before Ray starts, and the gaps read
from the recorded event timeline. No timing is asserted; the sweep itself is run by hand
(`imagenet-pipeline bench-train --only trial-gap`)."""

from __future__ import annotations

import pytest

from pipeline.bench.trials import format_trial_gaps, run_trial_gap_benchmark, trial_gaps
from pipeline.errors import BenchmarkError


def test_trial_gaps_pair_each_trials_last_epoch_with_the_next_first_step():
    records = [
        {"event": "first_step", "unix_time": 10.0, "rank": 0},
        {"event": "epoch_end", "unix_time": 12.0, "rank": 0},
        {"event": "epoch_end", "unix_time": 12.5, "rank": 1},
        {"event": "first_step", "unix_time": 20.0, "rank": 0},
        {"event": "epoch_end", "unix_time": 22.0, "rank": 0},
        {"event": "first_step", "unix_time": 26.0, "rank": 0},
        {"event": "epoch_end", "unix_time": 27.0, "rank": 0},
    ]
    result = trial_gaps(records)
    assert result["gaps_seconds"] == [8.0, 4.0] and result["median_gap_seconds"] == 6.0


def test_a_timeline_where_no_trial_followed_another_is_an_error_not_an_empty_figure():
    one_trial = [
        {"event": "first_step", "unix_time": 10.0, "rank": 0},
        {"event": "epoch_end", "unix_time": 12.0, "rank": 0},
        {"event": "first_step", "unix_time": 13.0, "rank": 1},  # another rank's step closes no gap
    ]
    with pytest.raises(BenchmarkError, match="no trial followed another"):
        trial_gaps(one_trial)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"trials": 1}, "trials = 1: a gap needs at least 2 trials"),
        ({"trials": 0}, "trials = 0"),
        ({"global_batch": 15, "num_workers": 2}, "global_batch = 15"),
    ],
)
def test_the_benchmark_rejects_bad_arguments_before_any_work(tmp_path, arguments, named):
    with pytest.raises(BenchmarkError, match=named):
        run_trial_gap_benchmark(tmp_path / "work", **arguments)
    assert not (tmp_path / "work").exists()


def test_the_summary_line_gives_median_spread_gap_count_and_timeline():
    result = {
        **trial_gaps(
            [
                {"event": "epoch_end", "unix_time": 2.0, "rank": 0},
                {"event": "first_step", "unix_time": 10.0, "rank": 0},
                {"event": "epoch_end", "unix_time": 12.0, "rank": 0},
                {"event": "first_step", "unix_time": 16.0, "rank": 0},
            ]
        ),
        "trials": 3,
        "sweep_seconds": 40.2,
        "events_file": "t.jsonl",
    }
    assert format_trial_gaps(result) == (
        "sweep of 3 one-epoch trials, one at a time, 40 s: last epoch of a trial to the next trial's first step: "
        "median 6.0 s (min 4.0, max 8.0) over 2 gaps; timeline: t.jsonl"
    )
