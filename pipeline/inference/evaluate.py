"""Held-out evaluation of a trained model: exact top-1 / top-5 on one split, beside the published figures.

    imagenet-pipeline evaluate --model models:/imagenet-classifier@champion --set data.root=data/shards
    imagenet-pipeline evaluate --model ray_results/r18-a/checkpoint_000004 --split val --no-log

The model comes from `pipeline.inference.loading` (registry, run or checkpoint). The split runs once through the
same loader and evaluation step as training (world size 1, every sample exactly once), so the figures are
directly comparable with the `val/top1` curve. Test results are logged back to the model's MLflow run, beside
its test-once record (both by `pipeline.tracking.heldout.record_test_results`). MLflow is imported only when a
model is loaded from it or a result is logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import metrics as m
from pipeline import storage
from pipeline.architectures import HUMAN_TOP5_ERROR, PUBLISHED_TOP1_TOP5
from pipeline.config import Config
from pipeline.data.loader import build_loader
from pipeline.data.manifest import SPLITS
from pipeline.errors import ConfigError, DataError, ModelSourceError
from pipeline.features.extract import embed_pass, feature_spec, with_features
from pipeline.features.quality import RECALL_AT, knn_top1, nearest, retrieval_metrics
from pipeline.inference.loading import class_count_mismatch, load_model_for_inference, split_manifest
from pipeline.tracking.uri import resolve_tracking_uri
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
    features: FeatureQuality | None = None  # None: not measured (--no-retrieval)
    recorded: str | None = None  # where the test-once record was written (pipeline.tracking.heldout), if anywhere

    @property
    def top5_error(self) -> float:
        return 100.0 - self.top5

    def metrics(self) -> dict[str, float]:
        scores = {m.TEST_TOP1: self.top1, m.TEST_TOP5: self.top5, m.TEST_TOP5_ERROR: self.top5_error}
        if self.features is not None:
            scores.update(self.features.metrics())
        return scores


@dataclass
class FeatureQuality:
    """How well the model's features retrieve and classify without retraining (pipeline.features.quality)."""

    layer: str
    dim: int
    within_split: dict[str, float]  # recall_at_k, map_at_r: leave-one-out within the evaluated split
    knn_top1: float | None  # train split as the gallery; None when evaluating train itself
    knn_k: int
    gallery: str  # where the train gallery came from: an embed output folder, or "embedded now"

    def metrics(self) -> dict[str, float]:
        scores = {m.TEST_MAP_AT_R: self.within_split["map_at_r"]}
        scores.update({m.TEST_RECALL_AT.format(k=k): self.within_split[f"recall_at_{k}"] for k in RECALL_AT})
        if self.knn_top1 is not None:
            scores[m.TEST_KNN_TOP1] = self.knn_top1
        return scores


def evaluate_model(
    config: Config,
    source: str,
    split: str = "test",
    log_to_mlflow: bool = True,
    retrieval: bool = True,
    again_reason: str | None = None,
) -> EvaluationReport:
    """Score `source` on `config.data.root/<split>` once, print the comparison table, log test metrics.

    `retrieval`: also measure the features from the same pass: recall@k and mAP@R within the split, and k-NN
    top-1 against the train split (an `embed` output of the same model and data is reused; else train is
    embedded here, one extra pass over it).

    On test, a registered (or run-logged) model is evaluated once: a second evaluation is refused before any work
    unless `again_reason` says why (pipeline.tracking.heldout); the evaluation is recorded on the model either way,
    also with `log_to_mlflow` off (which only keeps the metrics out of the run)."""
    if split not in SPLITS:
        raise ConfigError(f"split = {split!r}: choose one of {', '.join(SPLITS)}")
    if again_reason is not None and split != "test":
        raise ConfigError(
            f"--again --reason is for the test split, which is read once per model; {split} may be "
            "evaluated as often as needed"
        )
    manifest = split_manifest(config, split)
    loaded = load_model_for_inference(source, config, split)  # an unknown source fails here, in one line
    if len(loaded.class_names) != manifest.num_classes:
        raise ModelSourceError(class_count_mismatch(source, len(loaded.class_names), config, split, manifest))
    place = record_place(config, source) if split == "test" else None
    claim = None
    if place is not None:  # before the pass: a refused evaluation reads no test image
        from pipeline.tracking.heldout import claim_test_evaluation

        claim = claim_test_evaluation(resolve_tracking_uri(config), place, again_reason)
    try:
        return _score(config, source, split, manifest, loaded, log_to_mlflow, retrieval, claim)
    except BaseException:
        if claim is not None:
            from pipeline.tracking.heldout import release_claim

            release_claim(resolve_tracking_uri(config), claim)
        raise


