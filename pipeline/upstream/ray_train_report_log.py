"""Workaround: Ray Train 2.60 logs every `ray.train.report` at INFO on each worker, whatever `LoggingConfig` says.

The logger is created with `logging.getLogger(__file__)` in Ray Train's execution context, so it sits outside the
`ray.train` logger tree that `RunConfig(logging_config=LoggingConfig(log_level=...))` configures. The epoch table
says the same in one line. Found by its name (the file path) rather than by importing Ray's private module; when
Ray names the logger properly, delete this file and its one use (`pipeline.train.worker`).
"""

from __future__ import annotations

import logging

_REPORT_LOGGER_SUFFIX = "/ray/train/v2/_internal/execution/context.py"


def quiet_report_logging() -> None:
    import ray.train  # noqa: F401 - creates the logger

    for name in list(logging.root.manager.loggerDict):
        if name.endswith(_REPORT_LOGGER_SUFFIX):
            logging.getLogger(name).setLevel(logging.WARNING)
