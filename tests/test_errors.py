"""User-facing errors: one base class the CLI catches, and one-line messages even from multi-line library errors."""

from __future__ import annotations

import pytest

from pipeline.errors import (
    BenchmarkError,
    CheckpointError,
    ClusterError,
    ConfigError,
    DataError,
    JobError,
    ModelSourceError,
    PipelineError,
    StorageError,
    first_line,
)


@pytest.mark.parametrize(
    "kind",
    [ConfigError, DataError, CheckpointError, StorageError, ModelSourceError, JobError, ClusterError, BenchmarkError],
)
def test_every_area_error_is_a_pipeline_error_and_a_value_error(kind):
    # ValueError: pydantic validators turn it into a validation message; PipelineError: the CLI's one catch.
    assert issubclass(kind, PipelineError) and issubclass(kind, ValueError)


def test_a_damaged_checkpoint_is_a_data_problem():
    assert issubclass(CheckpointError, DataError)


def test_first_line_keeps_only_the_first_line_of_a_server_response():
    error = RuntimeError("Max retries exceeded\n<html>\n  <body>500</body>\n</html>")
    assert first_line(error) == "RuntimeError: Max retries exceeded"
    assert first_line(error, with_type=False) == "Max retries exceeded"


def test_first_line_of_an_empty_message_is_the_type():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("  \n ")) == "OSError"
