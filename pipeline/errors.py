"""The project's own user-facing errors: one base class, one subclass per area.

A `PipelineError` is a problem with what the user gave (a config value, a dataset, a location, a job, the
cluster) and always reads as one line naming the problem. The CLI shows it as `error: <line>` with exit
status 2 and no traceback; anything else is a bug (ours or a library's) and keeps its traceback.

It subclasses ValueError so that pydantic validators, which turn a ValueError into a validation message, can
raise these directly.
"""

from __future__ import annotations


class PipelineError(ValueError):
    """A user-facing problem, always one line."""


class ConfigError(PipelineError):
    """A configuration value, file or override that cannot be used."""


class DataError(PipelineError):
    """A dataset (source images, shards, manifest) that cannot be read or written as asked."""


class CheckpointError(DataError):
    """A checkpoint that cannot be used safely (it would need full unpickling, which can run code)."""


class StorageError(PipelineError):
    """A location (path, URL, object store, pipe) that cannot be reached, read or written."""


class ModelSourceError(PipelineError):
    """A model reference (registry, run, checkpoint) that names nothing usable."""


class JobError(PipelineError):
    """A Ray job that cannot be submitted, followed or stopped as asked."""


class ClusterError(PipelineError):
    """A local Ray cluster that cannot be started, reached or stopped."""


class BenchmarkError(PipelineError):
    """Benchmark arguments or a benchmark run that cannot go ahead."""


def first_line(error: BaseException, with_type: bool = True) -> str:
    """An exception as one line: libraries' messages run over many (Ray's carry whole server responses)."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text[0]}" if with_type else text[0]
