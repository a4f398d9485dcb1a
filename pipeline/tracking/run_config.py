"""A run's typed config in MLflow: written as params (flattened, searchable in the UI) and whole as
`config.json`, and read back from `config.json` (a refit rebuilds a trial's config from it).

A run's artifacts may be written by anyone who can log to the experiment: what is read back is parsed as JSON
and validated as a Config, never unpickled; which of its keys may be used is the reader's decision."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Config, validate_saved_config
from pipeline.errors import ConfigError
from pipeline.tracking.uri import redact

CONFIG_ARTIFACT = "config.json"  # the run's whole typed config; a refit rebuilds a trial's config from it
PARAM_VALUE_MAX_CHARS = 6000  # MLflow's limit on a param value


def log_config(client: MlflowClient, run_id: str, config: Config) -> None:
    """The config as the run's params and as its `config.json`."""
    data = loggable(config)
    client.log_batch(
        run_id,
        params=[mlflow.entities.Param(key, str(value)[:PARAM_VALUE_MAX_CHARS]) for key, value in flatten(data).items()],
    )
    client.log_dict(run_id, data, CONFIG_ARTIFACT)


def loggable(config: Config) -> dict[str, Any]:
    """The config as MLflow params: credentials in the tracking URI never reach a param."""
    data = config.model_dump(mode="json")
    data["tracking"]["tracking_uri"] = redact(data["tracking"]["tracking_uri"])
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def read_run_config(uri: str, run_id: str, what: str) -> Config:
    """Run `run_id`'s `config.json` as a validated Config, without its (redacted) tracking URI; `what` names the
    run in errors."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = Path(MlflowClient(uri).download_artifacts(run_id, CONFIG_ARTIFACT, scratch))
        except (MlflowException, OSError):
            raise ConfigError(
                f"{what}: its run {run_id} has no {CONFIG_ARTIFACT} (logged since refit exists); "
                "run the sweep again to refit it"
            ) from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{what}: {CONFIG_ARTIFACT} of run {run_id} is not JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {CONFIG_ARTIFACT} of run {run_id} is not a JSON object")
    data.get("tracking", {}).pop("tracking_uri", None)  # logged redacted; the reader's own URI replaces it
    try:
        return validate_saved_config(data)
    except ConfigError as error:
        raise ConfigError(f"{what}: {CONFIG_ARTIFACT} of run {run_id}: {error}") from None
