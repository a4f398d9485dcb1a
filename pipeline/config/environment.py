"""What a config needs from where it runs, checked before any worker starts: the shards exist, a path does not
lie inside a Ray job's copy of the code, and Ray waits long enough for workers to import torch."""

from __future__ import annotations

from pathlib import Path

from pipeline import storage
from pipeline.config.schema import Config
from pipeline.errors import ConfigError

# Ray Train gives a worker group 60 s to start; on a busy machine importing torch in fresh worker
# processes can take longer, and a timed-out start is retried in a loop. Raised on Ray we start (driver
# environment, local cluster nodes) unless already set.
WORKER_GROUP_START_TIMEOUT_S = "300"

# Under `ray job submit --working-dir`, the job runs in Ray's copy of the working directory, which holds
# neither data/ (.gitignore) nor anything else the relative path was meant to reach.
RAY_WORKING_DIR_MARK = "/runtime_resources/working_dir_files/"
RAY_JOB_COPY_HINT = (
    "this Ray job runs in Ray's copy of the working directory, where relative paths land and data/ "
    "is not uploaded; give an absolute path every node reaches (NFS) or a URL (s3://, gs://)"
)


def refuse_job_copy(key: str, value: str, problem: str) -> None:
    """One check for every location a job resolves: inside Ray's working-dir copy it is lost or was never there."""
    if RAY_WORKING_DIR_MARK in value:
        raise ConfigError(f"{key} = '{value}': {problem}; {RAY_JOB_COPY_HINT}")


def require_shards(config: Config, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Fail before any worker starts when the configured shard splits are missing."""
    root = config.data.root
    # Object stores have no directories, only keys: for a URL the manifests are the whole check.
    if not storage.is_url(root) and not Path(root).expanduser().is_dir():
        refuse_job_copy("data.root", root, "directory does not exist")
        raise ConfigError(
            f"data.root = '{root}': directory does not exist; create shards with `imagenet-pipeline shard` "
            "or point data.root at a folder holding train/ val/ test/"
        )
    for split in splits:
        if not storage.is_file(storage.join(root, split, "manifest.json")):
            raise ConfigError(
                f"data.root = '{root}': no {split}/manifest.json; shard the data or run `imagenet-pipeline index`"
            )
