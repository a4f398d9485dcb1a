"""The Ray Train report-log workaround (pipeline/upstream/ray_train_report_log.py): the per-report INFO logger is
quieted, and nothing else. When the first test fails, Ray no longer names its logger after the file: delete the
workaround and its use in pipeline.train.worker."""

from __future__ import annotations

import logging

import pytest

from pipeline.upstream.ray_train_report_log import _REPORT_LOGGER_SUFFIX, quiet_report_logging


@pytest.fixture
def restore_levels():
    saved = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    root_level = logging.root.level
    yield
    logging.root.setLevel(root_level)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_the_installed_ray_still_creates_the_logger_the_workaround_quiets(restore_levels):
    logging.root.setLevel(logging.INFO)  # as on a Ray Train worker, where every report would be logged
    quiet_report_logging()  # imports ray.train, as the worker does
    report_loggers = [name for name in logging.root.manager.loggerDict if name.endswith(_REPORT_LOGGER_SUFFIX)]
    assert report_loggers, "Ray Train's report logger is not named after its file any more"
    for name in report_loggers:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)


def test_only_the_report_logger_is_quieted(restore_levels):
    report = logging.getLogger(f"/elsewhere/site-packages{_REPORT_LOGGER_SUFFIX}")
    report.setLevel(logging.INFO)
    neighbours = [logging.getLogger(name) for name in ("ray.train", "/elsewhere/ray/train/v2/_internal/other.py")]
    for logger in neighbours:
        logger.setLevel(logging.INFO)
    quiet_report_logging()
    assert report.level == logging.WARNING
    assert [logger.level for logger in neighbours] == [logging.INFO, logging.INFO]
