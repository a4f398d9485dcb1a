"""Image search with a trained model: the gallery images nearest to each query image.

    imagenet-pipeline retrieve photos/cat.jpg --index embeddings/imagenet-classifier-v3/train --top-k 10
    imagenet-pipeline retrieve photos/ --index 3f2a...c1 --json          # an embed run's id in MLflow
    imagenet-pipeline retrieve photos/ --index ... --sheet sheet.png    # query beside its neighbours
    imagenet-pipeline retrieve photos/ --index embeddings/<checkpoint>/val --model <checkpoint folder>

The query images go through the model the gallery was embedded with, and a gallery can come from someone else
(an MLflow run id), so its meta.json never chooses what gets loaded on its own. Without `--model`, the gallery's
model is followed only when meta.json names a pinned version of the configured registered model,
`models:/<tracking.registered_model>/<version>`; a gallery embedded from a run (`runs:/...`), a checkpoint folder
or another registered name is queried only when `--model` names that same model (an alias is pinned to its
version first), and anything else is refused in one line before any gallery file, index or model is read. A
`--model` that pins to another model, or features of another width, are refused before any image is read.
The gallery's files are checked against each other as they load (`store.read_rows`, `index.load_index`). Every
query must decode; a file that is not an image is named in a one-line error.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.transforms import CorruptImageError, EvalTransform, normalize_batch
from pipeline.errors import DataError, ModelSourceError
from pipeline.features import store
from pipeline.features.extract import feature_spec, with_features
from pipeline.features.index import INDEX_FILE, load_index, search
from pipeline.inference.loading import load_model_for_inference, pin_model_source
from pipeline.inference.predict import PREDICT_BATCH_SIZE, find_images

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class Neighbour:
    rank: int
    row: int  # row in the gallery's embeddings
    key: str
    label: int
    class_name: str
    similarity: float  # cosine
    shard: int
    index_in_shard: int


@dataclass
class QueryResult:
    path: Path
    predicted: str  # the model's top-1 class for the query
    known_class: str | None  # from an ImageNet-style parent folder (n01440764/...), when it names a class
    neighbours: list[Neighbour] = field(default_factory=list)

    @property
    def reference_class(self) -> str:
        """What a neighbour's class is compared with: the known class, else the model's prediction."""
        return self.known_class or self.predicted


@dataclass
class Gallery:
    directory: Path
    meta: store.EmbeddingMeta
    model_source: str  # what queries are embedded with: the gallery's own model, allowed by `query_model`
    labels: np.ndarray
    positions: np.ndarray
    keys: list[str]
    index: object  # a faiss index


def open_gallery(reference: str, config: Config, model_source: str | None = None) -> Gallery:
    """An embed output folder, or the id of the MLflow run that logged one (downloaded once, then reused).
    `model_source`: the user's --model, needed for a gallery not embedded from the configured registered model."""
    directory = Path(reference)
    if not directory.is_dir():
        if not _RUN_ID.match(reference):
            raise DataError(f"--index {reference!r}: not an embedding folder nor an MLflow run id")
        from pipeline.retrieval.logged import download_index

        directory = download_index(config, reference)
    meta = store.read_meta(directory)
    source = query_model(meta, directory, config, model_source)  # before any other file is read
    _, labels, positions, keys = store.read_rows(directory, meta)
    index = load_index(directory / INDEX_FILE, meta.dim, np.flatnonzero(labels >= 0), meta.index_sha256)
    return Gallery(directory, meta, source, labels, positions, keys, index)


def query_model(meta: store.EmbeddingMeta, directory: Path, config: Config, model_source: str | None) -> str:
    """The model source to embed queries with: the gallery's own, if meta.json's reference may be followed."""
    recorded = repr(meta.model_source[:200])  # from a file: quoted, so it stays one line
    if model_source is not None:
        if pin_model_source(model_source, config).source != meta.model_source:
            raise ModelSourceError(
                f"--model {model_source}: the gallery {directory} was embedded with {recorded}; "
                "query with that model or embed again"
            )
        return meta.model_source
    name = config.tracking.registered_model
    pinned = re.fullmatch(rf"models:/{re.escape(name)}/([0-9]+)", meta.model_source)
    if pinned is None or meta.model_version != pinned[1]:
        raise ModelSourceError(
            f"{directory / store.META_FILE}: model {recorded} is not a version of the registered "
            f"model '{name}' (models:/{name}/<version>); pass --model naming it to query anyway"
        )
    return meta.model_source


