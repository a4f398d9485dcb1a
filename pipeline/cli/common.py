"""What every subcommand shares: the app, the config options, and the one error boundary.

The boundary: a `PipelineError` (a user's input problem, pipeline.errors) is printed as one `error: ...` line on
stderr with exit status 2. Everything else is a bug, ours or a library's: it keeps its traceback and a non-zero
exit, so a failure inside Ray or torch is never passed off as the user's mistake.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pipeline import events
from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT, Config, load_config
from pipeline.errors import PipelineError


def fail(message: str) -> None:
    """One clear line on stderr and exit status 2: the contract for every bad input."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def user_errors_as_one_line(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PipelineError as error:
            fail(str(error))

    return run


class PipelineTyper(typer.Typer):
    """A Typer app whose every command runs inside the error boundary."""

    def command(self, *args: Any, **kwargs: Any):
        register = super().command(*args, **kwargs)

        def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
            register(user_errors_as_one_line(function))
            return function

        return decorator


app = PipelineTyper(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Distributed AlexNet/ResNet training on ImageNet webdataset shards (Ray Train, Ray Tune, MLflow).",
)

ConfigFiles = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--config",
        "-c",
        help=f"YAML config file(s), merged left to right (default: {DEFAULT_CONFIG.relative_to(PROJECT_ROOT)})",
    ),
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a config key, e.g. --set optim.lr=0.2 (repeatable) (default: none)"),
]


def resolve_config(config_files: list[Path] | None, overrides: list[str] | None, show: bool = True) -> Config:
    config = load_config(config_files or None, overrides or None)
    events.record("config_resolved")
    if show:
        typer.echo("# resolved config\n" + config.to_yaml())
    return config
