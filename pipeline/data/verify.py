"""Checking shards against their manifest, and writing a manifest for shards made elsewhere.

    imagenet-pipeline verify data/shards
    imagenet-pipeline index /data/imagenet-wds --split train --pattern 'imagenet-train-{000000..001281}.tar'

Both read each shard once, in a single pass that checksums the bytes while webdataset's own tar reader groups
the members into samples, so a sample counts here exactly as it counts for the loader.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import unquote, urlsplit

from braceexpand import braceexpand
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline import storage
from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.data.image_header import open_header
from pipeline.data.index import build_index, decode, index_location, write_index
from pipeline.data.manifest import SPLITS, ClassInfo, Manifest, ShardInfo, read_manifest, write_manifest
from pipeline.errors import DataError, StorageError
from pipeline.storage import require_local

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# A damaged shard can have thousands of bad samples; a few examples say enough.
MAX_PROBLEMS_PER_SHARD = 5


@dataclass
class ShardScan:
    num_samples: int = 0
    sha256: str = ""
    bytes: int = 0
    image_keys: Counter = field(default_factory=Counter)  # image key -> samples using it
    max_label: int = -1
    problems: list[str] = field(default_factory=list)
    hidden_problems: int = 0  # beyond MAX_PROBLEMS_PER_SHARD

    def add_problem(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_SHARD:
            self.problems.append(problem)
        else:
            self.hidden_problems += 1

    def all_problems(self) -> list[str]:
        extra = [f"... and {self.hidden_problems} more problems"] if self.hidden_problems else []
        return self.problems + extra


def verify_split(split_dir: Path, decode: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[str]:
    """Problems with one split's shards, each a readable sentence naming the shard; an empty list means OK.

    With `decode`, an image is a problem where the loader would mask it: not JPEG, PNG or WebP, declaring more
    than `max_image_pixels` (data.max_image_pixels; refused from its header), or not decoding."""
    split_dir = require_local(split_dir, "verify folder")  # checksums and sizes are read from local files
    try:
        # file:// entries are what `index --output elsewhere` writes; verify only reads and hashes local files.
        manifest = read_manifest(split_dir, shard_url_schemes=("file",))
    except (DataError, StorageError) as error:
        return [str(error)]
    problems = []
    if [info.index for info in manifest.classes] != list(range(manifest.num_classes)):
        problems.append("manifest class indices are not 0..K-1 in order")
    for shard in manifest.shards:
        if shard.name.startswith("file://"):
            path = Path(unquote(urlsplit(shard.name).path))
        elif storage.is_url(shard.name):
            logger.warning("%s is remote and is not checked", shard.name)
            continue
        else:
            path = split_dir / shard.name
        if not path.is_file():
            problems.append(f"{shard.name}: missing (listed in the manifest)")
            continue
        size = path.stat().st_size
        if shard.bytes is not None and size != shard.bytes:
            problems.append(f"{shard.name}: {size} bytes, the manifest says {shard.bytes}")
        scan = scan_shard(path, manifest.image_key, manifest.label_key, manifest.num_classes, decode, max_image_pixels)
        if shard.sha256 is not None and scan.sha256 != shard.sha256:
            problems.append(
                f"{shard.name}: sha256 {scan.sha256[:12]}... differs from the manifest's {shard.sha256[:12]}..."
            )
        if scan.num_samples != shard.num_samples:
            problems.append(f"{shard.name}: {scan.num_samples} samples, the manifest says {shard.num_samples}")
        problems += [f"{shard.name}: {problem}" for problem in scan.all_problems()]
        if shard.index_sha256 is not None:
            problems += _index_problems(path, shard)
    return problems


def verify_dataset(
    root: Path, decode: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> dict[str, list[str]]:
    """`verify_split` for each of train/, val/ and test/ present under `root`; {} when none is."""
    root = require_local(root, "verify folder")
    return {
        split: verify_split(root / split, decode=decode, max_image_pixels=max_image_pixels)
        for split in SPLITS
        if (root / split).is_dir()
    }


def index_shards(
    shard_dir: Path,
    split: str,
    pattern: str = "*.tar",
    classes_file: Path | None = None,
    output: Path | None = None,
    progress: bool = True,
) -> Manifest:
    """Write `manifest.json` (in `output`, default `shard_dir`) for existing shards with an image and a `cls` key.

    `pattern` is a glob or a brace range as webdataset writes them (`imagenet-train-{000000..001281}.tar`).
    Without `classes_file` ("wnid name" per line, line n = class n) there are max(cls) + 1 classes named by index.
    """
    shard_dir = require_local(shard_dir, "index folder")  # index writes manifest.json next to the shards
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if not shard_dir.is_dir():
        raise DataError(f"shard folder {shard_dir} does not exist")
    paths = _match_shards(shard_dir, pattern)
    classes = _read_classes_file(Path(classes_file)) if classes_file is not None else None
    output = require_local(output, "index output") if output is not None else shard_dir

    shards, image_keys, max_label = [], Counter(), -1
    for path in tqdm(paths, unit="shard", desc="indexing", disable=not progress):
        scan = scan_shard(path, image_key=None, label_key="cls", num_classes=None, decode=False)
        if scan.problems:
            raise DataError(f"cannot index {path}: {scan.problems[0]}")
        shards.append(
            ShardInfo(_shard_name(path, output), scan.num_samples, scan.sha256, scan.bytes, _index_beside(path))
        )
        image_keys += scan.image_keys
        max_label = max(max_label, scan.max_label)
    if len(image_keys) > 1:
        raise DataError(f"the shards mix image keys ({', '.join(sorted(image_keys))}); the loader reads one key")
    if classes is None:
        classes = [ClassInfo(index, f"class_{index}", f"class {index}") for index in range(max_label + 1)]
    elif max_label >= len(classes):
        raise DataError(f"the shards hold label {max_label} but {classes_file} lists only {len(classes)} classes")
    manifest = Manifest(
        split=split,
        classes=classes,
        shards=shards,
        image_key=next(iter(image_keys), "jpg"),
        label_key="cls",
        source={
            "indexed_from": str(shard_dir),
            "pattern": pattern,
            "classes_file": str(classes_file) if classes_file is not None else None,
        },
    )
    output.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, output)
    return manifest


def _index_beside(path: Path) -> str | None:
    """Write the shard's sample index beside it; None (loaders read it sequentially) if that folder is read-only."""
    try:
        return write_index(path)[0]
    except OSError as error:
        logger.warning("no sample index for %s (%s): loaders will read it from its start", path, error.strerror)
        return None


