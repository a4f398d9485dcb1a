"""`train`, `tune`, `refit`, `demo`, `config`: runs on Ray Train and sweeps on Ray Tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline import events
from pipeline.cli.common import ConfigFiles, Overrides, app, fail, resolve_config
from pipeline.config import PROJECT_ROOT, Config, require_shards


@app.command()
def train(config_files: ConfigFiles = None, overrides: Overrides = None) -> None:
    """Train with Ray Train (data parallel), track in MLflow, register the best model."""
    config = resolve_config(config_files, overrides)
    require_shards(config, ("train", "val"))  # before the slow imports and Ray's start
    from pipeline.cluster.session import ensure_ray
    from pipeline.train.driver import run_training

    ensure_ray()
    outcome = run_training(config)
    print_outcome(outcome, config)
    events.record("run_finished")


def print_outcome(outcome, config: Config) -> None:
    from pipeline import metrics as m
    from pipeline.tracking.uri import mlflow_ui_command

    best = outcome.best_metrics
    typer.echo(
        f"\nrun '{outcome.run_name}' finished in {outcome.seconds:.0f} s; best epoch {best.get(m.EPOCH, '?')}: "
        f"val top-1 {best.get(m.VAL_TOP1, float('nan')):.2f} %, top-5 {best.get(m.VAL_TOP5, float('nan')):.2f} %"
    )
    if outcome.model_version:
        typer.echo(
            f"registered model version {outcome.model_version}"
            f"{' (now champion)' if outcome.promoted else ' (champion unchanged)'}"
        )
    typer.echo(f"open the MLflow UI: {mlflow_ui_command(config)}")


@app.command()
def tune(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option(help="continue the sweep named tracking.run_name after an interruption")
    ] = False,
) -> None:
    """Search learning rate, batch size and dropout with Ray Tune + ASHA; register the best trial's model."""
    config = resolve_config(config_files, overrides)
    if resume and not config.tracking.run_name:
        fail("--resume needs the sweep's name: --set tracking.run_name=<name>")
    require_shards(config, ("train", "val"))
    from pipeline.tune.search import run_search

    outcome = run_search(config, resume=resume)
    if outcome.best is not None:
        typer.echo(
            f"\nbest trial {outcome.best.trial_id}: val top-1 {outcome.best.best_top1:.2f} % with {outcome.best.params}"
        )
    if outcome.model_version:
        typer.echo(
            f"registered model '{config.tracking.registered_model}' version {outcome.model_version}"
            f"{' -> @champion' if outcome.promoted else ' (champion unchanged)'}"
        )


@app.command()
def refit(
    sweep: Annotated[str, typer.Option(help="the sweep's name (its tracking.run_name)")],
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
) -> None:
    """Train the sweep's best configuration again on train + val, for the epochs it took to score best; register it.

    The configuration is yours: pass the sweep's config files (-c) and --set values; only the searched keys' values
    come from the best trial's MLflow run, and any other key on which that run's config.json disagrees is refused."""
    config = resolve_config(config_files, overrides, show=False)
    from pipeline.cluster.session import ensure_ray
    from pipeline.tune.refit import run_refit

    ensure_ray()
    outcome = run_refit(config, sweep, list(overrides or []))
    typer.echo(f"\nrefit run '{outcome.run_name}' finished in {outcome.seconds:.0f} s")
    if outcome.model_version:
        typer.echo(
            f"registered model version {outcome.model_version} (refit)"
            f"{' (now champion)' if outcome.promoted else ' (champion unchanged)'}"
        )


@app.command()
def demo(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    data_dir: Annotated[Path, typer.Option(help="where the demo's generated images and shards go")] = Path("data/demo"),
) -> None:
    """End to end on generated data: generate, shard, verify, train on 2 Ray workers, register in MLflow."""
    from pipeline.demo.local import run_demo

    files = config_files or [PROJECT_ROOT / "jobs" / "configs" / "demo.yaml"]
    config = resolve_config(files, [f"data.root={data_dir / 'shards'}", *(overrides or [])])
    ok = run_demo(config, data_dir)
    raise typer.Exit(0 if ok else 1)


@app.command(name="config")
def show_config(config_files: ConfigFiles = None, overrides: Overrides = None) -> None:
    """Print the resolved config (YAML) after merging files and overrides."""
    resolve_config(config_files, overrides)
