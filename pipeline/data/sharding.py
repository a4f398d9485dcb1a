"""Writing an ILSVRC2012 tree as webdataset shards: train/, val/ (held out of train) and test/ (the official val).

    imagenet-pipeline shard --source /data/imagenet --output /data/shards --processes 8

Each sample is `<key>.jpg` (the original file bytes whenever they are a decodable RGB JPEG that needs no resize)
and `<key>.cls` (the class index as ASCII). Samples are shuffled across shards with the seed, so no shard holds
a single class and a streaming loader needs only a small in-memory shuffle buffer.

Crash safety: a shard is written as `<name>.partial`, fsynced, described in a sidecar `<name>.json` (count,
sha256, bytes, skipped and converted files), then renamed; `manifest.json` is written last. Nothing
half-written ever looks complete, and `resume=True` keeps finished shards and redoes the rest, after checking
that the plan (which file goes into which shard) is unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import webdataset
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.data.image_header import CorruptImageError, check_pixels, declared_size
from pipeline.data.index import index_location, write_index
from pipeline.data.manifest import (
    SPLITS,
    Manifest,
    ShardInfo,
    file_sha256,
    manifest_path,
    write_json_atomic,
    write_manifest,
)
from pipeline.data.source import ImageNetSource, LabeledFile, discover_source, hold_out_validation
from pipeline.errors import DataError
from pipeline.storage import require_local

PLAN_FILE = "plan.json"
LOCK_FILE = ".shard.lock"  # in the output root: the pid of the run holding the folder's flock
REPORT_FILE = "report.json"
# Fixed tar member times make shard bytes a function of their content, so a shard rewritten on resume has the
# same sha256 as the one it replaces (2012-01-01, the ILSVRC2012 release year).
SHARD_MTIME = 1325376000
SPLIT_ORIGINS = {
    "train": "train/ minus the held-out images",
    "val": "held out of train/: val_per_class images per class",
    "test": "the official ILSVRC2012 validation set (val/)",
}


@dataclass(frozen=True)
class PlannedSample:
    path: str  # absolute source file
    relative: str  # relative to the source root: what reports show and the plan fingerprint covers
    key: str
    label: int


@dataclass(frozen=True)
class ShardTask:
    split_dir: str
    name: str
    samples: tuple[PlannedSample, ...]
    max_side: int | None
    quality: int
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


class PreparedImage(NamedTuple):
    data: bytes | None  # JPEG bytes to store; None when the file is skipped
    converted: str | None  # why the bytes differ from the source file
    skipped: str | None  # why the file could not be stored


@dataclass
class SplitSummary:
    num_samples: int
    num_shards: int
    shards_written: int
    shards_kept: int


@dataclass
class ShardingSummary:
    output: Path
    splits: dict[str, SplitSummary]
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def shards_written(self) -> int:
        return sum(split.shards_written for split in self.splits.values())

    @property
    def shards_kept(self) -> int:
        return sum(split.shards_kept for split in self.splits.values())

    def __str__(self) -> str:
        counts = ", ".join(
            f"{name} {split.num_samples} samples in {split.num_shards} shards" for name, split in self.splits.items()
        )
        return (
            f"{self.output}: {counts}; {self.shards_written} shards written, {self.shards_kept} kept; "
            f"{len(self.skipped)} files skipped, {len(self.converted)} converted "
            f"(see {REPORT_FILE}); {self.elapsed_seconds:.1f} s"
        )


def shard_imagenet(
    source: Path,
    output: Path,
    *,
    val_per_class: int = 50,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    quality: int = 90,
    processes: int = 1,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ShardingSummary:
    """Shard the ILSVRC2012 tree at `source` into `output/{train,val,test}/`; see the module docstring.

    Source files declaring more than `max_image_pixels` (data.max_image_pixels) are skipped from their header."""
    started = time.perf_counter()
    _check_options(val_per_class, samples_per_shard, max_side, quality, processes, max_image_pixels)
    source, output = Path(source), require_local(output, "shard --output")
    if output.exists() and not output.is_dir():
        raise DataError(f"shard --output {output} is a file; give a folder (new or holding train/ val/ test/)")
    found = discover_source(source)
    options = {
        "seed": seed,
        "val_per_class": val_per_class,
        "samples_per_shard": samples_per_shard,
        "max_side": max_side,
        "quality": quality,
    }
    plans = _plan(found, output, options, max_image_pixels)
    fingerprints = {split: _fingerprint(split, tasks, options) for split, tasks in plans.items()}
    # Check every split before touching any, so a refused run leaves the output exactly as it was.
    for split in plans:
        _check_split_dir(output / split, fingerprints[split], resume)
    with exclusive_writer(output):
        for split in plans:  # again under the lock: another writer may have started since
            _check_split_dir(output / split, fingerprints[split], resume)
        return _write_planned(source, found, output, plans, fingerprints, options, processes, progress, started)


@contextmanager
def exclusive_writer(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on the `output` folder while writing: a second writer (an immediate `--resume`
    racing the pool of a killed run, or two users) is refused with the holder's pid. The kernel drops a flock when
    its holder dies, even by SIGKILL, so a stale lock never blocks a later run."""
    output.mkdir(parents=True, exist_ok=True)
    folder = os.open(output, os.O_RDONLY)  # a flock on the folder itself: no file of its own to leave behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(folder)
        holder = (output / LOCK_FILE).read_text().strip() if (output / LOCK_FILE).is_file() else "unknown"
        raise DataError(
            f"shard --output {output} is being written by another `shard` (pid {holder}); wait for it "
            "or stop it, then run again with --resume"
        ) from None
    try:
        (output / LOCK_FILE).write_text(str(os.getpid()))
        yield
    finally:
        os.close(folder)  # releases the lock


