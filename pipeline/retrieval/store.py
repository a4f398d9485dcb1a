"""Embeddings of one split on disk, and the faiss gallery index built from them.

    DIR/meta.json        what they are: model (pinned version), feature layer and width, split, manifest hash
    DIR/embeddings.npy   float32 (samples, dim), unit rows; zero rows for samples that could not be read
    DIR/labels.npy       int64 (samples,), -1 where unreadable
    DIR/positions.npy    int64 (samples, 2): (manifest shard index, sample index in that shard)
    DIR/keys.json        webdataset __key__ per sample
    DIR/index.faiss      the gallery index over the readable rows (`pipeline.retrieval.index`)

Rows follow the manifest order (shard by shard), so row i is the same sample on every re-run. A folder is written
next to its destination and renamed into place, so a reader sees a complete output or none. What is read back
is data: no pickle (`allow_pickle=False`), shapes and types checked against meta.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import DataError

META_FILE = "meta.json"
EMBEDDINGS_FILE = "embeddings.npy"
LABELS_FILE = "labels.npy"
POSITIONS_FILE = "positions.npy"
KEYS_FILE = "keys.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EmbeddingMeta:
    model_source: str  # pinned: models:/<name>/<version>, runs:/... or a checkpoint folder
    model_version: str | None  # registry version, when the model came from the registry
    model_run_id: str | None  # the MLflow run that logged the model
    architecture: str
    layer: str
    dim: int
    split: str
    data_root: str
    manifest_hash: str
    num_samples: int
    unreadable: int
    class_names: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    def same_inputs(self, other: "EmbeddingMeta") -> bool:
        """Would embedding again give the same rows? (Same model version, layer, split and data.)"""
        keys = ("model_source", "architecture", "layer", "dim", "split", "manifest_hash", "format_version")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


@dataclass
class Embeddings:
    meta: EmbeddingMeta
    vectors: np.ndarray  # float32 (samples, dim)
    labels: np.ndarray  # int64 (samples,)
    positions: np.ndarray  # int64 (samples, 2)
    keys: list[str]

    @property
    def readable(self) -> np.ndarray:
        return self.labels >= 0


def default_output(output_root: str, source: str, version: str | None, split: str) -> Path:
    """<retrieval.output>/<model>-v<version>/<split> for a pinned registry source; a checkpoint or run source gets
    a folder name made from its path."""
    if version is not None:
        name = f"{source.removeprefix('models:/').split('/')[0]}-v{version}"
    else:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.strip("/")).strip("_")[-96:]
    return storage.require_local(output_root, "retrieval.output") / name / split


@contextmanager
def staged(directory: str | os.PathLike) -> Iterator[Path]:
    """A sibling temporary folder to fill; swapped in for `directory` when the block ends without an error
    (meta.json, written last, marks it complete), removed otherwise. Readers never see a half-written output."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if not (staging / META_FILE).is_file():
            raise AssertionError("a staged embedding folder must be given its meta.json last")
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_arrays(folder: Path, labels: np.ndarray, positions: np.ndarray, keys: list[str]) -> None:
    np.save(folder / LABELS_FILE, labels.astype(np.int64, copy=False))
    np.save(folder / POSITIONS_FILE, positions.astype(np.int64, copy=False))
    (folder / KEYS_FILE).write_text(json.dumps(keys))


def write_meta(folder: Path, meta: EmbeddingMeta) -> None:
    (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=1))


def write_embeddings(directory: str | os.PathLike, embeddings: Embeddings) -> Path:
    _check_shapes(embeddings, str(directory))
    with staged(directory) as folder:
        np.save(folder / EMBEDDINGS_FILE, embeddings.vectors.astype(np.float32, copy=False))
        write_arrays(folder, embeddings.labels, embeddings.positions, embeddings.keys)
        write_meta(folder, embeddings.meta)
    return Path(directory)


def read_meta(directory: str | os.PathLike) -> EmbeddingMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{directory}: no {META_FILE}; not a complete embedding (run `imagenet-pipeline embed`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        meta = EmbeddingMeta(**raw)
        _check_meta_types(meta)
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not an embedding description ({str(error).splitlines()[0]})") from None
    if meta.format_version != FORMAT_VERSION:
        raise DataError(f"{path}: format version {meta.format_version}, this pipeline reads {FORMAT_VERSION}; "
                        "embed the split again")
    return meta


def read_rows(directory: str | os.PathLike) -> tuple[EmbeddingMeta, np.ndarray, np.ndarray, list[str]]:
    """meta, labels, positions and keys: what a gallery needs besides its index (an embed run in MLflow carries
    these and the index, not embeddings.npy)."""
    meta = read_meta(directory)
    folder = Path(directory)
    try:
        labels = np.load(folder / LABELS_FILE, allow_pickle=False)
        positions = np.load(folder / POSITIONS_FILE, allow_pickle=False)
        keys = json.loads((folder / KEYS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{directory}: unreadable embedding files ({str(error).splitlines()[0]})") from None
    return meta, labels, positions, keys


def read_embeddings(directory: str | os.PathLike, mmap: bool = True) -> Embeddings:
    meta, labels, positions, keys = read_rows(directory)
    try:
        vectors = np.load(Path(directory) / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{directory}: unreadable embedding files ({str(error).splitlines()[0]})") from None
    embeddings = Embeddings(meta, vectors, labels, positions, keys)
    _check_shapes(embeddings, str(directory))
    return embeddings


def _check_meta_types(meta: EmbeddingMeta) -> None:
    expected: dict[str, Any] = {"model_source": str, "architecture": str, "layer": str, "dim": int, "split": str,
                                "data_root": str, "manifest_hash": str, "num_samples": int, "unreadable": int,
                                "class_names": list}
    for key, kind in expected.items():
        if not isinstance(getattr(meta, key), kind) or isinstance(getattr(meta, key), bool):
            raise TypeError(f"{key} is not a {kind.__name__}")


def _check_shapes(embeddings: Embeddings, where: str) -> None:
    meta, count = embeddings.meta, embeddings.meta.num_samples
    problems = []
    if embeddings.vectors.shape != (count, meta.dim) or embeddings.vectors.dtype != np.float32:
        problems.append(f"embeddings {embeddings.vectors.dtype} {embeddings.vectors.shape}, expected float32 "
                        f"({count}, {meta.dim})")
    if embeddings.labels.shape != (count,) or embeddings.labels.dtype != np.int64:
        problems.append(f"labels {embeddings.labels.dtype} {embeddings.labels.shape}, expected int64 ({count},)")
    if embeddings.positions.shape != (count, 2):
        problems.append(f"positions {embeddings.positions.shape}, expected ({count}, 2)")
    if not isinstance(embeddings.keys, list) or len(embeddings.keys) != count:
        problems.append(f"keys: expected a list of {count}")
    if len(meta.class_names) and (embeddings.labels >= len(meta.class_names)).any():
        problems.append("labels beyond the class list")
    if problems:
        raise DataError(f"{where}: inconsistent embedding files: {'; '.join(problems)}")
