"""Every location the project reads or writes: local paths (and NFS mounts), URLs, and `pipe:` streams.

`data.root` and `tracking.storage_path` are either a path or a URL; this module is the one place that tells
them apart (`is_url`) and reads, writes, lists or streams them. URLs go through fsspec; where fsspec's backend
for a scheme is not installed (s3fs, gcsfs) but pyarrow has one (pyarrow is what Ray Train writes checkpoints
with), pyarrow's filesystem is used through fsspec's wrapper, so checkpoint storage on s3:// or gs:// needs no
extra package. With `data.shard_command` set, every shard is streamed through that command instead (run as an
argument vector, never through a shell).

Writing shards (shard, index) and verifying stay local: shard on a machine with a disk, then upload
(`aws s3 sync data/shards s3://bucket/imagenet`).

    join("s3://bucket/imagenet", "train")                    # 's3://bucket/imagenet/train'
    read_text(join(root, "train", "manifest.json"))          # local path or URL
    with open_shard(url, shard_command=None) as stream: ...  # a binary stream of one tar shard
    checkpoint_names("s3://bucket/ray_results", "r50-a")      # ['checkpoint_2026-11-30_05-36-54.789035', ...]
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ContextManager

import fsspec

from pipeline.errors import StorageError, first_line

PIPE_PREFIX = "pipe:"  # webdataset's "run this shell command": refused wherever it appears in data
URL_PLACEHOLDER = "{url}"
CHECKPOINT_PREFIX = "checkpoint_"
_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://")
# pathlib collapses 's3://b/x' to 's3:/b/x': a CLI option typed as a Path arrives like that.
_COLLAPSED_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]+):/+")
# Protocols whose backend is in the project's `cloud` extra; others name their own package.
_CLOUD_EXTRA = {"s3", "s3a", "gs", "gcs"}
# Schemes pyarrow reads and writes itself (it is installed with Ray): the fallback when fsspec lacks a backend.
_PYARROW_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs"}
UPLOAD_HINT = "shard (and index, verify) locally, then upload, e.g. `aws s3 sync data/shards s3://bucket/shards`"


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and _URL.match(location) is not None


def is_pipe(location: str) -> bool:
    return location.startswith(PIPE_PREFIX)


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for a local path or a URL (URLs always use '/')."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return os.path.join(os.fspath(base), *names)


def absolute(location: str | os.PathLike) -> str:
    """A path pinned to the current directory (Ray workers run elsewhere); URLs are absolute already."""
    text = os.fspath(location)
    return text if is_url(text) else str(Path(text).expanduser().absolute())


def shard_location(split_dir: str | os.PathLike, name: str) -> str:
    """A manifest's shard name under its split; a URL (allowed by data.shard_url_schemes) stays as it is.

    Names were checked when the manifest was read (pipeline.data.manifest.check_shard_name): never a `pipe:`.
    """
    if is_pipe(name):
        raise StorageError(f"shard entry {name!r}: a pipe: command in a manifest is never run")
    return name if is_url(name) else join(split_dir, name)


def check_readable_protocol(url: str) -> None:
    """Fail early, in one line, when `url` cannot be read: unknown protocol or its backend not installed."""
    protocol = _URL.match(url)["protocol"]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        raise StorageError(
            f"reading {protocol}:// needs the {_backend_package(protocol)} package: {_install_hint(protocol)}"
        ) from None
    except ValueError:
        raise StorageError(
            f"fsspec knows no {protocol}:// protocol; use a local or NFS path, or a URL such as "
            "s3://, gs://, file:// (see fsspec's known_implementations)"
        ) from None


@contextmanager
def _on(action: str, location: str) -> Iterator[tuple[Any, str]]:
    """The filesystem and path of a URL; any failure (credentials, network, permissions) is one line."""
    try:
        filesystem, path = _filesystem(location)
    except StorageError:
        raise
    except Exception as error:  # an unknown scheme or a backend's own error: the user's to fix
        raise StorageError(f"cannot use {location}: {first_line(error)}") from None
    try:
        yield filesystem, path
    except (OSError, ValueError, RuntimeError) as error:  # fsspec backends raise all three for remote failures
        raise StorageError(f"cannot {action} {location}: {first_line(error)}") from None


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        if _URL.match(url)["protocol"] not in _PYARROW_SCHEMES:
            raise
    import pyarrow.fs
    from fsspec.implementations.arrow import ArrowFSWrapper

    filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
    return ArrowFSWrapper(filesystem), path


def is_file(location: str | os.PathLike) -> bool:
    """True when `location` is an existing file; a store that cannot be reached is a one-line StorageError."""
    if not is_url(location):
        return Path(location).expanduser().is_file()
    with _on("reach", str(location)) as (filesystem, path):
        return filesystem.isfile(path)


def read_text(location: str | os.PathLike) -> str:
    if not is_url(location):
        return Path(location).expanduser().read_text()
    with _on("read", str(location)) as (filesystem, path), filesystem.open(path, "rb") as handle:
        return handle.read().decode("utf-8")


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small file whole (`atomic_write` locally; an object store's put is whole already); parent
    directories are created (object stores have none to create)."""
    if not is_url(location):
        with atomic_write(location) as handle:
            handle.write(text.encode("utf-8"))
        return
    with _on("write", str(location)) as (filesystem, path):
        filesystem.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with filesystem.open(path, "wb") as handle:
            handle.write(text.encode("utf-8"))


@contextmanager
def atomic_write(location: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A local file written whole or not at all, the one way this project replaces a file others read.

    The block writes `<name>.partial` beside it, which is flushed to disk and renamed over `location` only when the
    block ends without an error (a rename within a folder is atomic on POSIX filesystems and NFS): a reader sees
    the old file or the new one, never half of one, and a crash leaves at most a `.partial` file behind. Files
    written one after another keep that order on disk (the folder is synced after each rename), so a file written
    last (a checkpoint's meta.json) marks the others complete.
    """
    path = Path(location).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    try:
        with partial.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass  # a filesystem whose folders cannot be synced (some network mounts); the rename is still atomic


def remove(location: str | os.PathLike) -> None:
    """Delete a small file; one that is already gone is not an error."""
    if not is_url(location):
        Path(location).expanduser().unlink(missing_ok=True)
        return
    with _on("remove", str(location)) as (filesystem, path):
        if filesystem.isfile(path):
            filesystem.rm_file(path)


def checkpoint_names(storage_path: str | os.PathLike, run_name: str) -> list[str]:
    """The run's checkpoint directory names, sorted by name (a listing, not a glob: names are taken literally)."""
    return checkpoint_folders(join(storage_path, run_name))


def checkpoint_folders(run_dir: str | os.PathLike) -> list[str]:
    """`checkpoint_names` of a run folder given whole (local path or URL)."""
    if not is_url(run_dir):
        directory = Path(run_dir).expanduser()
        names = [entry.name for entry in directory.iterdir() if entry.is_dir()] if directory.is_dir() else []
    else:
        with _on("list", run_dir) as (filesystem, path):
            entries = filesystem.ls(path, detail=True) if filesystem.isdir(path) else []
        names = [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory"]
    return sorted(name for name in names if name.startswith(CHECKPOINT_PREFIX))


def open_shard(location: str, shard_command: str | None = None) -> ContextManager[IO[bytes]]:
    """A binary stream of one shard, to use in a `with` block.

    With `shard_command` the shard is streamed by that command's stdout (its argument vector, no shell);
    otherwise a local path is opened directly and a URL through fsspec. A `pipe:` name is refused, never run.
    """
    if is_pipe(location):
        raise StorageError(f"shard {location!r}: a pipe: command from a manifest is never run")
    if shard_command is not None:
        return _command_stream(shard_argv(shard_command, location))
    if is_url(location):
        return fsspec.open(location, "rb")
    return open(Path(location).expanduser(), "rb")


def read_bytes(location: str | os.PathLike, limit: int | None = None, offset: int = 0) -> bytes:
    """The file's bytes (from `offset`); with `limit`, more than `limit` of them is a StorageError, found by
    reading at most `limit` + 1 bytes (so an oversized file from shared storage never fills memory)."""
    count = -1 if limit is None else limit + 1
    if not is_url(location):
        with Path(location).expanduser().open("rb") as handle:
            handle.seek(offset)
            data = handle.read(count)
    else:
        with _on("read", str(location)) as (filesystem, path), filesystem.open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(count)
    if limit is not None and len(data) > limit:
        raise StorageError(f"{location}: larger than the {limit} bytes expected")
    return data


def size(location: str | os.PathLike) -> int:
    """A file's size in bytes: a stat locally, the store's listing (a HEAD request) for a URL."""
    if not is_url(location):
        return Path(location).expanduser().stat().st_size
    with _on("reach", str(location)) as (filesystem, path):
        return int(filesystem.size(path))


RANGE_BLOCK = 8 << 20  # one ranged read: a segment is fetched in pieces of at most this, never past its end


@contextmanager
def open_range(location: str, offset: int, length: int) -> Iterator[IO[bytes]]:
    """`length` bytes of a file from `offset` as a stream, followed by a tar end-of-archive block (so a tar
    reader ends cleanly there): seeks on local files, exact ranged reads (`cat_file`) on object storage."""
    if is_pipe(location):
        raise StorageError(f"shard {location!r}: a pipe: command from a manifest is never run")
    if is_url(location):
        with _on("read", location) as (filesystem, path):
            yield _Window(lambda start, size: filesystem.cat_file(path, start=start, end=start + size), offset, length)
        return
    with open(Path(location).expanduser(), "rb") as handle:

        def fetch(start: int, size: int) -> bytes:
            handle.seek(start)
            return handle.read(size)

        yield _Window(fetch, offset, length)


class _Window(io.RawIOBase):
    """`length` bytes from `offset`, fetched RANGE_BLOCK at a time, then 1024 zero bytes (two empty tar blocks)."""

    def __init__(self, fetch, offset: int, length: int) -> None:
        self.fetch, self.position, self.left = fetch, offset, length
        self.buffer, self.used = memoryview(b""), 0
        self.tail = 1024

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.used == len(self.buffer) and self.left > 0:
            chunk = self.fetch(self.position, min(self.left, RANGE_BLOCK))
            self.left = self.left - len(chunk) if chunk else 0
            self.position += len(chunk)
            self.buffer, self.used = memoryview(chunk), 0
        if self.used < len(self.buffer):
            count = len(self.buffer) - self.used if size < 0 else min(size, len(self.buffer) - self.used)
            self.used += count
            return bytes(self.buffer[self.used - count : self.used])
        count = self.tail if size < 0 else min(size, self.tail)
        self.tail -= count
        return b"\0" * count

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def check_shard_command(command: str) -> list[str]:
    """`data.shard_command` split into an argument vector: exactly one argument is `{url}` and nothing else holds
    it, so a shard's location always becomes one whole argument and no string from data reaches a shell."""
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise StorageError(f"cannot be split into arguments ({error})") from None
    example = "e.g. 'aws s3 cp {url} -' or 'gsutil cat {url}'"
    if argv.count(URL_PLACEHOLDER) != 1 or sum(URL_PLACEHOLDER in arg for arg in argv) != 1:
        raise StorageError(
            f"must contain {URL_PLACEHOLDER} exactly once, as a whole argument of its own (it is "
            f"replaced by the shard's location and run without a shell), {example}"
        )
    if argv[0] == URL_PLACEHOLDER:
        raise StorageError(f"{URL_PLACEHOLDER} cannot be the program to run; {example}")
    return argv


def shard_argv(shard_command: str, location: str) -> list[str]:
    """The command's argument vector with the `{url}` argument replaced by `location`, verbatim."""
    return [location if arg == URL_PLACEHOLDER else arg for arg in check_shard_command(shard_command)]


@contextmanager
def _command_stream(argv: list[str]) -> Iterator[IO[bytes]]:
    """stdout of `argv`, run without a shell; the process is reaped (and killed if the reader stops early)."""
    import subprocess

    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    except OSError as error:
        raise StorageError(f"cannot run {argv[0]!r}: {error.strerror}") from None
    try:
        yield process.stdout
    finally:
        process.stdout.close()
        try:
            # A command read to its end may still be exiting: give it a moment to report its status. One stopped
            # early dies of SIGPIPE at its next write, or is killed here.
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Only a command that was read to its end and then failed is an error; one stopped early was killed by us
    # (SIGKILL) or by its closed pipe (SIGPIPE).
    if process.returncode not in (0, -signal.SIGKILL, -signal.SIGPIPE):
        raise StorageError(f"{shlex.join(argv)} exited with status {process.returncode}")


def require_local(location: str | os.PathLike, what: str) -> Path:
    """`location` as a local Path; a URL is refused, because writing and verifying work on local files only."""
    text = os.fspath(location)
    if is_url(text) or _COLLAPSED_URL.match(text):
        shown = _COLLAPSED_URL.sub(r"\g<protocol>://", text)
        raise StorageError(f"{what} = '{shown}': only a local or NFS path works here; {UPLOAD_HINT}")
    return Path(text).expanduser()


def _backend_package(protocol: str) -> str:
    from fsspec.registry import known_implementations

    return known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]


def _install_hint(protocol: str) -> str:
    if protocol in _CLOUD_EXTRA:
        return "pip install 'imagenet-ray-pipeline[cloud]'"
    return f"pip install {_backend_package(protocol)}"