def _write_planned(
    source: Path,
    found: ImageNetSource,
    output: Path,
    plans: dict,
    fingerprints: dict,
    options: dict,
    processes: int,
    progress: bool,
    started: float,
) -> "ShardingSummary":
    for split, tasks in plans.items():
        _start_split(output / split, fingerprints[split], options, len(tasks))

    pending = [task for tasks in plans.values() for task in tasks if _completed_info(task) is None]
    _write_shards(pending, processes, progress)

    summary = ShardingSummary(output=output, splits={})
    rewritten = {(task.split_dir, task.name) for task in pending}
    for split, tasks in plans.items():
        strays = [
            {"file": str(stray.path.relative_to(source)), "reason": stray.reason}
            for stray in found.stray_files
            if _split_of_folder(stray.folder) == split
        ]
        recorded_options = {**options, "plan_fingerprint": fingerprints[split]}
        manifest = _write_split_manifest(split, tasks, found, strays, recorded_options)
        written = sum((task.split_dir, task.name) in rewritten for task in tasks)
        summary.splits[split] = SplitSummary(manifest.num_samples, len(tasks), written, len(tasks) - written)
        skipped, converted = _file_records(tasks, strays)
        summary.skipped += [{"split": split, **entry} for entry in skipped]
        summary.converted += [{"split": split, **entry} for entry in converted]
    # Stray files of a folder that yields no split (e.g. a val/ without images) are still reported.
    summary.skipped += [
        {"split": _split_of_folder(stray.folder), "file": str(stray.path.relative_to(source)), "reason": stray.reason}
        for stray in found.stray_files
        if _split_of_folder(stray.folder) not in plans
    ]
    summary.elapsed_seconds = time.perf_counter() - started
    write_json_atomic(
        output / REPORT_FILE,
        {
            "source": str(source),
            "splits": {name: vars(split) for name, split in summary.splits.items()},
            "shards_written": summary.shards_written,
            "shards_kept": summary.shards_kept,
            "elapsed_seconds": round(summary.elapsed_seconds, 3),
            "skipped": summary.skipped,
            "converted": summary.converted,
        },
    )
    return summary


# What ImageNet's source folders hold (JPEG, with some PNG, CMYK and GIF/BMP files among them) and what cameras
# and scanners write.
SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO: its opener returns one


