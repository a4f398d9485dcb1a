"""The per-split shard manifest: what is in a shard directory, written last so it marks completion.

A manifest makes exact distributed loading possible: with the per-shard sample counts every rank can
compute the same epoch plan without talking to the others (see `pipeline.data.plan`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline import storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the manifest's directory (or a full URL for external shards)
    num_samples: int
    sha256: str | None = None
    bytes: int | None = None


@dataclass
class Manifest:
    split: str
    classes: list[ClassInfo]
    shards: list[ShardInfo]
    image_key: str = "jpg"
    label_key: str = "cls"
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shard_counts(self) -> list[int]:
        return [shard.num_samples for shard in self.shards]

    def class_names(self) -> list[str]:
        return [c.name for c in sorted(self.classes, key=lambda c: c.index)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        data["num_classes"] = self.num_classes
        return data

    def content_hash(self) -> str:
        """A short, stable identity of the data (classes + shard contents), logged with every run."""
        identity = {
            "classes": [asdict(c) for c in self.classes],
            "shards": [[s.name, s.num_samples, s.sha256] for s in self.shards],
            "keys": [self.image_key, self.label_key],
        }
        blob = json.dumps(identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"manifest format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                "re-run `imagenet-pipeline index` on the shard directory"
            )
        return cls(
            split=data["split"],
            classes=[ClassInfo(**c) for c in data["classes"]],
            shards=[ShardInfo(**s) for s in data["shards"]],
            image_key=data.get("image_key", "jpg"),
            label_key=data.get("label_key", "cls"),
            source=data.get("source", {}),
            skipped=data.get("skipped", []),
            converted=data.get("converted", []),
        )


def manifest_path(split_dir: str | Path) -> Path:
    """Where the writers put the manifest: writing is local only (see `pipeline.storage`)."""
    return Path(split_dir) / MANIFEST_NAME


def write_manifest(manifest: Manifest, split_dir: str | Path) -> Path:
    """Write atomically: a reader never sees a half-written manifest, and its presence means 'complete'."""
    path = manifest_path(split_dir)
    write_json_atomic(path, manifest.to_dict())
    return path


def has_manifest(split_dir: str | Path) -> bool:
    """Whether a local split folder or a split URL holds a manifest (the sign of a complete split)."""
    return storage.is_file(storage.join(split_dir, MANIFEST_NAME))


def read_manifest(split_dir: str | Path) -> Manifest:
    """The manifest of a local split folder or a split URL (s3://bucket/imagenet/train, any fsspec protocol)."""
    location = storage.join(split_dir, MANIFEST_NAME)
    if not has_manifest(split_dir):
        raise DataError(
            f"no {MANIFEST_NAME} in {split_dir}: shard it with `imagenet-pipeline shard` "
            "or index existing shards with `imagenet-pipeline index`"
        )
    try:
        data = json.loads(storage.read_text(location))
    except json.JSONDecodeError as error:
        raise DataError(f"{location} is not valid JSON: {error}") from error
    return Manifest.from_dict(data)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
