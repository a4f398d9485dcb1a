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
from pipeline.retrieval.features import feature_spec
from pipeline.tracking.plots import learning_curve
from pipeline.tracking.runs import FINISHED, attached, end_run, start_or_resume_run

CHAMPION_ALIAS = "champion"
DECISION_TAG = "champion_decision"
INDEX_RUN_TAG = "retrieval_index_run_{split}"  # on a model version: the embed run holding that split's index
INDEX_ARTIFACTS = "gallery"  # artifact folder of an embed run


@dataclass
class Published:
    version: str
    promoted: bool
    decision: str


def register_model(
    config: Config, uri: str, run_id: str, model: torch.nn.Module, best_metrics: dict[str, Any],
    history: list[dict[str, Any]], manifest: Manifest,
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
                      "embedding": _embedding_metadata(config.model.name, model)},
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


def _embedding_metadata(architecture: str, model: torch.nn.Module) -> dict[str, Any]:
    spec = feature_spec(architecture, model)
    return {"layer": spec.layer, "dim": spec.dim, "normalised": "l2"}


def log_index(config: Config, uri: str, experiment_id: str, directory, meta, images_per_second: float | None) -> str:
    """An embed run: the gallery index and its row files as artifacts, the model version tagged with the run.

    The embeddings file itself is not uploaded: the index holds the vectors, and ImageNet train's would be 10 GB.
    """
    from pipeline.retrieval import store
    from pipeline.retrieval.index import INDEX_FILE

    name = f"embed-{directory.parent.name}-{meta.split}"[:128]
    run_id, _ = start_or_resume_run(config, uri, experiment_id, name, meta.manifest_hash,
                                    extra_tags={"pipeline.kind": "embed"})
    client = MlflowClient(uri)
    client.log_batch(run_id, params=[mlflow.entities.Param(f"embed.{key}", str(value)) for key, value in {
        "model_source": meta.model_source, "model_version": meta.model_version, "split": meta.split,
        "layer": meta.layer, "dim": meta.dim, "num_samples": meta.num_samples, "unreadable": meta.unreadable,
        "index": config.retrieval.index}.items()])
    if images_per_second is not None:
        client.log_metric(run_id, "embed/images_per_second", images_per_second)
    for file in (store.META_FILE, store.LABELS_FILE, store.POSITIONS_FILE, store.KEYS_FILE, INDEX_FILE):
        client.log_artifact(run_id, str(directory / file), INDEX_ARTIFACTS)
    if meta.model_version is not None:
        model_name = meta.model_source.removeprefix("models:/").split("/")[0]
        client.set_model_version_tag(model_name, meta.model_version, INDEX_RUN_TAG.format(split=meta.split), run_id)
    end_run(client, run_id, FINISHED)
    return run_id


def download_index(config: Config, run_id: str):
    """An embed run's gallery, downloaded once into <retrieval.output>/runs/<run id> and reused after."""
    from pathlib import Path

    from pipeline import storage
    from pipeline.errors import DataError
    from pipeline.retrieval import store
    from pipeline.tracking.uri import redact, resolve_tracking_uri

    uri = resolve_tracking_uri(config)
    target = Path(storage.require_local(config.retrieval.output, "retrieval.output")) / "runs" / run_id
    if (target / store.META_FILE).is_file():
        return target
    try:
        MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise DataError(f"--index {run_id}: no MLflow run with that id in {redact(uri)}") from None
    with store.staged(target) as folder:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=INDEX_ARTIFACTS,
                                                        dst_path=str(folder), tracking_uri=uri)
        except (mlflow.exceptions.MlflowException, OSError):
            raise DataError(f"--index {run_id}: the run has no {INDEX_ARTIFACTS}/ artifacts; is it an embed run?") from None
        for item in Path(local).iterdir():
            item.rename(folder / item.name)
        if not (folder / store.META_FILE).is_file():
            raise DataError(f"--index {run_id}: the run's {INDEX_ARTIFACTS}/ has no {store.META_FILE}")
    return target
