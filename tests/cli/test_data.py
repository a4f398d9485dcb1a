"""`generate`, `shard`, `verify`, `index`, `load` (pipeline/cli/data.py): the data path end to end, and bad input
refused in one line before any work."""

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "--output", "{folder}/synthetic", "--val-layout", "zip"],
            "--val-layout 'zip' is not one of folders, devkit, loc_csv",
        ),
        (["index", "{folder}", "--split", "holdout"], "--split 'holdout' is not one of train, val, test"),
        (["verify", "{folder}"], "{folder} holds no split with a manifest.json"),
    ],
)
def test_bad_data_arguments_are_one_line_before_any_file_is_written(tmp_path, args, message):
    folder = tmp_path / "empty"
    folder.mkdir()
    result = runner.invoke(app, [arg.format(folder=folder) for arg in args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message.format(folder=folder)}"]
    assert list(folder.iterdir()) == []


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
