"""Small files the driver and workers keep beside a run's checkpoints, on whatever `tracking.storage_path` is.

Ray Train writes checkpoints through pyarrow's filesystems (local disk, NFS, s3://, gs://, ...), so this
module uses the same layer: whatever storage Ray can write to, these helpers can read and list, with no
extra package (the shard reader's fsspec backends, `[cloud]`, are not needed for checkpoints).

    checkpoint_names("s3://bucket/ray_results", "r50-a")      # ['checkpoint_2026-11-30_05-36-54.789035', ...]
    write_text(join(storage, run_name, ".placement_group"), group_id)
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs

CHECKPOINT_PREFIX = "checkpoint_"


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(base: str | os.PathLike, *names: str) -> str:
    return "/".join([str(base).rstrip("/"), *names]) if is_uri(base) else os.path.join(os.fspath(base), *names)


def _resolve(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
        raise ValueError(f"cannot use {location}: {_first_line(error)}") from None


def read_text(location: str | os.PathLike) -> str:
    if not is_uri(location):
        return Path(location).expanduser().read_text()
    filesystem, path = _resolve(str(location))
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode("utf-8")
    except OSError as error:
        raise ValueError(f"cannot read {location}: {_first_line(error)}") from None


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small file; parent directories are created (object stores have none to create)."""
    if not is_uri(location):
        path = Path(location).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    filesystem, path = _resolve(str(location))
    try:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(path) as stream:
            stream.write(text.encode("utf-8"))
    except OSError as error:
        raise ValueError(f"cannot write {location}: {_first_line(error)}") from None


def exists(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return Path(location).expanduser().is_file()
    filesystem, path = _resolve(str(location))
    try:
        return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File
    except OSError as error:
        raise ValueError(f"cannot reach {location}: {_first_line(error)}") from None


def remove(location: str | os.PathLike) -> None:
    if not is_uri(location):
        Path(location).expanduser().unlink(missing_ok=True)
        return
    filesystem, path = _resolve(str(location))
    try:
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.File:
            filesystem.delete_file(path)
    except OSError as error:
        raise ValueError(f"cannot remove {location}: {_first_line(error)}") from None


def checkpoint_names(storage_path: str | os.PathLike, run_name: str) -> list[str]:
    """The run's checkpoint directory names, sorted by name (a listing, not a glob: names are taken literally)."""
    run_dir = join(storage_path, run_name)
    if not is_uri(run_dir):
        directory = Path(run_dir).expanduser()
        names = [entry.name for entry in directory.iterdir() if entry.is_dir()] if directory.is_dir() else []
    else:
        filesystem, path = _resolve(run_dir)
        try:
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        except OSError as error:
            raise ValueError(f"cannot list {run_dir}: {_first_line(error)}") from None
        names = [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]
    return sorted(name for name in names if name.startswith(CHECKPOINT_PREFIX))


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
