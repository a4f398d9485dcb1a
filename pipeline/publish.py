"""Publishing a finished run in MLflow: learning curves, the best model, its registry version and the
`champion` alias, which moves only when the new model beats the current champion on val top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # drivers and Ray jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import metrics as m  # noqa: E402
from pipeline.checkpoints import load_weights, local_checkpoint  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.models import build_model  # noqa: E402

CHAMPION_ALIAS = "champion"
DECISION_TAG = "champion_decision"


@dataclass
class Published:
    version: str
    promoted: bool
    decision: str


def publish_best_model(
    config: Config, uri: str, run_id: str, checkpoint_path: str, best_metrics: dict[str, Any],
    history: list[dict[str, Any]], manifest: Manifest,
) -> Published:
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        if history:
            mlflow.log_figure(learning_curve(history), "learning_curve.png")
        with local_checkpoint(checkpoint_path, config.tracking.storage_path) as directory:
            model = load_model_from_checkpoint(config, directory, manifest.num_classes)
        size = config.data.eval_image_size
        example = torch.zeros((2, 3, size, size), dtype=torch.float32)  # batch > 1 keeps the batch dim dynamic
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example.numpy(),
            registered_model_name=config.tracking.registered_model,
            # Listing requirements skips MLflow's inference of them in a subprocess (~6 s per model).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"],
            metadata={"classes": manifest.class_names(), "wnids": [c.wnid for c in sorted(manifest.classes, key=lambda c: c.index)],
                      "manifest_hash": manifest.content_hash(),
                      "architecture": config.model.name, "eval_image_size": size},
        )
        mlflow.log_metrics({f"best/{key.replace('/', '_')}": float(value) for key, value in best_metrics.items()
                            if isinstance(value, (int, float))})
        version = str(info.registered_model_version)
        score = float(best_metrics[m.SELECTION_METRIC])
        client.set_model_version_tag(config.tracking.registered_model, version, m.SELECTION_METRIC, str(score))
        promoted, decision = champion_gate(client, config.tracking.registered_model, version, score)
        client.set_model_version_tag(config.tracking.registered_model, version, DECISION_TAG, decision)
        mlflow.set_tag(DECISION_TAG, decision)
    client.set_terminated(run_id, "FINISHED")
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


def load_model_from_checkpoint(config: Config, checkpoint_path: str, num_classes: int) -> torch.nn.Module:
    return load_weights(checkpoint_path, build_model(config.model, num_classes)).cpu().eval()


def learning_curve(history: list[dict[str, Any]]):
    """Train and val loss, val top-1 by epoch: over- and under-fitting at a glance in the MLflow UI."""
    epochs = [row[m.EPOCH] for row in history]
    figure, (loss_axes, top1_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [row[m.TRAIN_LOSS] for row in history], marker="o", label="train loss")
    loss_axes.plot(epochs, [row[m.VAL_LOSS] for row in history], marker="o", label="val loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("cross-entropy")
    loss_axes.legend()
    top1_axes.plot(epochs, [row[m.VAL_TOP1] for row in history], marker="o", color="tab:green", label="val top-1")
    top1_axes.plot(epochs, [row[m.VAL_TOP5] for row in history], marker="o", color="tab:olive", label="val top-5")
    top1_axes.set_xlabel("epoch")
    top1_axes.set_ylabel("accuracy, %")
    top1_axes.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure
