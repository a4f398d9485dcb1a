"""Joining Ray: the one place a process starts or joins Ray, and the worker-group start timeout it sets."""

from __future__ import annotations

import os

import pytest

from pipeline.cluster.session import ensure_ray
from pipeline.config import WORKER_GROUP_START_TIMEOUT_S

pytestmark = pytest.mark.ray


def test_an_initialized_ray_is_joined_not_restarted_and_the_start_timeout_is_set(ray_session, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    before = ray.get_runtime_context().get_node_id()
    ensure_ray()
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == before
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == WORKER_GROUP_START_TIMEOUT_S


def test_a_timeout_the_user_set_is_kept(ray_session, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "42")
    ensure_ray()
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "42"
