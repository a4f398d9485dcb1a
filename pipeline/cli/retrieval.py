"""`embed` and `retrieve`: a trained model's learned features as an image search engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigFiles, Overrides, app, resolve_config
from pipeline.cli.inference import ModelSource


@app.command()
def embed(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: ModelSource = None,
    split: Annotated[str, typer.Option(help="shard split to embed: train (the gallery) | val | test")] = "train",
    output: Annotated[
        Optional[Path], typer.Option(help="output folder (default: <retrieval.output>/<model>-v<version>/<split>)")
    ] = None,
    log: Annotated[bool, typer.Option(help="log the index to an MLflow run and tag the model version with it")] = True,
) -> None:
    """Embed a shard split with Ray Data (model replicas on the cluster) and build its faiss index."""
    from pipeline.retrieval.embed import embed_split

    config = resolve_config(config_files, overrides, show=False)
    source = model or f"models:/{config.tracking.registered_model}@champion"
    result = embed_split(config, source, split, str(output) if output else None)
    meta = result.meta
    how = "reused (same model version, split and data)" if result.reused else f"{result.images_per_second:.1f} images/s"
    typer.echo(
        f"{meta.num_samples} {split} images -> {meta.dim}-d {meta.layer} features of {meta.model_source}, "
        f"{meta.unreadable} unreadable; {how}\n  {result.directory}"
    )
    if log:
        from pipeline.retrieval.logged import log_index
        from pipeline.tracking.runs import prepare_tracking

        uri, experiment_id = prepare_tracking(config)
        run_id = log_index(config, uri, experiment_id, result.directory, meta, result.images_per_second)
        typer.echo(f"index logged to MLflow run {run_id} (retrieve --index {run_id})")


@app.command()
def retrieve(
    inputs: Annotated[list[Path], typer.Argument(help="query image files and/or folders (searched recursively)")],
    index: Annotated[str, typer.Option(help="an embed output folder, or the MLflow run id `embed` printed")],
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            help="must be the model the gallery was "
            "embedded with (default: that model, when it is a version of "
            "tracking.registered_model)",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="neighbours per query")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table (default: table)")] = False,
    sheet: Annotated[Optional[Path], typer.Option(help="also draw a contact sheet PNG here (default: none)")] = None,
) -> None:
    """The nearest gallery images to each query image, with class names and cosine similarity."""
    from pipeline.retrieval.retrieve import format_results, open_gallery
    from pipeline.retrieval.retrieve import retrieve as run_retrieve

    config = resolve_config(config_files, overrides, show=False)
    gallery = open_gallery(index, config, model_source=model)
    results = run_retrieve(config, inputs, gallery, top_k=top_k)
    typer.echo(format_results(results, as_json=as_json))
    if sheet:
        from pipeline.retrieval.sheet import contact_sheet

        path = contact_sheet(results, gallery, config, sheet)
        typer.echo(f"contact sheet: {path}", err=as_json)
