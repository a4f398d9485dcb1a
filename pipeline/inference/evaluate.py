"""Held-out evaluation of a trained model: exact top-1 / top-5 on one split, beside the published figures.

    imagenet-pipeline evaluate --model models:/imagenet-classifier@champion --set data.root=data/shards
    imagenet-pipeline evaluate --model ray_results/r18-a/checkpoint_000004 --split val --no-log

The model comes from `pipeline.inference.loading` (registry, run or checkpoint). The split runs once through the
same loader and evaluation step as training (world size 1, every sample exactly once), so the figures are
directly comparable with the `val/top1` curve. Test results are logged back to the model's MLflow run. MLflow is
imported only when a model is loaded from it or a result is logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline import metrics as m
from pipeline.config import Config
from pipeline.data.loader import build_loader
from pipeline.data.manifest import SPLITS
from pipeline.errors import ConfigError, ModelSourceError
from pipeline.inference.loading import class_count_mismatch, load_model_for_inference, source_run_id, split_manifest
from pipeline.tracking.uri import resolve_tracking_uri
from pipeline.train.models import HUMAN_TOP5_ERROR, PUBLISHED_TOP1_TOP5
from pipeline.train.step import RankDevice, evaluate

IMAGENET_NUM_CLASSES = 1000


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


def evaluate_model(config: Config, source: str, split: str = "test", log_to_mlflow: bool = True) -> EvaluationReport:
    """Score `source` on `config.data.root/<split>` once, print the comparison table, log test metrics."""
    if split not in SPLITS:
        raise ConfigError(f"split = {split!r}: choose one of {', '.join(SPLITS)}")
    manifest = split_manifest(config, split)
    loaded = load_model_for_inference(source, config, split)
    if len(loaded.class_names) != manifest.num_classes:
        raise ModelSourceError(class_count_mismatch(source, len(loaded.class_names), config, split, manifest))
    # The model's own crop size: a pt2 graph accepts only the spatial size it was exported with.
    data = config.data.model_copy(update={"eval_image_size": loaded.eval_image_size})
    loader = build_loader(data, split, rank=0, world_size=1, batch_size=config.optim.batch_size, seed=config.seed)
    rank = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)
    results = evaluate(loaded.model, loader, rank, prefix=split)
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
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

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


