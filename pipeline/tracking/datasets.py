"""A split's shards as an MLflow dataset: what the runs table's Dataset column and a run's "Datasets used" show.

    datasets = [split_input(manifest, location, context="train"), ...]
    start_or_resume_run(..., datasets=datasets)

The dataset is the manifest, not the images: name = the split, digest = the manifest's content hash (the same
16 characters as the run's `pipeline.manifest_hash` tag), source = the split's folder or URL, and a profile of
sample, class and shard counts. `context` says what the run did with it (train, val, test).
"""

from __future__ import annotations

import json
import warnings

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.data.manifest import Manifest
from pipeline.tracking.uri import redact


def split_input(manifest: Manifest, location: str, context: str) -> DatasetInput:
    location = redact(location)  # a URL's credentials never reach the tracking store
    try:
        with warnings.catch_warnings():  # a local path matches two equivalent local sources: MLflow warns, picks one
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(location)
        source_type, source_json = source._get_source_type(), source.to_json()
    except MlflowException:  # a scheme MLflow has no dataset source for (e.g. a custom fsspec protocol)
        source_type, source_json = "external", json.dumps({"uri": location})
    profile = {
        "num_samples": manifest.num_samples,
        "num_classes": manifest.num_classes,
        "num_shards": len(manifest.shards),
    }
    dataset = Dataset(
        name=manifest.split,
        digest=manifest.content_hash(),
        source_type=source_type,
        source=source_json,
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