def retrieve(config: Config, inputs: list[Path], gallery: Gallery, top_k: int = 10) -> list[QueryResult]:
    files = find_images(inputs)
    meta = gallery.meta
    loaded = load_model_for_inference(gallery.model_source, config, meta.split)
    spec = feature_spec(loaded.architecture, loaded.model)
    if spec.dim != meta.dim or spec.layer != meta.layer:
        raise ModelSourceError(
            f"{gallery.model_source}: {spec.layer} features of width {spec.dim}, but the "
            f"gallery holds {meta.layer} features of width {meta.dim}"
        )
    if len(loaded.class_names) != len(meta.class_names):
        raise ModelSourceError(
            f"{gallery.model_source}: predicts {len(loaded.class_names)} classes, but the gallery "
            f"{gallery.directory} names {len(meta.class_names)}"
        )
    transform = EvalTransform(loaded.eval_image_size, config.data.eval_crop_ratio, config.data.max_image_pixels)
    images = []
    for path in files:  # all decoded before any search: a bad query is one error, not a partial answer
        try:
            images.append(transform(path.read_bytes()))
        except (CorruptImageError, OSError) as error:
            raise DataError(f"query {path}: not a readable image ({error})") from None
    net = with_features(loaded.model)
    names = meta.class_names
    results = []
    for start in range(0, len(files), PREDICT_BATCH_SIZE):
        batch = torch.stack(images[start : start + PREDICT_BATCH_SIZE])
        with torch.inference_mode():
            logits, features = net(normalize_batch(batch, "cpu"))
        similarity, rows = search(gallery.index, features.numpy(), top_k)
        for offset, path in enumerate(files[start : start + PREDICT_BATCH_SIZE]):
            result = QueryResult(path, names[int(logits[offset].argmax())], _folder_class(path, config, names))
            for rank, (score, row) in enumerate(zip(similarity[offset], rows[offset]), start=1):
                if row < 0:  # faiss pads with -1 when the gallery holds fewer than k items
                    continue
                label = int(gallery.labels[row])
                shard, index_in_shard = (int(value) for value in gallery.positions[row])
                result.neighbours.append(
                    Neighbour(
                        rank, int(row), gallery.keys[row], label, names[label], float(score), shard, index_in_shard
                    )
                )
            results.append(result)
    return results


def _folder_class(path: Path, config: Config, names: list[str]) -> str | None:
    """ImageNet's layout names the class by its wnid folder; map it through a local manifest when one matches."""
    if not _WNID.match(path.parent.name):
        return None
    from pipeline.inference.predict import class_wnids

    wnids = class_wnids(config, names)
    return names[wnids.index(path.parent.name)] if path.parent.name in wnids else None


def format_results(results: list[QueryResult], as_json: bool = False) -> str:
    """JSON (a list of {path, predicted, known_class, neighbours: [...]}) or one block per query."""
    if as_json:
        return json.dumps([{**asdict(result), "path": str(result.path)} for result in results], indent=1)
    lines = []
    for result in results:
        known = f", folder class {result.known_class}" if result.known_class else ""
        lines.append(f"{result.path}  (model: {result.predicted}{known})")
        for neighbour in result.neighbours:
            mark = " " if neighbour.class_name == result.reference_class else "x"
            lines.append(
                f"  {neighbour.rank:2d}. {neighbour.similarity:6.3f} {mark} {neighbour.class_name}  [{neighbour.key}]"
            )
    lines.append(f"{len(results)} queries; x: a neighbour of another class than the query's")
    return "\n".join(lines)
