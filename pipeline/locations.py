"""Where shards are read from: a local path (or NFS mount), or a URL on any fsspec filesystem.

`data.root` is either. Reading works from both; writing (shard, index) and verifying stay local: shard on a
machine with a disk, then upload (`aws s3 sync data/shards s3://bucket/imagenet`). With `data.shard_command`
set, every shard is streamed through webdataset's `pipe:` instead (e.g. `aws s3 cp {url} -`).

    join("s3://bucket/imagenet", "train")                    # 's3://bucket/imagenet/train'
    read_text(join(root, "train", "manifest.json"))          # local path or URL, through fsspec
    with open_shard(url, shard_command=None) as stream: ...  # a binary stream of one tar shard
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import IO, ContextManager

import fsspec

PIPE_PREFIX = "pipe:"  # webdataset's scheme for "run this shell command and read its stdout"
URL_PLACEHOLDER = "{url}"
_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://")
# pathlib collapses 's3://b/x' to 's3:/b/x': a CLI option typed as a Path arrives like that.
_COLLAPSED_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]+):/+")
# Protocols whose backend is in the project's `cloud` extra; others name their own package.
_CLOUD_EXTRA = {"s3", "s3a", "gs", "gcs"}
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


def shard_location(split_dir: str | os.PathLike, name: str) -> str:
    """A manifest's shard name under its split; a name that is already a URL or a `pipe:` stays as it is."""
    return name if is_url(name) or is_pipe(name) else join(split_dir, name)


def check_readable_protocol(url: str) -> None:
    """Fail early, in one line, when fsspec cannot read `url`: unknown protocol or its backend not installed."""
    protocol = _URL.match(url)["protocol"]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        raise ValueError(f"reading {protocol}:// needs the {_backend_package(protocol)} package: "
                         f"{_install_hint(protocol)}") from None
    except ValueError:
        raise ValueError(f"fsspec knows no {protocol}:// protocol; use a local or NFS path, or a URL such as "
                         "s3://, gs://, file:// (see fsspec's known_implementations)") from None


def check_shard_command(command: str) -> None:
    if URL_PLACEHOLDER not in command:
        raise ValueError(f"must contain {URL_PLACEHOLDER}, the shard to stream to stdout, "
                         "e.g. 'aws s3 cp {url} -' or 'gsutil cat {url}'")


def is_file(location: str | os.PathLike) -> bool:
    """True when `location` is an existing file; a store that cannot be reached is a one-line ValueError."""
    if not is_url(location):
        return Path(location).expanduser().is_file()
    try:
        filesystem, path = fsspec.core.url_to_fs(location)
        return filesystem.isfile(path)
    except Exception as error:  # noqa: BLE001 - credentials, network, permissions: all are the user's to fix
        raise ValueError(f"cannot reach {location}: {first_line(error)}") from None


def read_text(location: str | os.PathLike) -> str:
    if not is_url(location):
        return Path(location).expanduser().read_text()
    try:
        with fsspec.open(location, "rt", encoding="utf-8") as handle:
            return handle.read()
    except Exception as error:  # noqa: BLE001 - see is_file
        raise ValueError(f"cannot read {location}: {first_line(error)}") from None


def open_shard(location: str, shard_command: str | None = None) -> ContextManager[IO[bytes]]:
    """A binary stream of one shard, to use in a `with` block.

    `pipe:` names run as given; with `shard_command` every other shard is streamed by that command; otherwise a
    local path is opened directly and a URL through fsspec.
    """
    from webdataset.gopen import gopen  # here, not at the top: it imports torch, and config imports this module

    if is_pipe(location):
        return gopen(location, "rb")
    if shard_command is not None:
        return gopen(pipe_command(shard_command, location), "rb")
    if is_url(location):
        return fsspec.open(location, "rb")
    return open(Path(location).expanduser(), "rb")


def pipe_command(shard_command: str, location: str) -> str:
    """webdataset's `pipe:` URL for `shard_command` with `{url}` replaced by the shell-quoted location."""
    # str.replace, not str.format: a command may hold other braces (awk, jq) that are not placeholders.
    return PIPE_PREFIX + shard_command.replace(URL_PLACEHOLDER, shlex.quote(location))


def require_local(location: str | os.PathLike, what: str) -> Path:
    """`location` as a local Path; a URL is refused, because writing and verifying work on local files only."""
    text = os.fspath(location)
    if is_url(text) or _COLLAPSED_URL.match(text):
        shown = _COLLAPSED_URL.sub(r"\g<protocol>://", text)
        raise ValueError(f"{what} = '{shown}': only a local or NFS path works here; {UPLOAD_HINT}")
    return Path(text).expanduser()


def _backend_package(protocol: str) -> str:
    from fsspec.registry import known_implementations

    return known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]


def _install_hint(protocol: str) -> str:
    if protocol in _CLOUD_EXTRA:
        return "pip install 'imagenet-ray-pipeline[cloud]'"
    return f"pip install {_backend_package(protocol)}"


def first_line(error: BaseException, with_type: bool = True) -> str:
    """An exception as one line: libraries' messages run over many (Ray's carry whole server responses)."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text[0]}" if with_type else text[0]
