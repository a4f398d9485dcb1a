"""What a model source string names in MLflow: `models:/<name>@<alias>` or `models:/<name>/<version>` (a registry
version), `runs:/<run_id>/<path>` (a run's artifact); the version behind it, the run that logged it, and the
tags a version carries about its use (the embed run holding its gallery).

MLflow is imported inside the functions, not at the top: `pipeline.inference` imports this module and stays free
of MLflow until a source from MLflow is used (tests/test_architecture.py)."""

from __future__ import annotations

import re

from pipeline.errors import ModelSourceError
from pipeline.tracking.uri import redact

# models:/<name>@<alias> or models:/<name>/<version>; runs:/<run_id>/<artifact path>
REGISTRY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
REGISTRY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
RUN_ARTIFACT = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)/(?P<path>.+)$")


def model_version(source: str, uri: str):
    """The registry entry (mlflow.entities.model_registry.ModelVersion) behind models:/<name>@<alias> or
    models:/<name>/<version>, or a one-line ModelSourceError."""
    by_alias, by_version = REGISTRY_ALIAS.match(source), REGISTRY_VERSION.match(source)
    if not by_alias and not by_version:
        raise ModelSourceError(f"{source}: expected models:/<name>@<alias> or models:/<name>/<version>")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    name = (by_alias or by_version)["name"]
    try:
        if by_alias:
            return client.get_model_version_by_alias(name, by_alias["alias"])
        return client.get_model_version(name, by_version["version"])
    except MlflowException:
        pass
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelSourceError(f"{source}: no registered model '{name}' in {redact(uri)}") from None
    wanted = f"alias '{by_alias['alias']}'" if by_alias else f"version {by_version['version']}"
    raise ModelSourceError(f"{source}: registered model '{name}' has no {wanted}")


def source_run_id(source: str, uri: str) -> str | None:
    """The MLflow run that logged the model behind `source`; None for anything else (a checkpoint directory)."""
    if match := RUN_ARTIFACT.match(source):
        return match["run_id"]
    if source.startswith("models:/"):
        return model_version(source, uri).run_id or None
    return None


def check_model_source(source: str, uri: str) -> None:
    """A one-line ModelSourceError unless `source` names a registry version or an existing run, before anything
    is downloaded."""
    if source.startswith("models:/"):
        model_version(source, uri)
    elif match := RUN_ARTIFACT.match(source):
        from pipeline.tracking.runs import run_exists

        if not run_exists(uri, match["run_id"]):
            raise ModelSourceError(f"{source}: no MLflow run {match['run_id']} in {redact(uri)}")
    else:
        raise ModelSourceError(f"{source}: expected runs:/<run_id>/<artifact path>")


def versions_logged_by(uri: str, registered_model: str, run_id: str) -> list[str]:
    """The versions of `registered_model` whose model run `run_id` logged."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(uri).search_model_versions(f"name = '{registered_model}' and run_id = '{run_id}'")
    return [str(version.version) for version in found]


def tag_model_version(uri: str, name: str, version: str, key: str, value: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_model_version_tag(name, version, key, value)
