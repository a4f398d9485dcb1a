"""The model registry: log a trained model to its run, register a version, and move the `champion` alias only
when the new version beats the current champion on val top-1 (the decision is tagged on the version).

Every decision, a move or a refusal, is also kept on the registered model as one `champion_history.*` tag, so
"which version was champion on date X, and why" is answered from MLflow alone:

    imagenet-pipeline champion history imagenet-classifier

The caller brings the model (an eval-mode CPU module): building it from a checkpoint is the training side's job.
Logging a model does not end its run; the run's owner does (`pipeline.tracking.runs.run_scope`).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import torch
import torchvision
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import Config
from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError
from pipeline.tracking.plots import learning_curve
from pipeline.tracking.runs import attached
from pipeline.tracking.uri import redact, redact_text

CHAMPION_ALIAS = "champion"
BEST_SUMMARY = (m.EPOCH, m.VAL_LOSS, m.VAL_TOP1, m.VAL_TOP5)
DECISION_TAG = "champion_decision"
HISTORY_TAG_PREFIX = "champion_history."  # + zero-padded epoch milliseconds + "." + version: sorts by time


@dataclass(frozen=True)
class Gate:
    """The score a version is gated on when it has none of its own (a refit: its sweep's val score), the note
    that says so in the decision, and tags for the version."""

    score: float
    note: str
    tags: dict[str, str] = field(default_factory=dict)
    # The run whose model this one retrains on more data (a refit's trial): at an equal score the new one wins.
    supersedes_run_id: str | None = None


@dataclass
class Published:
    version: str
    promoted: bool
    decision: str


def register_model(
    config: Config,
    uri: str,
    run_id: str,
    model: torch.nn.Module,
    best_metrics: dict[str, Any],
    history: list[dict[str, Any]],
    manifest: Manifest,
    embedding: dict[str, Any] | None = None,
    gate: Gate | None = None,
) -> Published:
    """Learning curve, the model (pt2), its registry version and the champion decision, all in run `run_id`."""
    client = MlflowClient(uri)
    with attached(uri, run_id):
        if history:
            mlflow.log_figure(learning_curve(history), "learning_curve.png")
        size = config.data.eval_image_size
        example = torch.zeros((2, 3, size, size), dtype=torch.float32)  # batch > 1 keeps the batch dim dynamic
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example.numpy(),
            registered_model_name=config.tracking.registered_model,
            # Listing requirements skips MLflow's inference of them in a subprocess (~6 s per model).
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"mlflow=={mlflow.__version__}",
            ],
            metadata={
                "classes": manifest.class_names(),
                "wnids": [c.wnid for c in sorted(manifest.classes, key=lambda c: c.index)],
                "manifest_hash": manifest.content_hash(),
                "architecture": config.model.name,
                "eval_image_size": size,
                **({"embedding": embedding} if embedding else {}),
            },
        )
        # The best epoch's score only: the UI charts every metric, and one-point charts of train figures
        # pushed the learning curves off its first screen.
        mlflow.log_metrics(
            {
                f"best/{key.replace('/', '_')}": float(value)
                for key, value in best_metrics.items()
                if key in BEST_SUMMARY and isinstance(value, (int, float))
            }
        )
        version = str(info.registered_model_version)
        name = config.tracking.registered_model
        score = gate.score if gate else float(best_metrics[m.SELECTION_METRIC])
        for key, value in {m.SELECTION_METRIC: str(score), **(gate.tags if gate else {})}.items():
            client.set_model_version_tag(name, version, key, value)
        describe(client, config, version, best_metrics, manifest)
        promoted, decision = champion_gate(
            client,
            name,
            version,
            score,
            gate.note if gate else "",
            gate.supersedes_run_id if gate else None,
            champion_floor(config, manifest.num_classes),
        )
        client.set_model_version_tag(name, version, DECISION_TAG, decision)
        mlflow.set_tag(DECISION_TAG, decision)
    return Published(version, promoted, decision)


def describe(
    client: MlflowClient, config: Config, version: str, best_metrics: dict[str, Any], manifest: Manifest
) -> None:
    """What the registry's pages show about the model and this version: what it is, from which data, how good,
    and the command that made it."""
    name = config.tracking.registered_model
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            description=(
                f"ImageNet-style image classifiers trained by imagenet-pipeline (Ray Train, webdataset shards). "
                f"@{CHAMPION_ALIAS} is the version with the best {m.SELECTION_METRIC}; every alias decision is listed "
                f"by `imagenet-pipeline champion history {name}`."
            ),
        )
    scores = ", ".join(
        f"{key} {float(value):.2f}"
        for key, value in sorted(best_metrics.items())
        if key.startswith(("val/", "train/loss")) and isinstance(value, (int, float))
    )
    command = redact_text(shlex.join(sys.argv)) if sys.argv else "unknown"
    client.update_model_version(
        name,
        version,
        description=(
            f"{config.model.name}, {manifest.num_classes} classes, trained on {'+'.join(config.data.fit_splits)} of "
            f"{redact(config.data.root)} (manifest {manifest.content_hash()}, {manifest.num_samples} images), "
            f"{config.optim.epochs} epochs max, {config.optim.optimizer} lr {config.optim.lr:g}, global batch "
            f"{config.optim.batch_size}. Best: {scores or 'not validated (a refit)'}. Made by: {command}"
        ),
    )


def champion_floor(config: Config, num_classes: int) -> tuple[float, str]:
    """The val top-1 a version must exceed to become champion at all, and why that figure."""
    chance = 100.0 / num_classes
    if config.tracking.min_champion_top1 is not None:
        return config.tracking.min_champion_top1, f"tracking.min_champion_top1; chance is {chance:.2f}"
    return 2 * chance, f"twice chance for {num_classes} classes, tracking.min_champion_top1"


def champion_gate(
    client: MlflowClient,
    name: str,
    version: str,
    score: float,
    note: str = "",
    supersedes_run_id: str | None = None,
    floor: tuple[float, str] = (0.0, "no floor"),
) -> tuple[bool, str]:
    """Move `champion` to `version` only if it beats the current champion's val top-1 and the `floor` (a model
    not clearly above chance is never champion, the first version of a model included); record the decision.

    A version that retrains the champion's own configuration on more data (a refit of the champion's trial,
    `supersedes_run_id`) carries the same val score by construction, and takes the alias at that equal score."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except mlflow.exceptions.MlflowException:
        current = None
    suffix = f" ({note})" if note else ""
    minimum, why = floor
    run_id = client.get_model_version(name, version).run_id
    if run_id and math.isfinite(score):
        client.log_metric(run_id, m.GATE_SCORE, score)
    if not math.isfinite(score) or score <= minimum:  # a diverged run's nan is never champion
        kept = f"kept version {current.version}" if current else "no champion"
        decision = (
            f"{kept}: {m.SELECTION_METRIC} {score:.2f} is not above {minimum:.2f} ({why}): "
            f"a model not clearly above chance is never champion{suffix}"
        )
        record_decision(client, name, version, False, score, current.version if current else None, decision)
        return False, decision
    current_score = gate_score(client, current) if current is not None else None
    if current is None:
        promoted, decision = True, f"promoted: first champion ({m.SELECTION_METRIC} {score:.2f}){suffix}"
    elif current_score is None:
        promoted, decision = (
            True,
            (
                f"promoted: {score:.2f}; version {current.version} has no "
                f"{m.GATE_SCORE} percentage on its run to compare with{suffix}"
            ),
        )
    else:
        same_model = bool(supersedes_run_id) and current.run_id == supersedes_run_id and score >= current_score
        promoted = score > current_score or same_model
        if same_model:
            decision = (
                f"promoted: retrains version {current.version}'s configuration on more data, at its {score:.2f}{suffix}"
            )
        elif promoted:
            decision = f"promoted: {score:.2f} > {current_score:.2f} of version {current.version}{suffix}"
        else:
            decision = f"kept version {current.version}: {score:.2f} <= {current_score:.2f}{suffix}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    record_decision(client, name, version, promoted, score, current.version if current else None, decision)
    return promoted, decision


