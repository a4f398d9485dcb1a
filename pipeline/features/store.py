"""Embeddings of one split on disk, and the faiss gallery index built from them.

    DIR/meta.json        what they are: model (pinned version), feature layer and width, split, manifest hash and
                         samples per shard, class names, the sha256 of index.faiss
    DIR/embeddings.npy   float32 (samples, dim), unit rows; zero rows for samples that could not be read
    DIR/labels.npy       int64 (samples,): an index into meta.json's class_names, -1 where unreadable
    DIR/positions.npy    int64 (samples, 2): (manifest shard index, sample index in that shard)
    DIR/keys.json        webdataset __key__ per sample
    DIR/index.faiss      the gallery index over the readable rows (`pipeline.features.index`)

Rows follow the manifest order (shard by shard), so row i is the same sample on every re-run. A folder is written
next to its destination and renamed into place, so a reader sees a complete output or none.

What is read back may come from someone else (an embed run's artifacts in MLflow), so it is data, checked before
use: meta.json's types and ranges; then each .npy file's header (format, dtype, shape) against meta.json and its
size against the header, before any of its data is read, so a header declaring 2^40 rows allocates nothing and
nothing is unpickled; then the values: labels within the class list, positions exactly the manifest order that
meta.json's shard_counts describe, keys strings. Format 2 added shard_counts and the index's sha256; a format 1
folder is refused with a hint to embed again, since its index cannot be checked before faiss parses it.
"""

from __future__ import annotations

import json
import math
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
from pipeline.errors import DataError, first_line

META_FILE = "meta.json"
EMBEDDINGS_FILE = "embeddings.npy"
LABELS_FILE = "labels.npy"
POSITIONS_FILE = "positions.npy"
KEYS_FILE = "keys.json"
FORMAT_VERSION = 2
MAX_META_BYTES = 64 << 20  # class names and shard counts: about 1 MB for ImageNet-21k-sized lists
MAX_KEY_BYTES = 1024  # per sample in keys.json: webdataset keys are file stems
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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
    shard_counts: list[int] = field(default_factory=list)  # samples per manifest shard: the rows, in order
    index_sha256: str = ""  # of index.faiss, compared before faiss reads the file
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
    with staged(directory) as folder:
        np.save(folder / EMBEDDINGS_FILE, embeddings.vectors.astype(np.float32, copy=False))
        write_arrays(folder, embeddings.labels, embeddings.positions, embeddings.keys)
        write_meta(folder, embeddings.meta)
    return Path(directory)


def read_meta(directory: str | os.PathLike) -> EmbeddingMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{directory}: no {META_FILE}; not a complete embedding (run `imagenet-pipeline embed`)")
    if path.stat().st_size > MAX_META_BYTES:
        raise DataError(f"{path}: {path.stat().st_size} bytes, more than an embedding description's {MAX_META_BYTES}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not an embedding description ({_line(error)})") from None
    if isinstance(raw, dict) and raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        version = str(raw["format_version"])[:20]  # checked first: another format has other fields
        raise DataError(
            f"{path}: format version {version}, this pipeline reads {FORMAT_VERSION} (which records "
            "the index's sha256); embed the split again"
        )
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        meta = EmbeddingMeta(**raw)
        _check_meta(meta)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: not an embedding description ({_line(error)})") from None
    return meta


def read_rows(
    directory: str | os.PathLike,
    meta: EmbeddingMeta | None = None,
) -> tuple[EmbeddingMeta, np.ndarray, np.ndarray, list[str]]:
    """meta, labels, positions and keys, each checked against meta.json (read here unless given): what a gallery
    needs besides its index (an embed run in MLflow carries these and the index, not embeddings.npy)."""
    meta = meta or read_meta(directory)
    folder, count = Path(directory), meta.num_samples
    labels = _read_array(folder / LABELS_FILE, np.dtype(np.int64), (count,))
    positions = _read_array(folder / POSITIONS_FILE, np.dtype(np.int64), (count, 2))
    keys = _read_keys(folder / KEYS_FILE, count)
    _check_labels(folder / LABELS_FILE, meta, labels)
    _check_positions(folder / POSITIONS_FILE, meta, positions)
    return meta, labels, positions, keys


def read_embeddings(directory: str | os.PathLike, mmap: bool = True) -> Embeddings:
    meta, labels, positions, keys = read_rows(directory)
    vectors = _read_array(
        Path(directory) / EMBEDDINGS_FILE, np.dtype(np.float32), (meta.num_samples, meta.dim), mmap=mmap
    )
    return Embeddings(meta, vectors, labels, positions, keys)


