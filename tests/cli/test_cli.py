"""End to end through the `imagenet-pipeline` command: help texts, the data path, and bad input."""

import re

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
COMMANDS = [
    "generate",
    "shard",
    "verify",
    "index",
    "load",
    "train",
    "tune",
    "refit",
    "evaluate",
    "predict",
    "bench-data",
    "bench-train",
    "demo",
    "config",
    "job submit",
    "job logs",
    "job status",
    "job stop",
    "job list",
    "cluster up",
    "cluster down",
    "cluster demo",
    "champion history",
    "embed",
    "retrieve",
    "bench-retrieval",
    "bench-gpu",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_in_help_shows_its_default(command):
    result = runner.invoke(
        app, [*command.split(), "--help"], terminal_width=200, env={"COLUMNS": "200", "NO_COLOR": "1"}
    )
    assert result.exit_code == 0, result.output
    entries: list[str] = []  # one per option: its first line plus wrapped continuation lines
    for line in result.output.splitlines():
        body = line.strip(" │|")
        if re.match(r"^-{1,2}\w", body):
            entries.append(body)
        elif entries and body and not body.startswith(("╰", "╭", "─")):
            entries[-1] += " " + body
    assert entries, result.output
    for entry in entries:
        if entry.startswith("--help"):
            continue
        assert "default" in entry or "[required]" in entry, f"{command}: option without a default shown: {entry}"


def test_bad_config_value_is_one_line_and_exit_code_2():
    result = runner.invoke(app, ["config", "--set", "optim.lr=-1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: optim.lr = -1: Input should be greater than 0"]


def test_load_without_shards_fails_before_streaming(tmp_path):
    result = runner.invoke(app, ["load", "--set", f"data.root={tmp_path / 'none'}"])
    assert result.exit_code == 2
    assert "data.root" in result.output and "does not exist" in result.output


def test_load_streams_shards_from_a_url_root(memory_shards):
    result = runner.invoke(
        app,
        [
            "load",
            "--split",
            "val",
            "--set",
            f"data.root={memory_shards}",
            "--set",
            "optim.batch_size=4",
            "--set",
            "data.eval_image_size=32",
            "--set",
            "data.loader_workers=0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "val: 22 samples" in result.output


@pytest.mark.parametrize("args", [["shard", "--output", "s3://bucket/shards"], ["index", "gs://bucket/shards/train"]])
def test_writing_shards_to_a_url_is_one_line_saying_to_upload(tmp_path, args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "://bucket/shards" in line and "shard (and index, verify) locally, then upload" in line


@pytest.mark.slow
def test_generate_shard_verify_load_round_trip(tmp_path):
    source, shards = tmp_path / "src", tmp_path / "shards"
    ok = runner.invoke(
        app,
        [
            "generate",
            "--output",
            str(source),
            "--classes",
            "3",
            "--train-per-class",
            "8",
            "--val-per-class",
            "2",
            "--width",
            "48",
            "--height",
            "36",
        ],
    )
    assert ok.exit_code == 0, ok.output
    ok = runner.invoke(
        app,
        [
            "shard",
            "--source",
            str(source),
            "--output",
            str(shards),
            "--val-per-class",
            "2",
            "--samples-per-shard",
            "5",
            "--no-progress",
        ],
    )
    assert ok.exit_code == 0, ok.output
    ok = runner.invoke(app, ["verify", str(shards)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count(": ok") == 3
    for split in ("train", "val", "test"):
        ok = runner.invoke(
            app,
            [
                "load",
                "--split",
                split,
                "--set",
                f"data.root={shards}",
                "--set",
                "optim.batch_size=4",
                "--set",
                "data.train_image_size=32",
                "--set",
                "data.eval_image_size=32",
                "--set",
                "data.loader_workers=1",
            ],
        )
        assert ok.exit_code == 0, ok.output
        assert "equal steps on every rank: yes" in ok.output
    # Damage one shard: verify names the problem and exits non-zero.
    victim = sorted((shards / "train").glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-2000])
    bad = runner.invoke(app, ["verify", str(shards)])
    assert bad.exit_code == 1
    assert victim.name in bad.output