def gate_score(client: MlflowClient, version) -> float | None:
    """The score `version` was gated on, from its run's metric (best/val_top1 for versions registered before the
    metric existed); None when missing or not a percentage (MLflow stores inf as the largest float). Tags are
    free text anyone can set: never read from them."""
    try:
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    except mlflow.exceptions.MlflowException:
        return None
    value = metrics.get(m.GATE_SCORE, metrics.get("best/" + m.SELECTION_METRIC.replace("/", "_")))
    return float(value) if isinstance(value, (int, float)) and 0.0 <= value <= 100.0 else None


@dataclass(frozen=True)
class ChampionEvent:
    time_ms: int
    version: str  # the version the decision was about
    promoted: bool
    score: float
    champion_before: str | None
    decision: str

    @property
    def champion_after(self) -> str | None:
        return self.version if self.promoted else self.champion_before


def record_decision(
    client: MlflowClient, name: str, version: str, promoted: bool, score: float, before: str | None, decision: str
) -> None:
    now = int(time.time() * 1000)
    event = {
        "time_ms": now,
        "version": version,
        "promoted": promoted,
        "score": score,
        "champion_before": before,
        "decision": decision,
    }
    client.set_registered_model_tag(name, f"{HISTORY_TAG_PREFIX}{now:015d}.{version}", json.dumps(event))


def champion_history(store: str | MlflowClient, name: str) -> list[ChampionEvent]:
    """Every recorded decision on `name`, oldest first; `store` is the tracking URI (or a client of it). Tags are
    data from a shared store: read as JSON, checked."""
    client = store if isinstance(store, MlflowClient) else MlflowClient(store)
    try:
        tags = client.get_registered_model(name).tags
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"registered model {name!r}: not found in {redact(client.tracking_uri)}") from None
    events = []
    for key, value in sorted(tags.items()):
        if not key.startswith(HISTORY_TAG_PREFIX):
            continue
        try:
            data = json.loads(value)
            events.append(
                ChampionEvent(
                    int(data["time_ms"]),
                    str(data["version"]),
                    bool(data["promoted"]),
                    float(data["score"]),
                    None if data["champion_before"] is None else str(data["champion_before"]),
                    str(data["decision"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            events.append(ChampionEvent(0, "?", False, float("nan"), None, f"unreadable history tag {key}"))
    return events


def champion_on(events: list[ChampionEvent], time_ms: int) -> str | None:
    """The champion version at `time_ms`, from the recorded decisions."""
    champion = None
    for event in events:
        if 0 < event.time_ms <= time_ms:  # 0: an unreadable record, which says nothing about the champion
            champion = event.champion_after
    return champion
