"""The `imagenet-pipeline` command as a whole (pipeline/cli/__init__.py): every subcommand is registered and shows
its options' defaults in --help. Each area's commands are tested beside it (tests/cli/test_<area>.py)."""

import re

import pytest
import typer.main
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
    "bench-plan",
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


def registered_commands(group, prefix: str = "") -> list[str]:
    found = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a sub-app: job, cluster, champion
            found += registered_commands(command, f"{prefix}{name} ")
        else:
            found.append(prefix + name)
    return found


def test_every_registered_command_is_in_the_help_check():
    listed = [command.values[0] if hasattr(command, "values") else command for command in COMMANDS]
    assert sorted(registered_commands(typer.main.get_command(app))) == sorted(listed)


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
