"""`champion history`: the registry's alias decisions, read back from MLflow."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigFiles, Overrides, PipelineTyper, resolve_config

champion_app = PipelineTyper(no_args_is_help=True, help="The @champion alias: its history of decisions.")


@champion_app.command()
def history(
    registered_model: Annotated[
        Optional[str], typer.Argument(help="registered model name (default: tracking.registered_model)")
    ] = None,
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
) -> None:
    """Every @champion decision on a registered model, oldest first: when, which version, moved or kept, why."""
    from pipeline.tracking.registry import champion_history
    from pipeline.tracking.uri import resolve_tracking_uri

    config = resolve_config(config_files, overrides, show=False)
    name = registered_model or config.tracking.registered_model
    events = champion_history(resolve_tracking_uri(config), name)
    if not events:
        typer.echo(f"{name}: no @champion decision recorded yet")
        return
    rows = [("time (UTC)", "version", "decision", "champion after")]
    for event in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.time_ms / 1000)) if event.time_ms else "?"
        rows.append((when, event.version, event.decision, event.champion_after or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
