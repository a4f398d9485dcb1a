"""Where a run came from: who ran which command from which commit (MLflow's own source tags, plus the Ray job id
and whether the tree had uncommitted changes), and the one-paragraph Description of a training run."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys

from pipeline.config import PROJECT_ROOT, Config
from pipeline.tracking.uri import redact

GIT_DIRTY_TAG = "pipeline.git_dirty"  # MLflow names the commit, not whether the tree had uncommitted changes
RAY_JOB_TAG = "ray.job_id"
# MLflow's own names: its runs table (Source, User, Version columns) and its UI read these.
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"
GIT_COMMIT_TAG, USER_TAG = "mlflow.source.git.commit", "mlflow.user"
NOTE_TAG = "mlflow.note.content"  # the run page's Description


def training_note(config: Config) -> dict[str, str]:
    """A training run's Description on its MLflow page, as a tag for `start_or_resume_run`'s extra_tags."""
    validated = "validated on val" if config.data.validates else "no validation split (a refit)"
    note = (
        f"{config.model.name} trained on {'+'.join(config.data.fit_splits)} of {redact(config.data.root)} "
        f"({validated}): {config.optim.optimizer} lr {config.optim.lr:g}, global batch {config.optim.batch_size}, "
        f"up to {config.optim.epochs} epochs on {config.scaling.world_size} worker(s). Command: "
        f"{entrypoint_name()}."
    )
    return {NOTE_TAG: note}


def source_tags() -> dict[str, str]:
    """Who ran what, from which commit, under MLflow's own tag names (plus the Ray job id when there is one)."""
    job = ray_job_tags()
    tags = {SOURCE_NAME_TAG: entrypoint_name(), SOURCE_TYPE_TAG: "JOB" if job else "LOCAL", USER_TAG: user_name()}
    return {**tags, **git_tags(), **job}


def entrypoint_name(argv: list[str] | None = None) -> str:
    """`imagenet-pipeline train`, or the script's path inside the project (`jobs/train.py`)."""
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else ""
    if program == "-c":
        return "python -c"
    if program == "imagenet-pipeline" or program == "__main__.py":
        command = next((arg for arg in argv[1:] if not arg.startswith("-")), "")
        return f"imagenet-pipeline {command}".strip()
    try:
        return os.path.relpath(os.path.abspath(argv[0]), PROJECT_ROOT) if argv else "unknown"
    except ValueError:  # another drive (Windows)
        return program or "unknown"


def user_name() -> str:
    """The submitter, not the cluster's service account: `job submit` passes it as PIPELINE_USER."""
    try:
        return os.environ.get("PIPELINE_USER") or getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return "unknown"


def git_state() -> tuple[str, str] | None:
    """(commit, dirty "true"/"false") of the code. A Ray job's uploaded working directory has no .git
    (.rayignore), so `imagenet-pipeline job submit` passes the submitter's as PIPELINE_GIT_COMMIT / _DIRTY."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"], os.environ.get("PIPELINE_GIT_DIRTY", "unknown")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, str(dirty).lower()) if commit else None


def git_tags() -> dict[str, str]:
    state = git_state()
    return {GIT_COMMIT_TAG: state[0], GIT_DIRTY_TAG: state[1]} if state else {}


def job_environment() -> dict[str, str]:
    """What a submitted Ray job needs to tag its runs as the submitter's: commit, dirty flag, user."""
    state = git_state()
    env = {"PIPELINE_USER": user_name()}
    if state:
        env.update(PIPELINE_GIT_COMMIT=state[0], PIPELINE_GIT_DIRTY=state[1])
    return env


def ray_job_tags() -> dict[str, str]:
    """The Ray job id (`ray job submit`'s submission id) when this driver runs as a Ray job."""
    # The job supervisor hands the entrypoint its metadata, submission id included, in this variable.
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        metadata = {}
    job_id = metadata.get("job_submission_id") or os.environ.get("RAY_JOB_SUBMISSION_ID")
    return {RAY_JOB_TAG: job_id} if job_id else {}
