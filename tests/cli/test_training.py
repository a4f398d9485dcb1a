"""`train`, `tune`, `refit`, `demo`, `config` (pipeline/cli/training.py): the resolved config, and what is refused
before Ray starts. Training itself is tested in tests/train/ and tests/tune/."""

import yaml
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_config_prints_the_resolved_config_with_files_and_overrides_applied(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  epochs: 7\n")
    result = runner.invoke(app, ["config", "-c", str(extra), "--set", "optim.lr=0.2"])
    assert result.exit_code == 0, result.output
    header, _, body = result.output.partition("\n")
    assert header == "# resolved config"
    printed = yaml.safe_load(body)
    assert printed["optim"]["lr"] == 0.2 and printed["optim"]["epochs"] == 7


def test_train_without_shards_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import pipeline.cluster.session as session

    def never():
        raise AssertionError("Ray started for a run that cannot read its data")

    monkeypatch.setattr(session, "ensure_ray", never)
    result = runner.invoke(app, ["train", "--set", f"data.root={tmp_path / 'none'}"])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.root" in last and "does not exist" in last


def test_resuming_a_sweep_needs_its_name(tmp_path):
    result = runner.invoke(app, ["tune", "--resume", "--set", f"data.root={tmp_path}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --resume needs the sweep's name: --set tracking.run_name=<name>"
    )
