"""An embed run in MLflow: the gallery index and its row files as artifacts, the model version tagged with it;
and the way back, an index downloaded from its run for `retrieve --index <run id>`."""

from __future__ import annotations

from pathlib import Path

import mlflow

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.features import store
from pipeline.features.index import INDEX_FILE
from pipeline.tracking.models import tag_model_version
from pipeline.tracking.runs import attached, run_exists, run_scope, start_or_resume_run
from pipeline.tracking.uri import redact, resolve_tracking_uri

INDEX_RUN_TAG = "retrieval_index_run_{split}"  # on a model version: the embed run holding that split's index
INDEX_ARTIFACTS = "gallery"  # artifact folder of an embed run


def log_index(config: Config, uri: str, experiment_id: str, directory, meta, images_per_second: float | None) -> str:
    """An embed run: the gallery index and its row files as artifacts, the model version tagged with the run.

    The embeddings file itself is not uploaded: the index holds the vectors, and ImageNet train's would be 10 GB.
    """
    name = f"embed-{directory.parent.name}-{meta.split}"[:128]
    run_id, _ = start_or_resume_run(
        config, uri, experiment_id, name, meta.manifest_hash, extra_tags={"pipeline.kind": "embed"}
    )
    with run_scope(uri, run_id):
        with attached(uri, run_id):
            mlflow.log_params(
                {
                    f"embed.{key}": str(value)
                    for key, value in {
                        "model_source": meta.model_source,
                        "model_version": meta.model_version,
                        "split": meta.split,
                        "layer": meta.layer,
                        "dim": meta.dim,
                        "num_samples": meta.num_samples,
                        "unreadable": meta.unreadable,
                        "index": config.retrieval.index,
                    }.items()
                }
            )
            if images_per_second is not None:
                mlflow.log_metric("embed/images_per_second", images_per_second)
            for file in (store.META_FILE, store.LABELS_FILE, store.POSITIONS_FILE, store.KEYS_FILE, INDEX_FILE):
                mlflow.log_artifact(str(directory / file), INDEX_ARTIFACTS)
        if meta.model_version is not None:
            model_name = meta.model_source.removeprefix("models:/").split("/")[0]
            tag_model_version(uri, model_name, meta.model_version, INDEX_RUN_TAG.format(split=meta.split), run_id)
    return run_id


def download_index(config: Config, run_id: str):
    """An embed run's gallery, downloaded once into <retrieval.output>/runs/<run id> and reused after."""
    uri = resolve_tracking_uri(config)
    target = Path(storage.require_local(config.retrieval.output, "retrieval.output")) / "runs" / run_id
    if (target / store.META_FILE).is_file():
        return target
    if not run_exists(uri, run_id):
        raise DataError(f"--index {run_id}: no MLflow run with that id in {redact(uri)}")
    with store.staged(target) as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=INDEX_ARTIFACTS, dst_path=str(folder), tracking_uri=uri
            )
        except (mlflow.exceptions.MlflowException, OSError):
            raise DataError(
                f"--index {run_id}: the run has no {INDEX_ARTIFACTS}/ artifacts; is it an embed run?"
            ) from None
        for item in Path(local).iterdir():
            item.rename(folder / item.name)
        if not (folder / store.META_FILE).is_file():
            raise DataError(f"--index {run_id}: the run's {INDEX_ARTIFACTS}/ has no {store.META_FILE}")
    return target