def _read_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
    """A .npy file whose header (format, dtype, shape) matches meta.json and whose size matches its header, checked
    before any of its data is read."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version not in _NPY_HEADERS:
                raise ValueError(f".npy format {version[0]}.{version[1]}, expected 1.0 or 2.0")
            found_shape, fortran_order, found_dtype = _NPY_HEADERS[version](file)
            data_offset, size = file.tell(), os.fstat(file.fileno()).st_size
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npy array ({_line(error)})") from None
    if found_dtype != dtype or found_shape != shape or fortran_order:
        order = ", Fortran order" if fortran_order else ""
        raise DataError(f"{path}: {found_dtype} {found_shape}{order}, but meta.json describes {dtype} {shape}")
    if size != data_offset + dtype.itemsize * math.prod(shape):
        raise DataError(
            f"{path}: {size} bytes, but its header declares {dtype} {shape} "
            f"({data_offset + dtype.itemsize * math.prod(shape)} bytes)"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npy array ({_line(error)})") from None


def _read_keys(path: Path, count: int) -> list[str]:
    try:
        size = path.stat().st_size
        if size > 2 + count * MAX_KEY_BYTES:
            raise ValueError(f"{size} bytes for {count} keys, more than {MAX_KEY_BYTES} a key")
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable key list ({_line(error)})") from None
    if not isinstance(keys, list) or len(keys) != count or not all(isinstance(key, str) for key in keys):
        raise DataError(f"{path}: expected a JSON list of {count} strings (meta.json's num_samples)")
    return keys


def _check_meta(meta: EmbeddingMeta) -> None:
    """Types and ranges of meta.json's fields, as a TypeError or ValueError naming the field."""
    expected: dict[str, Any] = {
        "model_source": str,
        "architecture": str,
        "layer": str,
        "dim": int,
        "split": str,
        "data_root": str,
        "manifest_hash": str,
        "num_samples": int,
        "unreadable": int,
        "class_names": list,
        "shard_counts": list,
        "index_sha256": str,
        "created": (int, float),
        "format_version": int,
    }
    for key, kind in expected.items():
        if not isinstance(getattr(meta, key), kind) or isinstance(getattr(meta, key), bool):
            raise TypeError(f"{key} is not a {getattr(kind, '__name__', 'number')}")
    for key in ("model_version", "model_run_id"):
        if getattr(meta, key) is not None and not isinstance(getattr(meta, key), str):
            raise TypeError(f"{key} is neither null nor a string")
    if meta.dim < 1 or meta.num_samples < 1:
        raise ValueError("dim and num_samples must be positive")
    if not 0 <= meta.unreadable < meta.num_samples:
        raise ValueError(f"unreadable = {meta.unreadable}: at least 0 and fewer than num_samples")
    if not meta.class_names or not all(isinstance(name, str) for name in meta.class_names):
        raise ValueError("class_names is not a non-empty list of strings")
    counts = meta.shard_counts
    if not all(type(count) is int and count >= 0 for count in counts) or sum(counts) != meta.num_samples:
        raise ValueError(f"shard_counts are not sample counts adding up to num_samples = {meta.num_samples}")
    if not _SHA256.match(meta.index_sha256):
        raise ValueError("index_sha256 is not a sha256 hex digest")


def _check_labels(path: Path, meta: EmbeddingMeta, labels: np.ndarray) -> None:
    classes = len(meta.class_names)
    bad = np.flatnonzero((labels < -1) | (labels >= classes))
    if bad.size:
        raise DataError(
            f"{path}: label {labels[bad[0]]} at row {bad[0]}; a label is -1 (unreadable) or a class "
            f"index below {classes} (meta.json's class_names)"
        )
    unreadable = int((labels == -1).sum())
    if unreadable != meta.unreadable:
        raise DataError(f"{path}: {unreadable} rows labelled -1 (unreadable), but meta.json counts {meta.unreadable}")


def _check_positions(path: Path, meta: EmbeddingMeta, positions: np.ndarray) -> None:
    """Every row is (shard, sample in shard) of the manifest order that meta.json's shard_counts describe."""
    counts = np.asarray(meta.shard_counts, dtype=np.int64)
    shard, offset = positions[:, 0], positions[:, 1]
    bad = np.flatnonzero((shard < 0) | (shard >= counts.size))
    if bad.size:
        raise DataError(
            f"{path}: shard {shard[bad[0]]} at row {bad[0]}, but the gallery has {counts.size} shards "
            "(meta.json's shard_counts)"
        )
    bad = np.flatnonzero((offset < 0) | (offset >= counts[shard]))
    if bad.size:
        row = bad[0]
        raise DataError(
            f"{path}: sample {offset[row]} of shard {shard[row]} at row {row}, but that shard holds "
            f"{counts[shard[row]]} samples (meta.json's shard_counts)"
        )
    expected_shard = np.repeat(np.arange(counts.size), counts)
    expected_offset = np.arange(meta.num_samples) - np.repeat(np.cumsum(counts) - counts, counts)
    bad = np.flatnonzero((shard != expected_shard) | (offset != expected_offset))
    if bad.size:
        row = bad[0]
        raise DataError(
            f"{path}: row {row} is sample {offset[row]} of shard {shard[row]}, but rows follow the "
            f"manifest order (sample {expected_offset[row]} of shard {expected_shard[row]} there)"
        )


def _line(error: BaseException) -> str:
    return first_line(error, with_type=False)[:200]
