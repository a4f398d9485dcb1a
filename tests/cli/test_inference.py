"""`evaluate` and `predict` (pipeline/cli/inference.py): options checked before any model is loaded. A trained
model through these commands is tested in tests/inference/."""

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [["--again"], ["--reason", "a relabelled test split"], ["--again", "--reason", " "]])
def test_reading_test_again_needs_both_again_and_a_reason(args, monkeypatch):
    import pipeline.inference.evaluate as evaluate_module

    def never(*args, **kwargs):
        raise AssertionError("evaluated despite the refusal")

    monkeypatch.setattr(evaluate_module, "evaluate_model", never)
    result = runner.invoke(app, ["evaluate", "--model", "models:/m@champion", *args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: --again and --reason go together: --again --reason "why test is read again"'
    ]


def test_predict_takes_the_configured_champion_when_no_model_is_named(monkeypatch, tmp_path):
    import pipeline.inference.predict as predict_module

    asked = []
    monkeypatch.setattr(predict_module, "predict", lambda config, source, inputs, top_k: asked.append(source) or [])
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"")
    result = runner.invoke(app, ["predict", str(image), "--set", "tracking.registered_model=zoo", "--json"])
    assert result.exit_code == 0, result.output
    assert asked == ["models:/zoo@champion"]
