"""`evaluate` and `predict`: a trained model on a held-out split or on image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigFiles, Overrides, app, fail, resolve_config

ModelSource = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/model or a "
        "checkpoint folder (default: models:/<tracking.registered_model>@champion)",
    ),
]


@app.command()
def evaluate(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: ModelSource = None,
    split: Annotated[str, typer.Option(help="split to evaluate on: test (final, once) | val | train")] = "test",
    log: Annotated[
        bool,
        typer.Option(
            help="log test/top1, test/top5 to the model's MLflow run (the test-once record is kept either way)"
        ),
    ] = True,
    retrieval: Annotated[
        bool, typer.Option(help="also measure the features: k-NN top-1 (train gallery), recall@1/5/10 and mAP@R")
    ] = True,
    again: Annotated[bool, typer.Option(help="evaluate a model on test a second time (needs --reason)")] = False,
    reason: Annotated[
        Optional[str], typer.Option(help="why test is read again; recorded on the model (default: none)")
    ] = None,
) -> None:
    """Top-1 / top-5 of a registered model, run or checkpoint on the test split, beside published figures.

    Test is read once per model: the evaluation is recorded on the model version (or run), and a second one is
    refused, showing the first result, unless --again --reason "..." (the reason is recorded too)."""
    from pipeline.inference.evaluate import evaluate_model

    if again != bool(reason and reason.strip()):
        fail('--again and --reason go together: --again --reason "why test is read again"')
    config = resolve_config(config_files, overrides, show=False)
    source = model or f"models:/{config.tracking.registered_model}@champion"
    evaluate_model(
        config,
        source,
        split=split,
        log_to_mlflow=log,
        retrieval=retrieval,
        again_reason=reason.strip() if again and reason else None,
    )


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
