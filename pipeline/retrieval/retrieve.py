"""Image search with a trained model: the gallery images nearest to each query image.

    imagenet-pipeline retrieve photos/cat.jpg --index embeddings/imagenet-classifier-v3/train --top-k 10
    imagenet-pipeline retrieve photos/ --index 3f2a...c1 --json          # an embed run's id in MLflow
    imagenet-pipeline retrieve photos/ --index ... --sheet sheet.png    # query beside its neighbours

The query images go through the model the gallery was embedded with (its pinned registry version): any other
model, or one whose features have another width, is refused before any image is read. Every query must decode;
a file that is not an image is named in a one-line error.
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
from pipeline.inference.loading import load_model_for_inference, pin_model_source
from pipeline.inference.predict import PREDICT_BATCH_SIZE, find_images
from pipeline.retrieval import store
from pipeline.retrieval.features import feature_spec, with_features
from pipeline.retrieval.index import INDEX_FILE, load_index, search

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
    labels: np.ndarray
    positions: np.ndarray
    keys: list[str]
    index: object  # a faiss index


def open_gallery(reference: str, config: Config) -> Gallery:
    """An embed output folder, or the id of the MLflow run that logged one (downloaded once, then reused)."""
    directory = Path(reference)
    if not directory.is_dir():
        if not _RUN_ID.match(reference):
            raise DataError(f"--index {reference!r}: not an embedding folder nor an MLflow run id")
        from pipeline.retrieval.logged import download_index

        directory = download_index(config, reference)
    meta, labels, positions, keys = store.read_rows(directory)
    if labels.shape != (meta.num_samples,) or positions.shape != (meta.num_samples, 2) or len(keys) != meta.num_samples:
        raise DataError(f"{directory}: labels, positions and keys do not match meta.json's {meta.num_samples} samples")
    index = load_index(directory / INDEX_FILE, meta.dim, int((labels >= 0).sum()))
    return Gallery(directory, meta, labels, positions, keys, index)


def retrieve(config: Config, inputs: list[Path], gallery: Gallery, top_k: int = 10,
             model_source: str | None = None) -> list[QueryResult]:
    files = find_images(inputs)
    meta = gallery.meta
    if model_source is not None and pin_model_source(model_source, config).source != meta.model_source:
        raise ModelSourceError(f"--model {model_source}: the gallery {gallery.directory} was embedded with "
                               f"{meta.model_source}; query with that model (omit --model) or embed again")
    loaded = load_model_for_inference(meta.model_source, config, meta.split)
    spec = feature_spec(loaded.architecture, loaded.model)
    if spec.dim != meta.dim or spec.layer != meta.layer:
        raise ModelSourceError(f"{meta.model_source}: {spec.layer} features of width {spec.dim}, but the gallery "
                               f"holds {meta.layer} features of width {meta.dim}")
    transform = EvalTransform(loaded.eval_image_size, config.data.eval_crop_ratio)
    images = []
    for path in files:  # all decoded before any search: a bad query is one error, not a partial answer
        try:
            images.append(transform(path.read_bytes()))
        except (CorruptImageError, OSError) as error:
            raise DataError(f"query {path}: not a readable image ({error})") from None
    net = with_features(loaded.model)
    names = meta.class_names or loaded.class_names
    results = []
    for start in range(0, len(files), PREDICT_BATCH_SIZE):
        batch = torch.stack(images[start:start + PREDICT_BATCH_SIZE])
        with torch.inference_mode():
            logits, features = net(normalize_batch(batch, "cpu"))
        similarity, rows = search(gallery.index, features.numpy(), top_k)
        for offset, path in enumerate(files[start:start + PREDICT_BATCH_SIZE]):
            result = QueryResult(path, names[int(logits[offset].argmax())], _folder_class(path, config, names))
            for rank, (score, row) in enumerate(zip(similarity[offset], rows[offset]), start=1):
                if row < 0:  # faiss pads with -1 when the gallery holds fewer than k items
                    continue
                label = int(gallery.labels[row])
                shard, index_in_shard = (int(value) for value in gallery.positions[row])
                result.neighbours.append(Neighbour(rank, int(row), gallery.keys[row], label, names[label],
                                                   float(score), shard, index_in_shard))
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
            lines.append(f"  {neighbour.rank:2d}. {neighbour.similarity:6.3f} {mark} {neighbour.class_name}  "
                         f"[{neighbour.key}]")
    lines.append(f"{len(results)} queries; x: a neighbour of another class than the query's")
    return "\n".join(lines)
