"""`bench-data`, `bench-train`, `bench-plan`, `bench-retrieval`, `bench-gpu` (pipeline/cli/bench.py): the options
each command parses itself are refused in one line before any benchmark starts. The benchmarks' own parts are
tested in tests/bench/."""

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--datasets", "mnist"], "mnist not among imagenet-1k"),
        (["--worlds", "8,x"], "comma-separated whole numbers"),
        (["--loaders", "0"], "each at least 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message):
    result = runner.invoke(app, ["bench-plan", *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench-train", "--only", "speed"], "--only 'speed' is not one of overhead, startup, trial-gap"),
        (["bench-retrieval", "--gallery", "100000x"], "--gallery '100000x': expected ROWSxDIM, e.g. 100000x512"),
        (["bench-retrieval", "--gallery", "0x512"], "--gallery '0x512': expected ROWSxDIM, e.g. 100000x512"),
        (["bench-gpu", "--loader-processes", "4,many"], "--loader-processes '4,many': expected counts such as 4,8,14"),
    ],
)
def test_a_bad_option_is_one_line_and_nothing_is_written(tmp_path, args, message):
    work_dir = tmp_path / "work"
    result = runner.invoke(app, [*args, "--work-dir", str(work_dir)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert not work_dir.exists()
