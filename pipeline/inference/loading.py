"""The model behind a source string, ready for inference: the MLflow registry (`models:/<name>@<alias>`,
`models:/<name>/<version>`), a run (`runs:/<run_id>/model`) or a Ray Train checkpoint directory (`state.pt` +
`meta.json`). MLflow is imported only for the first two.

A logged model is data from a shared store, and MLflow's loader would unpickle anything but a pickle-free pt2
archive (and put a model's `code` folder on sys.path). So only the format this pipeline publishes is loaded: an
MLflow PyTorch model whose data folder holds exactly `model.pt2` and which brings no code; anything else is
refused in one line before any byte of it is deserialised, and MLflow's own pt2 check (pickle deserialisation is
off, see pipeline/__init__.py) refuses an archive whose weights need unpickling.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from pipeline import storage
from pipeline.architectures import MODEL_NAMES
from pipeline.config import Config, validate_saved_config
from pipeline.data.manifest import MANIFEST_NAME, SPLITS, Manifest, has_manifest, read_manifest
from pipeline.errors import DataError, ModelSourceError, first_line
from pipeline.tracking.models import RUN_ARTIFACT, check_model_source, model_version
from pipeline.tracking.uri import resolve_tracking_uri
from pipeline.train.checkpoints import META_FILE, STATE_FILE, load_weights, read_meta
from pipeline.train.models import build_model


class InferenceModel(NamedTuple):
    model: torch.nn.Module  # in inference mode, on the CPU
    class_names: list[str]  # index -> human-readable name
    architecture: str  # a pipeline.architectures entry
    eval_image_size: int  # the centre-crop side the model was evaluated (and, for pt2, exported) at


class FrozenEvalModule(torch.nn.Module):
    """Wraps a torch.export graph, which is fixed in the mode it was exported in (eval, see publish.py).

    The unlifted graph raises on `train()` / `eval()`; here both are no-ops, so the graph runs through the same
    evaluation code as an eager model.
    """

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> "FrozenEvalModule":
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(images)


def load_model_for_inference(source: str, config: Config, split: str | None = None) -> InferenceModel:
    """The model behind `source`, ready for inference on the CPU, with its class names.

    MLflow models carry their class names, architecture and crop size in the logged model's metadata. A
    checkpoint carries its architecture and crop size in meta.json; its class names come from the manifest
    of `split` (default: the first of test, val, train) under `config.data.root`.
    """
    if source.startswith(("models:/", "runs:/")):
        return _load_mlflow_model(source, config)
    return _load_checkpoint_model(Path(source), config, split)


class PinnedSource(NamedTuple):
    source: str  # an alias resolved to its version: models:/<name>/<version>; other sources as given
    version: str | None  # registry version
    run_id: str | None  # the MLflow run that logged the model


def pin_model_source(source: str, config: Config) -> PinnedSource:
    """`models:/<name>@<alias>` as the version it points to now, so every replica and every later reader means the
    same model even if the alias moves meanwhile."""
    if source.startswith("models:/"):
        version = model_version(source, resolve_tracking_uri(config))
        return PinnedSource(f"models:/{version.name}/{version.version}", str(version.version), version.run_id or None)
    if match := RUN_ARTIFACT.match(source):
        return PinnedSource(source, None, match["run_id"])
    return PinnedSource(str(Path(source).resolve()), None, None)


def split_manifest(config: Config, split: str) -> Manifest:
    split_dir = storage.join(config.data.root, split)
    if not has_manifest(split_dir):
        raise DataError(
            f"data.root = '{config.data.root}': no {split}/{MANIFEST_NAME}; shard the {split} split or point "
            "data.root at a folder holding it"
        )
    return read_manifest(split_dir, config.data.shard_url_schemes)


def _load_mlflow_model(source: str, config: Config) -> InferenceModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    check_model_source(source, uri)  # a clear error before any download
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch))
        except (MlflowException, OSError) as error:
            raise ModelSourceError(f"{source}: cannot download the model ({first_line(error, False)})") from None
        metadata = exported_model_metadata(local, source)  # before anything in the folder is deserialised
        try:
            # pt2 (torch.export) models load as a graph module; mlflow does not (cannot) call eval() on it.
            graph = mlflow.pytorch.load_model(str(local))
        except (MlflowException, OSError, RuntimeError, ValueError) as error:
            raise ModelSourceError(f"{source}: cannot load the pt2 model ({first_line(error, False)})") from None
    missing = [key for key in ("classes", "architecture", "eval_image_size") if key not in metadata]
    if missing:
        raise ModelSourceError(
            f"{source}: the logged model's metadata lacks {', '.join(missing)}; publish it with "
            "pipeline.tracking.registry (imagenet-pipeline train)"
        )
    classes, architecture, size = metadata["classes"], metadata["architecture"], metadata["eval_image_size"]
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(name, str) for name in classes)
        or architecture not in MODEL_NAMES
        or not isinstance(size, int)
        or not 8 <= size <= 4096
    ):
        raise ModelSourceError(
            f"{source}: the logged model's metadata is malformed (classes must be a list of "
            "names, architecture a known model, eval_image_size a crop size in pixels)"
        )
    model = FrozenEvalModule(graph)  # only pt2 loads (exported_model_metadata): always a frozen graph
    return InferenceModel(model, classes, architecture, size)


MLMODEL_MAX_BYTES = 4 << 20  # the class list of 21k ImageNet classes fits many times over
PT2_FILE = "model.pt2"


def exported_model_metadata(folder: Path, source: str) -> dict[str, Any]:
    """The metadata of a logged model folder, if it is a pt2 model that brings no code; else a one-line refusal.

    Reads only the MLmodel file (YAML, safe loader) and the folder listing: nothing here unpickles or imports."""

    def refuse(why: str) -> ModelSourceError:
        return ModelSourceError(
            f"{source}: not a torch.export (pt2) model as imagenet-pipeline publishes ({why}); "
            "refused before loading: any other format is unpickled, which can run code"
        )

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise refuse("no MLmodel file")
    if mlmodel.stat().st_size > MLMODEL_MAX_BYTES:
        raise refuse(f"MLmodel is over {MLMODEL_MAX_BYTES >> 20} MiB")
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise refuse("MLmodel is not YAML") from None
    flavor = (
        spec.get("flavors", {}).get("pytorch")
        if isinstance(spec, dict) and isinstance(spec.get("flavors"), dict)
        else None
    )
    if not isinstance(flavor, dict):
        raise refuse("no pytorch flavor")
    if flavor.get("code") is not None:
        raise refuse("it brings a code folder")
    data = folder / str(flavor.get("model_data"))
    if flavor.get("model_data") != "data" or not data.is_dir():
        raise refuse(f"model_data is {str(flavor.get('model_data'))[:80]!r}, not the data folder")
    files = sorted(path.relative_to(data).as_posix() for path in data.rglob("*"))
    if files != [PT2_FILE]:
        raise refuse(f"its data folder holds {', '.join(files[:5]) or 'nothing'}, not {PT2_FILE} alone")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise refuse("its metadata is not a mapping")
    return metadata


def _load_checkpoint_model(directory: Path, config: Config, split: str | None) -> InferenceModel:
    if not directory.is_dir():
        raise ModelSourceError(
            f"model source '{directory}': not a registered model (models:/...), a run (runs:/...) "
            "or an existing checkpoint directory"
        )
    if not (directory / STATE_FILE).is_file() or not (directory / META_FILE).is_file():
        raise ModelSourceError(
            f"checkpoint directory '{directory}': needs {STATE_FILE} and {META_FILE}; "
            "point at a checkpoint_* folder of a training run"
        )
    meta = read_meta(directory)
    trained = validate_saved_config(meta["config"])  # the architecture and crop the weights were trained with
    model = build_model(trained.model, meta["num_classes"])
    load_weights(directory, model)
    num_classes = meta["num_classes"]
    candidates = (
        [split] if split else [name for name in SPLITS[::-1] if has_manifest(storage.join(config.data.root, name))]
    )
    if not candidates:  # nothing to name the classes by: predictions still show the indices
        class_names = [f"class {index}" for index in range(num_classes)]
    else:
        manifest = split_manifest(config, candidates[0])
        if manifest.num_classes != num_classes:
            raise ModelSourceError(class_count_mismatch(str(directory), num_classes, config, candidates[0], manifest))
        class_names = manifest.class_names()
    return InferenceModel(model.eval(), class_names, meta["model"], trained.data.eval_image_size)


def class_count_mismatch(source: str, num_classes: int, config: Config, split: str, manifest: Manifest) -> str:
    return (
        f"{source} predicts {num_classes} classes but {storage.join(config.data.root, split)} has "
        f"{manifest.num_classes}; use shards made from the same class list"
    )
