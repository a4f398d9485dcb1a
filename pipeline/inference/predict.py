"""Classify image files with a trained model: top-k classes with probabilities, as a table or JSON.

    imagenet-pipeline predict --model models:/imagenet-classifier@champion photos/ cat.jpg
    imagenet-pipeline predict --model ray_results/r18-a/checkpoint_000004 --top-k 3 --json photos/

Folders are searched recursively for .jpg, .jpeg and .png files (any case); files named explicitly are read
whatever their suffix. Each image gets the evaluation preprocessing the model was scored with (shorter-side
resize, centre crop at the model's crop size). A file that cannot be decoded (not JPEG, PNG or WebP, damaged, or
declaring more than data.max_image_pixels, which is refused from its header) is reported in its row and the
others are still classified.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.data.manifest import SPLITS, has_manifest, read_manifest
from pipeline.data.transforms import CorruptImageError, EvalTransform, normalize_batch
from pipeline.errors import ConfigError, DataError
from pipeline.inference.loading import load_model_for_inference

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Images decoded and scored together: bounds memory (batch x 3 x size^2 bytes before normalising).
PREDICT_BATCH_SIZE = 32


@dataclass
class ClassScore:
    index: int
    wnid: str | None  # ImageNet synset id, when a local manifest names the model's classes
    name: str
    probability: float  # softmax over all classes


@dataclass
class Prediction:
    path: Path
    top: list[ClassScore] = field(default_factory=list)  # most probable first
    error: str | None = None  # why the file could not be classified; `top` is then empty


def predict(config: Config, source: str, inputs: list[Path], top_k: int = 5) -> list[Prediction]:
    """Top-`top_k` classes for every image file in `inputs` (files or folders), in input order."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k = {top_k!r}: must be a whole number >= 1")
    files = find_images(inputs)
    loaded = load_model_for_inference(source, config)
    wnids = class_wnids(config, loaded.class_names)
    # JPEG, PNG or WebP, refused from the header above data.max_image_pixels (the file's row says so).
    transform = EvalTransform(loaded.eval_image_size, config.data.eval_crop_ratio, config.data.max_image_pixels)
    k = min(top_k, len(loaded.class_names))
    predictions = [Prediction(path) for path in files]
    for start in range(0, len(predictions), PREDICT_BATCH_SIZE):
        chunk = predictions[start : start + PREDICT_BATCH_SIZE]
        images, readable = [], []
        for prediction in chunk:
            try:
                images.append(transform(prediction.path.read_bytes()))
                readable.append(prediction)
            except (CorruptImageError, OSError) as error:
                prediction.error = str(error)
        if not images:
            continue
        with torch.no_grad():
            logits = loaded.model(normalize_batch(torch.stack(images), "cpu")).float()
        probabilities, indices = logits.softmax(dim=1).topk(k, dim=1)
        for prediction, row_probabilities, row_indices in zip(readable, probabilities.tolist(), indices.tolist()):
            prediction.top = [
                ClassScore(index, wnids[index], loaded.class_names[index], probability)
                for index, probability in zip(row_indices, row_probabilities)
            ]
    return predictions


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded recursively (sorted) to their image files."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files.extend(
                sorted(child for child in path.rglob("*") if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input '{path}': no such file or folder")
    if not files:
        named = ", ".join(map(str, inputs)) or "the inputs"
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {named}")
    return files


def class_wnids(config: Config, class_names: list[str]) -> list[str | None]:
    """wnids from a manifest under data.root whose class list is the model's; None where none matches."""
    for split in SPLITS:
        split_dir = storage.join(config.data.root, split)
        if has_manifest(split_dir):
            manifest = read_manifest(split_dir)
            if manifest.class_names() == class_names:
                return [info.wnid for info in sorted(manifest.classes, key=lambda info: info.index)]
    return [None] * len(class_names)


def format_predictions(predictions: list[Prediction], as_json: bool = False) -> str:
    """JSON (a list of {path, error, top: [{index, wnid, name, probability}]}) or one block per file."""
    if as_json:
        return json.dumps(
            [{**asdict(prediction), "path": str(prediction.path)} for prediction in predictions], indent=1
        )
    lines = []
    for prediction in predictions:
        lines.append(str(prediction.path))
        if prediction.error:
            lines.append(f"  error: {prediction.error}")
        for rank, score in enumerate(prediction.top, start=1):
            wnid = f" ({score.wnid})" if score.wnid else ""
            lines.append(f"  {rank}. {100.0 * score.probability:6.2f} %  [{score.index}] {score.name}{wnid}")
    failed = sum(prediction.error is not None for prediction in predictions)
    lines.append(f"{len(predictions) - failed} classified, {failed} unreadable")
    return "\n".join(lines)
