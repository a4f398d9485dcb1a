"""The model registry: log a trained model to its run, register a version, and move the `champion` alias only
when the new version beats the current champion on val top-1 (the decision is tagged on the version).

The caller brings the model (an eval-mode CPU module): building it from a checkpoint is the training side's job.
Logging a model does not end its run; the run's owner does (`pipeline.tracking.runs.end_run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
import torch
import torchvision
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import Config
from pipeline.data.manifest import Manifest
from pipeline.tracking.plots import learning_curve
from pipeline.tracking.runs import attached

CHAMPION_ALIAS = "champion"
DECISION_TAG = "champion_decision"


@dataclass
class Published:
    version: str
    promoted: bool
    decision: str


def register_model(
    config: Config, uri: str, run_id: str, model: torch.nn.Module, best_metrics: dict[str, Any],
    history: list[dict[str, Any]], manifest: Manifest, embedding: dict[str, Any] | None = None,
) -> Published:
    """Learning curve, the model (pt2), its registry version and the champion decision, all in run `run_id`."""
    client = MlflowClient(uri)
    with attached(uri, run_id):
        if history:
            mlflow.log_figure(learning_curve(history), "learning_curve.png")
        size = config.data.eval_image_size
        example = torch.zeros((2, 3, size, size), dtype=torch.float32)  # batch > 1 keeps the batch dim dynamic
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example.numpy(),
            registered_model_name=config.tracking.registered_model,
            # Listing requirements skips MLflow's inference of them in a subprocess (~6 s per model).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"],
            metadata={"classes": manifest.class_names(),
                      "wnids": [c.wnid for c in sorted(manifest.classes, key=lambda c: c.index)],
                      "manifest_hash": manifest.content_hash(),
                      "architecture": config.model.name, "eval_image_size": size,
                      **({"embedding": embedding} if embedding else {})},
        )
        mlflow.log_metrics({f"best/{key.replace('/', '_')}": float(value) for key, value in best_metrics.items()
                            if isinstance(value, (int, float))})
        version = str(info.registered_model_version)
        score = float(best_metrics[m.SELECTION_METRIC])
        client.set_model_version_tag(config.tracking.registered_model, version, m.SELECTION_METRIC, str(score))
        promoted, decision = champion_gate(client, config.tracking.registered_model, version, score)
        client.set_model_version_tag(config.tracking.registered_model, version, DECISION_TAG, decision)
        mlflow.set_tag(DECISION_TAG, decision)
    return Published(version, promoted, decision)


def champion_gate(client: MlflowClient, name: str, version: str, score: float) -> tuple[bool, str]:
    """Move `champion` to `version` only if it beats the current champion's val top-1."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is None:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        return True, f"promoted: first champion ({m.SELECTION_METRIC} {score:.2f})"
    current_score = float(current.tags.get(m.SELECTION_METRIC, "-inf"))
    if score > current_score:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        return True, f"promoted: {score:.2f} > {current_score:.2f} of version {current.version}"
    return False, f"kept version {current.version}: {score:.2f} <= {current_score:.2f}"