def prepare_image(
    path: Path, max_side: int | None, quality: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> PreparedImage:
    """The bytes to store for one source file: the original when possible, else an RGB JPEG re-encoding.

    The raster formats cameras, scanners and the web write are accepted (`SOURCE_FORMATS`; re-encoded), never
    PIL's others (EPS would run Ghostscript on outside bytes), and never one declaring more than
    `max_image_pixels`: that is known from the header, before decoding."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return PreparedImage(None, None, f"unreadable: {error.strerror or error}")
    try:
        declared = declared_size(data)  # JPEG, PNG, WebP: before PIL, which warns past its own threshold
        if declared is not None:
            check_pixels(*declared, max_image_pixels)
        with Image.open(io.BytesIO(data), formats=SOURCE_FORMATS) as image:
            check_pixels(*image.size, max_image_pixels)  # other formats, from the header PIL just read
            image.load()  # a full decode: truncated files often open fine and fail only here
            reasons = []
            # MPO is a camera JPEG with extra frames appended; its bytes decode as a plain JPEG.
            if image.format not in ("JPEG", "MPO"):
                disguised = path.suffix.lower() in (".jpeg", ".jpg")
                reasons.append(
                    f"{image.format} data in a {path.suffix} file re-encoded as JPEG"
                    if disguised
                    else f"{image.format} re-encoded as JPEG"
                )
            if image.mode != "RGB":
                reasons.append(f"{image.mode} image converted to RGB")
            size = image.size
            if max_side is not None and max(size) > max_side:
                scale = max_side / max(size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                reasons.append(f"resized from {image.width}x{image.height} to {size[0]}x{size[1]}")
            if not reasons:
                return PreparedImage(data, None, None)
            rgb = image.convert("RGB")
            if size != image.size:
                rgb = rgb.resize(size, Image.LANCZOS, reducing_gap=3.0)
            buffer = io.BytesIO()
            rgb.save(buffer, format="JPEG", quality=quality)
            return PreparedImage(buffer.getvalue(), "; ".join(reasons), None)
    except UnidentifiedImageError:
        # Its message names the in-memory buffer's address, which would make reports differ between runs.
        return PreparedImage(None, None, "cannot be decoded: not a known image format")
    except CorruptImageError as error:
        return PreparedImage(None, None, f"too large: {error}")
    except Exception as error:  # damaged files raise many kinds of errors; each is a skip, not a crash
        return PreparedImage(None, None, f"cannot be decoded: {type(error).__name__}: {error}")


def _plan(
    found: ImageNetSource, output: Path, options: dict[str, Any], max_image_pixels: int
) -> dict[str, list[ShardTask]]:
    """Which file goes into which shard, for every split that has files; a pure function of source and options."""
    train, held_out = hold_out_validation(found, options["val_per_class"], options["seed"])
    split_files = {"train": train, "val": held_out, "test": found.official_val_files}
    plans = {}
    for split in SPLITS:
        if split_files[split]:
            samples = _plan_samples(split_files[split], found.class_index, found.root)
            plans[split] = _plan_shards(output / split, split, samples, options, max_image_pixels)
    return plans


def _write_shards(tasks: list[ShardTask], processes: int, progress: bool) -> None:
    with tqdm(
        total=sum(len(task.samples) for task in tasks), unit="image", desc="sharding", disable=not progress
    ) as bar:
        if processes > 1 and len(tasks) > 1:
            # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would inherit mid-lock.
            with multiprocessing.get_context("spawn").Pool(
                min(processes, len(tasks)), initializer=_die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                for handled in pool.imap_unordered(_write_shard_task, tasks):
                    bar.update(handled)
        else:
            for task in tasks:
                bar.update(_write_shard_task(task))


def _write_split_manifest(
    split: str, tasks: list[ShardTask], found: ImageNetSource, strays: list[dict[str, str]], options: dict[str, Any]
) -> Manifest:
    infos = [_completed_info(task) for task in tasks]
    assert all(info is not None for info in infos), "every planned shard is complete before the manifest"
    manifest = Manifest(
        split=split,
        classes=found.classes,
        shards=[
            ShardInfo(info["name"], info["num_samples"], info["sha256"], info["bytes"], info.get("index_sha256"))
            for info in infos
        ],
        source={**found.describe(), **options, "split_origin": SPLIT_ORIGINS[split]},
        skipped_files=len(strays) + sum(len(info["skipped"]) for info in infos),
        converted_files=sum(len(info["converted"]) for info in infos),
    )
    write_manifest(manifest, Path(tasks[0].split_dir))
    return manifest


def _file_records(tasks: list[ShardTask], strays: list[dict[str, str]]) -> tuple[list[dict], list[dict]]:
    """The split's skipped and converted files, each with its reason, from the shards' info files: for the
    report, not the manifest."""
    infos = [_completed_info(task) for task in tasks]
    return (
        strays + [entry for info in infos for entry in info["skipped"]],
        [entry for info in infos for entry in info["converted"]],
    )


def _plan_samples(files: list[LabeledFile], class_index: dict[str, int], source: Path) -> list[PlannedSample]:
    """Labels and unique webdataset keys; keys contain no dots (webdataset splits a member name at the first)."""
    samples, used = [], set()
    for item in files:
        key = re.sub(r"[^A-Za-z0-9_-]", "_", item.path.stem)
        if key in used:  # e.g. "img1.jpg" in two class folders of a hand-made tree
            key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{item.path.parent.name}_{item.path.stem}")
        base, number = key, 1
        while key in used:
            number += 1
            key = f"{base}_{number}"
        used.add(key)
        samples.append(PlannedSample(str(item.path), str(item.path.relative_to(source)), key, class_index[item.wnid]))
    return samples


def _plan_shards(
    split_dir: Path, split: str, samples: list[PlannedSample], options: dict[str, Any], max_image_pixels: int
) -> list[ShardTask]:
    rng = np.random.default_rng([options["seed"], SPLITS.index(split)])
    shuffled = [samples[position] for position in rng.permutation(len(samples))]
    # Balanced sizes (differing by at most one) rather than full shards plus a short last one: ranks that each
    # read whole shards then get nearly equal work.
    num_shards = -(-len(shuffled) // options["samples_per_shard"])  # ceiling division
    groups = np.array_split(np.arange(len(shuffled)), num_shards)
    # max_image_pixels stays out of `options`, the plan's fingerprint: no `shard` flag sets it yet, and leaving it
    # out lets a run interrupted before it existed resume.
    return [
        ShardTask(
            str(split_dir),
            f"{split}-{number:06d}.tar",
            tuple(shuffled[i] for i in group),
            options["max_side"],
            options["quality"],
            max_image_pixels,
        )
        for number, group in enumerate(groups)
    ]


def _fingerprint(split: str, tasks: list[ShardTask], options: dict[str, Any]) -> str:
    """Identity of a split's plan: options plus, per shard, each file (with its size), key and label."""
    digest = hashlib.sha256(json.dumps({"split": split, **options}, sort_keys=True).encode())
    for task in tasks:
        digest.update(f"\n{task.name}".encode())
        for sample in task.samples:
            try:
                size = os.stat(sample.path).st_size
            except OSError:
                size = -1
            digest.update(f"\n{sample.relative}\t{size}\t{sample.key}\t{sample.label}".encode())
    return digest.hexdigest()


def _check_split_dir(split_dir: Path, fingerprint: str, resume: bool) -> None:
    leftovers = (
        [path for path in split_dir.iterdir() if path.name.endswith((".tar", ".partial", ".json"))]
        if split_dir.is_dir()
        else []
    )
    if not leftovers:
        return
    if not resume:
        raise DataError(
            f"{split_dir} already holds shards; pass --resume to finish an interrupted run "
            "or choose an empty output directory"
        )
    plan_file = split_dir / PLAN_FILE
    if not plan_file.is_file():
        raise DataError(
            f"cannot resume in {split_dir}: it has no {PLAN_FILE}, so its shards were not written by "
            "this tool or are from an older run; use an empty output directory"
        )
    if json.loads(plan_file.read_text()).get("fingerprint") != fingerprint:
        raise DataError(
            f"cannot resume in {split_dir}: its shards were planned from different source files or "
            "options (seed, val_per_class, samples_per_shard, max_side, quality); use an empty directory"
        )


def _start_split(split_dir: Path, fingerprint: str, options: dict[str, Any], num_shards: int) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    # The old manifest would vouch for shards about to be rewritten; the new one is written at the end.
    manifest_path(split_dir).unlink(missing_ok=True)
    for partial in split_dir.glob("*.partial"):
        partial.unlink()
    write_json_atomic(split_dir / PLAN_FILE, {"fingerprint": fingerprint, "num_shards": num_shards, **options})


def _completed_info(task: ShardTask) -> dict[str, Any] | None:
    """The sidecar of a finished shard; None if the shard must be (re)written."""
    final = Path(task.split_dir) / task.name
    sidecar = final.with_name(final.name + ".json")
    if not (final.is_file() and sidecar.is_file()):
        return None
    info = json.loads(sidecar.read_text())
    return info if info.get("bytes") == final.stat().st_size else None


def _die_with_parent(parent_pid: int) -> None:
    """In each pool process: exit when the `shard` process dies, even by SIGKILL, so no shard is written after it
    (Linux's PR_SET_PDEATHSIG; elsewhere the per-shard parent check below still stops it between shards)."""
    global _PARENT_PID
    _PARENT_PID = parent_pid
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


_PARENT_PID: int | None = None


def _write_shard_task(task: ShardTask) -> int:
    """Write one shard atomically (see module docstring); returns the number of planned samples handled."""
    if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
        os._exit(1)  # orphaned: the run that planned this shard is gone
    final = Path(task.split_dir) / task.name
    partial = final.with_name(final.name + ".partial")
    skipped, converted, count = [], [], 0
    with open(partial, "wb") as handle:
        writer = webdataset.TarWriter(handle, encoder=False, mtime=SHARD_MTIME)
        for sample in task.samples:
            prepared = prepare_image(Path(sample.path), task.max_side, task.quality, task.max_image_pixels)
            if prepared.data is None:
                skipped.append({"file": sample.relative, "reason": prepared.skipped})
                continue
            if prepared.converted:
                converted.append({"file": sample.relative, "reason": prepared.converted})
            writer.write({"__key__": sample.key, "jpg": prepared.data, "cls": str(sample.label).encode()})
            count += 1
        writer.close()
        handle.flush()
        os.fsync(handle.fileno())
    index_sha256, _ = write_index(partial, Path(index_location(str(final))))
    info = {
        "name": task.name,
        "num_samples": count,
        "sha256": file_sha256(partial),
        "bytes": partial.stat().st_size,
        "index_sha256": index_sha256,
        "skipped": skipped,
        "converted": converted,
    }
    write_json_atomic(final.with_name(final.name + ".json"), info)
    os.replace(partial, final)
    _fsync_directory(final.parent)
    return len(task.samples)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable: without it a power cut can undo the rename but keep the sidecar.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _split_of_folder(folder: str) -> str:
    return "test" if folder == "val" else "train"


def _check_options(
    val_per_class: int,
    samples_per_shard: int,
    max_side: int | None,
    quality: int,
    processes: int,
    max_image_pixels: int,
) -> None:
    if val_per_class < 0:
        raise DataError(f"val_per_class = {val_per_class} must be 0 or more (0: no held-out val split)")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard = {samples_per_shard} must be at least 1")
    if max_side is not None and max_side < 1:
        raise DataError(f"max_side = {max_side} must be a positive number of pixels, or None to keep sizes")
    if not 1 <= quality <= 100:
        raise DataError(f"quality = {quality} must be between 1 and 100")
    if processes < 1:
        raise DataError(f"processes = {processes} must be at least 1")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise DataError(f"max_image_pixels = {max_image_pixels!r} must be a whole number of pixels, at least 1")
