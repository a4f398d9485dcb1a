"""`evaluate` and `predict`: a trained model on a held-out split or on image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigFiles, Overrides, app, resolve_config


ModelSource = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/model or a "
                 "checkpoint folder (default: models:/<tracking.registered_model>@champion)"),
]


@app.command()
def evaluate(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: ModelSource = None,
    split: Annotated[str, typer.Option(help="split to evaluate on: test (final, once) | val | train")] = "test",
    log: Annotated[bool, typer.Option(help="log test/top1, test/top5 to the model's MLflow run")] = True,
    retrieval: Annotated[bool, typer.Option(help="also measure the features: k-NN top-1 (train gallery), "
                                            "recall@1/5/10 and mAP@R")] = True,
) -> None:
    """Top-1 / top-5 of a registered model, run or checkpoint on the test split, beside published figures."""
    from pipeline.inference.evaluate import evaluate_model

    config = resolve_config(config_files, overrides, show=False)
    source = model or f"models:/{config.tracking.registered_model}@champion"
    evaluate_model(config, source, split=split, log_to_mlflow=log, retrieval=retrieval)


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="image files and/or folders (searched recursively)")],
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: ModelSource = None,
    top_k: Annotated[int, typer.Option(min=1, help="classes shown per image")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table (default: table)")] = False,
) -> None:
    """Top-k classes with names and probabilities for image files or folders."""
    from pipeline.inference.predict import format_predictions
    from pipeline.inference.predict import predict as run_predict

    config = resolve_config(config_files, overrides, show=False)
    source = model or f"models:/{config.tracking.registered_model}@champion"
    predictions = run_predict(config, source, inputs, top_k=top_k)
    typer.echo(format_predictions(predictions, as_json=as_json))