def _index_problems(path: Path, shard: ShardInfo) -> list[str]:
    """What is wrong with a shard's sample index: missing, not the manifest's, or not the tar's layout."""
    where = Path(index_location(str(path)))
    if not where.is_file():
        return [f"{shard.name}: sample index {where.name} is missing (the manifest lists one)"]
    data = where.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard.index_sha256:
        return [f"{shard.name}: sample index sha256 differs from the manifest's"]
    try:
        entries = decode(data, where.name)
    except DataError as error:
        return [f"{shard.name}: {error}"]
    try:
        with open(path, "rb") as handle:
            layout = build_index(handle)
    except tarfile.TarError as error:
        return [f"{shard.name}: sample index not checked: the tar does not read ({error})"]
    if entries.tolist() != layout.tolist():
        return [f"{shard.name}: sample index does not match the tar's members; re-run `imagenet-pipeline index`"]
    return []


def scan_shard(
    path: Path,
    image_key: str | None,
    label_key: str,
    num_classes: int | None,
    decode: bool,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ShardScan:
    """Read one shard: sample count, sha256, size, image keys, largest label, and what is wrong with it.

    `image_key` None accepts any of IMAGE_KEYS; `num_classes` None skips the label range check.
    """
    scan = ShardScan()
    with open(path, "rb") as handle:
        reader = _HashingReader(handle)
        try:
            for sample in _samples(reader, path):
                scan.num_samples += 1
                _check_sample(sample, scan, image_key, label_key, num_classes, decode, max_image_pixels)
        except Exception as error:  # tarfile and webdataset raise many kinds on damaged data
            scan.add_problem(f"unreadable after {scan.num_samples} samples: {type(error).__name__}: {error}")
        scan.sha256, scan.bytes = reader.finish()
    return scan


def _check_sample(
    sample: dict,
    scan: ShardScan,
    image_key: str | None,
    label_key: str,
    num_classes: int | None,
    decode: bool,
    max_image_pixels: int,
) -> None:
    key = sample["__key__"]
    candidates = (image_key,) if image_key else IMAGE_KEYS
    found = next((candidate for candidate in candidates if candidate in sample), None)
    if found is None:
        scan.add_problem(f"sample {key} has no image ({'/'.join(candidates)}); it has {_data_keys(sample)}")
    else:
        scan.image_keys[found] += 1
        if decode:
            try:
                with open_header(sample[found], max_image_pixels) as image:  # the loader's formats and limit
                    image.load()
            except Exception as error:  # any decode failure is a problem to report
                scan.add_problem(f"sample {key}: image does not decode ({type(error).__name__}: {error})")
    if label_key not in sample:
        scan.add_problem(f"sample {key} has no label ({label_key}); it has {_data_keys(sample)}")
        return
    try:
        label = int(sample[label_key].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        scan.add_problem(f"sample {key}: label {sample[label_key][:20]!r} is not an integer")
        return
    if label < 0 or (num_classes is not None and label >= num_classes):
        scan.add_problem(f"sample {key}: label {label} is outside 0..{(num_classes or 1) - 1}")
    scan.max_label = max(scan.max_label, label)


def _samples(reader: "_HashingReader", path: Path) -> Iterator[dict]:
    # group_by_keys wants the shard's URL on every member; it only uses it in error messages.
    members = ({**member, "__url__": str(path)} for member in tar_file_iterator(reader))
    return group_by_keys(members)


def _data_keys(sample: dict) -> str:
    keys = [name for name in sample if not name.startswith("__")]
    return ", ".join(keys) if keys else "no data"


class _HashingReader:
    """A read-only file wrapper that checksums everything read through it (sequential reads only)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def finish(self) -> tuple[str, int]:
        """Read what the tar reader left (end-of-archive padding, or all of it after an error)."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest(), self.bytes


def _match_shards(shard_dir: Path, pattern: str) -> list[Path]:
    if "{" in pattern:
        paths = [shard_dir / name for name in braceexpand(pattern)]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise DataError(f"{len(missing)} shards of {pattern!r} are missing in {shard_dir}, e.g. {missing[0].name}")
    else:
        paths = sorted(path for path in shard_dir.glob(pattern) if path.is_file())
    if not paths:
        raise DataError(f"no shard in {shard_dir} matches {pattern!r}")
    return paths


def _read_classes_file(path: Path) -> list[ClassInfo]:
    if not path.is_file():
        raise DataError(f"classes file {path} does not exist")
    lines = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"classes file {path} is empty; expected one 'wnid name' line per class")
    return [ClassInfo(index, parts[0], parts[1] if len(parts) > 1 else parts[0]) for index, parts in enumerate(lines)]


def _shard_name(path: Path, output: Path) -> str:
    """The file name when the shard lies in the manifest's folder; else a file:// URL, which readers accept only
    when the user lists "file" in data.shard_url_schemes (a manifest's plain names never leave their folder)."""
    if path.resolve().parent == output.resolve():
        return path.name
    return path.resolve().as_uri()
