"""Small files the driver and workers keep beside a run's checkpoints, on whatever `tracking.storage_path` is.

Ray Train writes checkpoints through pyarrow's filesystems (local disk, NFS, s3://, gs://, ...), so this
module uses the same layer: whatever storage Ray can write to, these helpers can read and list, with no
extra package (the shard reader's fsspec backends, `[cloud]`, are not needed for checkpoints).

    checkpoint_names("s3://bucket/ray_results", "r50-a")      # ['checkpoint_2026-11-30_05-36-54.789035', ...]
    write_text(join(storage, run_name, ".placement_group"), group_id)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs

from pipeline.locations import first_line, is_url, join

CHECKPOINT_PREFIX = "checkpoint_"
__all__ = ["checkpoint_names", "exists", "join", "read_text", "remove", "write_text"]


@contextmanager
def _on(action: str, location: str) -> Iterator[tuple[pyarrow.fs.FileSystem, str]]:
    """The pyarrow filesystem and path of a storage URI; any failure becomes one ValueError line."""
    try:
        resolved = pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
        raise ValueError(f"cannot use {location}: {first_line(error)}") from None
    try:
        yield resolved
    except OSError as error:
        raise ValueError(f"cannot {action} {location}: {first_line(error)}") from None


def read_text(location: str | os.PathLike) -> str:
    if not is_url(location):
        return Path(location).expanduser().read_text()
    with _on("read", str(location)) as (filesystem, path), filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small file; parent directories are created (object stores have none to create)."""
    if not is_url(location):
        path = Path(location).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    with _on("write", str(location)) as (filesystem, path):
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(path) as stream:
            stream.write(text.encode("utf-8"))


def exists(location: str | os.PathLike) -> bool:
    if not is_url(location):
        return Path(location).expanduser().is_file()
    with _on("reach", str(location)) as (filesystem, path):
        return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File


def remove(location: str | os.PathLike) -> None:
    if not is_url(location):
        Path(location).expanduser().unlink(missing_ok=True)
        return
    with _on("remove", str(location)) as (filesystem, path):
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.File:
            filesystem.delete_file(path)


def checkpoint_names(storage_path: str | os.PathLike, run_name: str) -> list[str]:
    """The run's checkpoint directory names, sorted by name (a listing, not a glob: names are taken literally)."""
    run_dir = join(storage_path, run_name)
    if not is_url(run_dir):
        directory = Path(run_dir).expanduser()
        names = [entry.name for entry in directory.iterdir() if entry.is_dir()] if directory.is_dir() else []
    else:
        with _on("list", run_dir) as (filesystem, path):
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        names = [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]
    return sorted(name for name in names if name.startswith(CHECKPOINT_PREFIX))