def _score(
    config: Config, source: str, split: str, manifest, loaded, log_to_mlflow: bool, retrieval: bool, claim
) -> EvaluationReport:
    # The model's own crop size: a pt2 graph accepts only the spatial size it was exported with.
    data = config.data.model_copy(update={"eval_image_size": loaded.eval_image_size})
    loader = build_loader(data, split, rank=0, world_size=1, batch_size=config.optim.batch_size, seed=config.seed)
    rank = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)
    net = with_features(loaded.model) if retrieval else loaded.model
    collected: list = []
    results = evaluate(net, loader, rank, prefix=split, features=collected)
    corrupt = int(results[f"{split}/corrupt_samples"])
    report = EvaluationReport(
        source=source,
        split=split,
        architecture=loaded.architecture,
        num_classes=manifest.num_classes,
        eval_image_size=loaded.eval_image_size,
        num_samples=manifest.num_samples - corrupt,
        corrupt_samples=corrupt,
        loss=results[f"{split}/loss"],
        top1=results[f"{split}/top1"],
        top5=results[f"{split}/top5"],
        logged_to_run=None,
    )
    if retrieval:
        report.features = feature_quality(config, source, split, loaded, net, collected, data)
    if claim is not None:  # a test evaluation of a model MLflow knows: its results go to MLflow, once
        from pipeline.tracking.heldout import record_test_results

        results = record_test_results(
            resolve_tracking_uri(config),
            claim,
            report.metrics(),
            manifest,
            storage.join(config.data.root, "test"),
            report.num_samples,
            log_to_run=log_to_mlflow,
        )
        report.logged_to_run = results.logged_to_run
        report.recorded = f"{claim.place.label} tag {results.record_tag}"
    print(format_report(report))
    return report


def record_place(config: Config, source: str):
    """Where `source`'s test-once record lives: its registry version and its run; None for a checkpoint."""
    from pipeline.inference.loading import pin_model_source
    from pipeline.tracking.heldout import ModelRecordPlace

    pinned = pin_model_source(source, config)
    if pinned.version is not None:
        name = pinned.source.removeprefix("models:/").rsplit("/", 1)[0]
        return ModelRecordPlace(pinned.source, run_id=pinned.run_id, name=name, version=pinned.version)
    if pinned.run_id is not None:
        return ModelRecordPlace(pinned.source, run_id=pinned.run_id)
    return None


def feature_quality(config: Config, source: str, split: str, loaded, net, collected: list, data) -> FeatureQuality:
    features = torch.cat([pair[0] for pair in collected])
    labels = torch.cat([pair[1] for pair in collected])
    spec = feature_spec(loaded.architecture, net)  # the wrapper: an exported graph was given a new output
    within = retrieval_metrics(features, labels)
    knn, gallery_source = None, "-"
    if split != "train":
        gallery, gallery_labels, gallery_source = train_gallery(config, source, net, data)
        neighbours = nearest(features, gallery, config.retrieval.knn_k)
        knn = knn_top1(
            neighbours,
            gallery_labels,
            labels,
            len(loaded.class_names),
            config.retrieval.knn_k,
            config.retrieval.knn_temperature,
        )
    return FeatureQuality(spec.layer, spec.dim, within, knn, config.retrieval.knn_k, gallery_source)


