"""Held-out evaluation of a trained model: exact top-1 / top-5 on one split, beside the published figures.

    imagenet-pipeline evaluate --model models:/imagenet-classifier@champion --set data.root=data/shards
    imagenet-pipeline evaluate --model ray_results/r18-a/checkpoint_000004 --split val --no-log

A model comes from the MLflow registry (`models:/<name>@<alias>`, `models:/<name>/<version>`), from a run
(`runs:/<run_id>/model`) or from a Ray Train checkpoint directory (`state.pt` + `meta.json`). The split runs
once through the same loader as training (world size 1, every sample exactly once), so the figures are
directly comparable with the `val/top1` curve. Test results are logged back to the model's MLflow run.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import locations
from pipeline import metrics as m
from pipeline.checkpoints import META_FILE, STATE_FILE, load_weights, read_meta
from pipeline.config import Config, validate_config
from pipeline.loader import build_loader
from pipeline.manifest import MANIFEST_NAME, SPLITS, Manifest, has_manifest, read_manifest
from pipeline.models import HUMAN_TOP5_ERROR, PUBLISHED_TOP1_TOP5, build_model
from pipeline.tracking import resolve_tracking_uri
from pipeline.train_loop import Worker, evaluate

# models:/<name>@<alias> or models:/<name>/<version>; runs:/<run_id>/<artifact path>
_REGISTRY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_REGISTRY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUN_ARTIFACT = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)/(?P<path>.+)$")
IMAGENET_NUM_CLASSES = 1000


class InferenceModel(NamedTuple):
    model: torch.nn.Module  # in inference mode, on the CPU
    class_names: list[str]  # index -> human-readable name
    architecture: str  # a config.MODEL_NAMES entry
    eval_image_size: int  # the centre-crop side the model was evaluated (and, for pt2, exported) at


@dataclass
class EvaluationReport:
    source: str
    split: str
    architecture: str
    num_classes: int
    eval_image_size: int
    num_samples: int  # images scored (corrupt samples are not)
    corrupt_samples: int
    loss: float
    top1: float  # percent
    top5: float
    logged_to_run: str | None  # the MLflow run that received the test metrics, if any

    @property
    def top5_error(self) -> float:
        return 100.0 - self.top5

    def metrics(self) -> dict[str, float]:
        return {m.TEST_TOP1: self.top1, m.TEST_TOP5: self.top5, m.TEST_TOP5_ERROR: self.top5_error}


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


def evaluate_model(config: Config, source: str, split: str = "test", log_to_mlflow: bool = True) -> EvaluationReport:
    """Score `source` on `config.data.root/<split>` once, print the comparison table, log test metrics."""
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}: choose one of {', '.join(SPLITS)}")
    manifest = split_manifest(config, split)
    loaded = load_model_for_inference(source, config, split)
    if len(loaded.class_names) != manifest.num_classes:
        raise ValueError(_class_count_mismatch(source, len(loaded.class_names), config, split, manifest))
    # The model's own crop size: a pt2 graph accepts only the spatial size it was exported with.
    data = config.data.model_copy(update={"eval_image_size": loaded.eval_image_size})
    loader = build_loader(data, split, rank=0, world_size=1, batch_size=config.optim.batch_size, seed=config.seed)
    worker = Worker(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)
    results = evaluate(loaded.model, loader, worker, prefix=split)
    corrupt = int(results[f"{split}/corrupt_samples"])
    report = EvaluationReport(
        source=source, split=split, architecture=loaded.architecture, num_classes=manifest.num_classes,
        eval_image_size=loaded.eval_image_size, num_samples=manifest.num_samples - corrupt, corrupt_samples=corrupt,
        loss=results[f"{split}/loss"], top1=results[f"{split}/top1"], top5=results[f"{split}/top5"],
        logged_to_run=None,
    )
    if log_to_mlflow:
        report.logged_to_run = log_test_metrics(report, resolve_tracking_uri(config))
    print(format_report(report))
    return report


def log_test_metrics(report: EvaluationReport, tracking_uri: str) -> str | None:
    """Attach test/top1, test/top5 and test/top5_error to the run that logged the model; return its id.

    Only the held-out test split is logged: val figures already sit in the run as a per-epoch curve, which
    another point would distort. A checkpoint directory has no run to log to.
    """
    run_id = source_run_id(report.source, tracking_uri)
    if report.split != "test" or run_id is None:
        return None
    timestamp = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(run_id, metrics=[
        Metric(key, value, timestamp, 0) for key, value in report.metrics().items()
    ])
    return run_id


def format_report(report: EvaluationReport) -> str:
    """Our figures beside a human annotator's and the published ImageNet-1k ones for the architecture."""
    published = PUBLISHED_TOP1_TOP5.get(report.architecture)
    rows = [("", "top-1 %", "top-5 %", "top-5 error %"),
            (f"this model ({report.split})", f"{report.top1:.2f}", f"{report.top5:.2f}", f"{report.top5_error:.2f}"),
            ("human annotator (ILSVRC)", "-", "-", f"{HUMAN_TOP5_ERROR:.1f}")]
    if published:
        top1, top5 = published
        rows.append((f"published {report.architecture}", f"{top1:.2f}", f"{top5:.2f}", f"{100.0 - top5:.2f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"{report.source}: {report.architecture}, {report.num_classes} classes, {report.eval_image_size} px, "
        f"{report.num_samples} {report.split} images" + (f" ({report.corrupt_samples} corrupt, skipped)"
                                                          if report.corrupt_samples else ""),
        *("  ".join(cell.ljust(widths[0]) if column == 0 else cell.rjust(widths[column])
                    for column, cell in enumerate(row)) for row in rows),
    ]
    if report.num_classes != IMAGENET_NUM_CLASSES:
        lines.append(f"note: these {report.num_classes} classes are not ImageNet-1k; the reference rows are for "
                     "scale only, not a like-for-like comparison")
    if report.logged_to_run:
        lines.append(f"logged {', '.join(report.metrics())} to MLflow run {report.logged_to_run}")
    elif report.split != "test":
        lines.append(f"not logged to MLflow: only test-split results are (the run holds {report.split} per epoch)")
    return "\n".join(lines)


def load_model_for_inference(source: str, config: Config, split: str | None = None) -> InferenceModel:
    """The model behind `source`, ready for inference on the CPU, with its class names.

    MLflow models carry their class names, architecture and crop size in the logged model's metadata. A
    checkpoint carries its architecture and crop size in meta.json; its class names come from the manifest
    of `split` (default: the first of test, val, train) under `config.data.root`.
    """
    if source.startswith(("models:/", "runs:/")):
        return _load_mlflow_model(source, config)
    return _load_checkpoint_model(Path(source), config, split)


def source_run_id(source: str, tracking_uri: str) -> str | None:
    """The MLflow run that logged the model behind `source`; None for a checkpoint directory."""
    if match := _RUN_ARTIFACT.match(source):
        return match["run_id"]
    if source.startswith("models:/"):
        return _model_version(source, MlflowClient(tracking_uri), tracking_uri).run_id or None
    return None


def split_manifest(config: Config, split: str) -> Manifest:
    split_dir = locations.join(config.data.root, split)
    if not has_manifest(split_dir):
        raise ValueError(
            f"data.root = '{config.data.root}': no {split}/{MANIFEST_NAME}; shard the {split} split or point "
            "data.root at a folder holding it"
        )
    return read_manifest(split_dir)


def _load_mlflow_model(source: str, config: Config) -> InferenceModel:
    uri = resolve_tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if source.startswith("models:/"):
        _model_version(source, client, uri)  # a clear error before any download
    elif match := _RUN_ARTIFACT.match(source):
        try:
            client.get_run(match["run_id"])
        except MlflowException:
            raise ValueError(f"{source}: no MLflow run {match['run_id']} in {uri}") from None
    else:
        raise ValueError(f"{source}: expected runs:/<run_id>/<artifact path>")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch)
            metadata = mlflow.models.Model.load(local).metadata or {}
            # pt2 (torch.export) models load as a graph module; mlflow does not (cannot) call eval() on it.
            graph = mlflow.pytorch.load_model(local)
        except (MlflowException, OSError, RuntimeError) as error:
            raise ValueError(f"{source}: cannot load an MLflow PyTorch model ({str(error).splitlines()[0]})") from None
    missing = [key for key in ("classes", "architecture", "eval_image_size") if key not in metadata]
    if missing:
        raise ValueError(f"{source}: the logged model's metadata lacks {', '.join(missing)}; publish it with "
                         "pipeline.publish (imagenet-pipeline train)")
    model = FrozenEvalModule(graph) if _is_exported(graph) else graph.eval()
    return InferenceModel(model, list(metadata["classes"]), str(metadata["architecture"]),
                          int(metadata["eval_image_size"]))


