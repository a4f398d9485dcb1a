"""The per-split shard manifest: what is in a shard directory, written last so it marks completion.

A manifest makes exact distributed loading possible: with the per-shard sample counts every rank can
compute the same epoch plan without talking to the others (see `pipeline.data.plan`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import DataError

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
    # sha256 of the shard's sample index (`pipeline.data.index`); None: not indexed (read from the start, skipping)
    index_sha256: str | None = None


@dataclass
class Manifest:
    split: str
    classes: list[ClassInfo]
    shards: list[ShardInfo]
    image_key: str = "jpg"
    label_key: str = "cls"
    source: dict[str, Any] = field(default_factory=dict)
    # Counts only: every rank and the driver read the manifest, and ImageNet with `shard --max-side` converts
    # ~1.2 M files (~140 MB of per-file records). Which files and why are in the sharding run's report.json.
    skipped_files: int = 0
    converted_files: int = 0
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
        for key, kind in (("classes", list), ("shards", list)):
            if key in data and not isinstance(data[key], kind):
                raise DataError(f"'{key}' must be a JSON list, not {type(data[key]).__name__}")
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
            skipped_files=_file_count(data, "skipped"),
            converted_files=_file_count(data, "converted"),
        )


def _file_count(data: dict[str, Any], kind: str) -> int:
    """`<kind>_files`, or the length of the per-file list a manifest written before counts held."""
    count = data.get(f"{kind}_files", len(data.get(kind) or []))
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise DataError(f"'{kind}_files' must be a count of files (an integer >= 0), not {count!r}")
    return count


def combine_manifests(manifests: list[Manifest]) -> Manifest:
    """Several splits read as one (a refit's train + val): their shards in order, under one class list.

    Shard names stay as each manifest gave them (they may repeat across splits); readers take each shard's
    location from its own split. The content hash covers every shard, so it names the union."""
    first = manifests[0]
    for other in manifests[1:]:
        if other.classes != first.classes or (other.image_key, other.label_key) != (first.image_key, first.label_key):
            raise DataError(
                f"the {first.split} and {other.split} splits have different classes or sample keys; "
                "they cannot be trained on together: shard both from the same source"
            )
    return Manifest(
        split="+".join(m.split for m in manifests),
        classes=first.classes,
        shards=[shard for m in manifests for shard in m.shards],
        image_key=first.image_key,
        label_key=first.label_key,
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


def read_manifest(split_dir: str | Path, shard_url_schemes: tuple[str, ...] | list[str] = ()) -> Manifest:
    """The manifest of a local split folder or a split URL (s3://bucket/imagenet/train, any fsspec protocol).

    A manifest comes from shared storage that many people write to, so it is checked as untrusted input: its shape,
    and every shard name (`check_shard_name`). `shard_url_schemes` is the user's own allowance
    (`data.shard_url_schemes`) for shards listed by URL.
    """
    location = storage.join(split_dir, MANIFEST_NAME)
    if not has_manifest(split_dir):
        raise DataError(
            f"no {MANIFEST_NAME} in {split_dir}: shard it with `imagenet-pipeline shard` "
            "or index existing shards with `imagenet-pipeline index`"
        )
    try:
        data = json.loads(storage.read_text(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{location} is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DataError(f"{location}: a manifest is a JSON object, not {type(data).__name__}")
    try:
        manifest = Manifest.from_dict(data)
    except KeyError as error:
        raise DataError(
            f"{location}: the manifest has no {error.args[0]!r} entry; re-run `imagenet-pipeline "
            "index` on the shard directory"
        ) from None
    except (TypeError, AttributeError, ValueError) as error:
        if isinstance(error, DataError):
            raise DataError(f"{location}: {error}") from None
        raise DataError(
            f"{location}: an entry has the wrong JSON type ({str(error).splitlines()[0]}); re-run "
            "`imagenet-pipeline index` on the shard directory"
        ) from None
    for shard in manifest.shards:
        check_shard_name(shard.name, location, shard_url_schemes)
        if shard.index_sha256 is not None and not (
            isinstance(shard.index_sha256, str) and _SHA256.fullmatch(shard.index_sha256)
        ):
            raise DataError(
                f"{location}: shard {shard.name!r} has index_sha256 {shard.index_sha256!r}, not a sha256 hex digest"
            )
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_shard_name(name: Any, manifest_location: str, shard_url_schemes: tuple[str, ...] | list[str] = ()) -> None:
    """A shard entry must be a plain file name inside its split folder: no '/', no '..', no absolute path, no URL
    and never a `pipe:` command (webdataset would run it with a shell on every worker). A URL is accepted only
    when its scheme is among the user's `data.shard_url_schemes`."""
    allowed = "a plain file name in its split folder (no '/', '..', absolute path, URL or pipe: command)"
    if not isinstance(name, str) or not name:
        raise DataError(f"{manifest_location}: shard entry {name!r} is not {allowed}")
    if storage.is_pipe(name):
        raise DataError(
            f"{manifest_location}: shard entry {name!r} is a pipe: command, which is never run; "
            f"a shard entry must be {allowed}"
        )
    if storage.is_url(name):
        scheme = name.split("://", 1)[0].lower()
        if scheme in shard_url_schemes:
            return
        raise DataError(
            f"{manifest_location}: shard entry {name!r} is a {scheme}:// URL, and data.shard_url_schemes "
            f"= {list(shard_url_schemes)} does not allow it; a shard entry must be {allowed}, or list "
            f"'{scheme}' in data.shard_url_schemes if you trust this manifest's writers"
        )
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("~") or "\x00" in name:
        raise DataError(f"{manifest_location}: shard entry {name!r} is not {allowed}")


def write_json_atomic(path: Path, data: Any) -> None:
    with storage.atomic_write(path) as handle:
        handle.write(json.dumps(data, indent=1).encode("utf-8"))


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