def train_gallery(config: Config, source: str, net, data) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The train split's features: an `embed` output of this model version and these shards, else embedded now."""
    from pipeline.features import store
    from pipeline.inference.loading import pin_model_source

    pinned = pin_model_source(source, config)
    directory = store.default_output(config.retrieval.output, pinned.source, pinned.version, "train")
    manifest = split_manifest(config, "train")
    if (directory / store.META_FILE).is_file():
        try:
            meta = store.read_meta(directory)
            if meta.model_source == pinned.source and meta.manifest_hash == manifest.content_hash():
                embedded = store.read_embeddings(directory)
                readable = embedded.readable
                return (
                    torch.from_numpy(np.asarray(embedded.vectors[readable])),
                    torch.from_numpy(embedded.labels[readable]),
                    str(directory),
                )
        except DataError as error:  # an older format or a damaged gallery: embed now, say why once
            print(f"note: not reusing the gallery in {directory} ({error}); embedding train now")
    loader = build_loader(
        data, "train", rank=0, world_size=1, batch_size=config.optim.batch_size, seed=config.seed, exactly_once=True
    )
    gallery, labels = embed_pass(net, loader, torch.device("cpu"))
    return gallery, labels, "embedded now (run `imagenet-pipeline embed --split train` once to reuse it)"


def format_report(report: EvaluationReport) -> str:
    """Our figures beside a human annotator's and the published ImageNet-1k ones for the architecture."""
    published = PUBLISHED_TOP1_TOP5.get(report.architecture)
    rows = [
        ("", "top-1 %", "top-5 %", "top-5 error %"),
        (f"this model ({report.split})", f"{report.top1:.2f}", f"{report.top5:.2f}", f"{report.top5_error:.2f}"),
        ("human annotator (ILSVRC)", "-", "-", f"{HUMAN_TOP5_ERROR:.1f}"),
    ]
    if published:
        top1, top5 = published
        rows.append((f"published {report.architecture}", f"{top1:.2f}", f"{top5:.2f}", f"{100.0 - top5:.2f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"{report.source}: {report.architecture}, {report.num_classes} classes, {report.eval_image_size} px, "
        f"{report.num_samples} {report.split} images"
        + (f" ({report.corrupt_samples} corrupt, skipped)" if report.corrupt_samples else ""),
        *(
            "  ".join(
                cell.ljust(widths[0]) if column == 0 else cell.rjust(widths[column]) for column, cell in enumerate(row)
            )
            for row in rows
        ),
    ]
    if report.features is not None:
        quality, within = report.features, report.features.within_split
        recalls = "/".join(f"{within[f'recall_at_{k}']:.1f}" for k in RECALL_AT)
        knn = (
            f"k-NN top-1 {quality.knn_top1:.2f} % (k = {quality.knn_k}, train gallery: {quality.gallery}); "
            if quality.knn_top1 is not None
            else ""
        )
        lines.append(
            f"features ({quality.layer}, {quality.dim}-d): {knn}recall@{'/'.join(map(str, RECALL_AT))} "
            f"{recalls} %, mAP@R {within['map_at_r']:.2f} % (leave-one-out within {report.split})"
        )
    if report.num_classes != IMAGENET_NUM_CLASSES:
        lines.append(
            f"note: these {report.num_classes} classes are not ImageNet-1k; the reference rows are for "
            "scale only, not a like-for-like comparison"
        )
    if report.logged_to_run:
        lines.append(f"logged {', '.join(report.metrics())} to MLflow run {report.logged_to_run}")
    if report.recorded:
        lines.append(f"test evaluation recorded on {report.recorded}: a second one is refused without --again --reason")
    elif report.split == "test":
        lines.append("note: a checkpoint folder keeps no test-once record; evaluate its registered version instead")
    elif report.split != "test":
        lines.append(f"not logged to MLflow: only test-split results are (the run holds {report.split} per epoch)")
    return "\n".join(lines)