def _is_exported(module: torch.nn.Module) -> bool:
    # ExportedProgram.module() replaces train/eval with methods that raise; an eager model keeps nn.Module's.
    return "train" in vars(module)


def _model_version(source: str, client: MlflowClient, uri: str):
    """The registry entry behind models:/<name>@<alias> or models:/<name>/<version>, or a one-line ValueError."""
    by_alias, by_version = _REGISTRY_ALIAS.match(source), _REGISTRY_VERSION.match(source)
    if not by_alias and not by_version:
        raise ValueError(f"{source}: expected models:/<name>@<alias> or models:/<name>/<version>")
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
        raise ValueError(f"{source}: no registered model '{name}' in {uri}") from None
    wanted = f"alias '{by_alias['alias']}'" if by_alias else f"version {by_version['version']}"
    raise ValueError(f"{source}: registered model '{name}' has no {wanted}")


def _load_checkpoint_model(directory: Path, config: Config, split: str | None) -> InferenceModel:
    if not directory.is_dir():
        raise ValueError(f"model source '{directory}': not a registered model (models:/...), a run (runs:/...) "
                         "or an existing checkpoint directory")
    if not (directory / STATE_FILE).is_file() or not (directory / META_FILE).is_file():
        raise ValueError(f"checkpoint directory '{directory}': needs {STATE_FILE} and {META_FILE}; "
                         "point at a checkpoint_* folder of a training run")
    meta = read_meta(directory)
    trained = validate_config(meta["config"])  # the architecture and crop the weights were trained with
    model = build_model(trained.model, meta["num_classes"])
    load_weights(directory, model)
    num_classes = meta["num_classes"]
    candidates = [split] if split else [name for name in SPLITS[::-1]
                                        if has_manifest(locations.join(config.data.root, name))]
    if not candidates:  # nothing to name the classes by: predictions still show the indices
        class_names = [f"class {index}" for index in range(num_classes)]
    else:
        manifest = split_manifest(config, candidates[0])
        if manifest.num_classes != num_classes:
            raise ValueError(_class_count_mismatch(str(directory), num_classes, config, candidates[0], manifest))
        class_names = manifest.class_names()
    return InferenceModel(model.eval(), class_names, meta["model"], trained.data.eval_image_size)


def _class_count_mismatch(source: str, num_classes: int, config: Config, split: str, manifest: Manifest) -> str:
    return (f"{source} predicts {num_classes} classes but {locations.join(config.data.root, split)} has "
            f"{manifest.num_classes}; use shards made from the same class list")
