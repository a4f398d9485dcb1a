"""Joining Ray: the one place a process connects to a cluster or starts Ray in-process."""

from __future__ import annotations

import os

import ray

from pipeline import events
from pipeline.config import WORKER_GROUP_START_TIMEOUT_S


def ensure_ray() -> None:
    """Join the cluster when run as a Ray job (RAY_ADDRESS); otherwise start Ray in-process."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_TIMEOUT_S)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
        events.record("ray_started")
