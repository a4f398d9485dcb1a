"""Submit, follow, stop and list Ray jobs on a cluster, with the auth token and the MLflow URI passed along.

    imagenet-pipeline job submit -- python -m jobs.train -c jobs/configs/resnet50_imagenet.yaml
    imagenet-pipeline job logs raysubmit_XYZ --follow
    imagenet-pipeline job stop raysubmit_XYZ
    imagenet-pipeline job list

The same as `ray job submit --working-dir . -- ...` (Ray's JobSubmissionClient), plus what a job of this
project needs and `ray job submit` leaves to the user: the token header for a token-auth cluster, the
MLflow tracking URI in the job's environment (a job's default SQLite file would otherwise be created in
Ray's temporary copy of the working directory and vanish with it), and the client's git commit (the
uploaded copy has no .git). Credentials for MLflow are not forwarded: a runtime_env is readable in the
dashboard, so they belong in the cluster's environment (a Kubernetes secret).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.config import PROJECT_ROOT
from pipeline.errors import JobError, first_line
from pipeline.tracking.runs import job_environment
from pipeline.tracking.uri import pin_sqlite_uri

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
log = logging.getLogger(__name__)


class JobClientError(JobError):
    """A bad address, a missing token, an unusable tracking URI: one line naming the problem."""


@dataclass(frozen=True)
class ClusterAddress:
    dashboard_url: str  # http(s)://host:port of the head's dashboard / job server
    token: str | None = field(repr=False)  # Ray auth token, sent as a bearer header; never printed

    @property
    def is_local(self) -> bool:
        return urlparse(self.dashboard_url).hostname in LOCAL_HOSTS

    def client(self) -> JobSubmissionClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            return JobSubmissionClient(self.dashboard_url, headers=headers)
        except ConnectionError as error:
            raise JobClientError(
                f"cannot reach the Ray job server at {self.dashboard_url}: {first_line(error, with_type=False)}"
            ) from None
        except Exception as error:  # Ray raises AuthenticationError/RuntimeError with long, multi-line texts
            raise JobClientError(
                f"Ray job server at {self.dashboard_url}: {first_line(error, with_type=False)}"
            ) from None


def resolve_address(address: str | None = None, token_file: Path | None = None) -> ClusterAddress:
    """The job server: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is an http(s) URL
    (it usually holds a GCS address, host:6379, which is not the job server), else localhost:8265."""
    from_ray_address = os.environ.get("RAY_ADDRESS", "")
    usable = from_ray_address if from_ray_address.startswith(("http://", "https://")) else None
    url = address or os.environ.get("RAY_API_SERVER_ADDRESS") or usable or DEFAULT_ADDRESS
    if from_ray_address and not usable and not address and not os.environ.get("RAY_API_SERVER_ADDRESS"):
        log.warning(
            "RAY_ADDRESS=%s is not a job server (http://<head>:8265); using %s — set "
            "RAY_API_SERVER_ADDRESS or --address",
            from_ray_address,
            url,
        )
    if "://" not in url:
        url = f"http://{url}"
    if urlparse(url).scheme not in {"http", "https"}:
        raise JobClientError(
            f"address '{url}': jobs are submitted to the dashboard's HTTP address (http://<head>:8265), not a GCS or "
            "ray:// address"
        )
    cluster = ClusterAddress(url.rstrip("/"), read_token(token_file))
    if cluster.token and url.startswith("http://") and not cluster.is_local:
        # The token lets its holder run any code on the cluster; plain http shows it to the network.
        log.warning(
            "sending the Ray auth token to %s over plain http; reach the head through `kubectl "
            "port-forward` or an SSH tunnel (`ray dashboard`), or use https",
            cluster.dashboard_url,
        )
    return cluster


def read_token(token_file: Path | None = None) -> str | None:
    """Ray's own lookup order: a given file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token_file is not None:
        if not token_file.is_file():
            raise JobClientError(
                f"--token-file '{token_file}': no such file (create one with `ray get-auth-token --generate`)"
            )
        return token_file.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else None


def job_tracking_uri(cluster: ClusterAddress, tracking_uri: str | None) -> str | None:
    """The MLflow URI a job should use; None (the default) leaves it to the cluster's own MLFLOW_TRACKING_URI.

    Only an explicit --mlflow-uri is forwarded, never this shell's $MLFLOW_TRACKING_URI: that often names a
    port-forward (http://127.0.0.1:5000) which means nothing on the cluster and would override the pods' URI.
    """
    if not tracking_uri:
        return None
    uri = pin_sqlite_uri(tracking_uri)  # not the job's temporary copy of the project
    if not cluster.is_local and not uri.startswith(("http://", "https://", "databricks")):
        raise JobClientError(
            f"--mlflow-uri '{uri}' is a file on this machine, which the cluster at {cluster.dashboard_url} cannot "
            "reach; pass an MLflow server (--mlflow-uri http://mlflow:5000) or leave it to the cluster's "
            "MLFLOW_TRACKING_URI"
        )
    return uri


def submit(
    cluster: ClusterAddress,
    entrypoint: list[str],
    *,
    working_dir: Path = PROJECT_ROOT,
    tracking_uri: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float = 0,
    entrypoint_num_gpus: float = 0,
) -> str:
    """Upload `working_dir` (minus .gitignore/.rayignore entries) and start `entrypoint`; returns the job id."""
    if not entrypoint:
        raise JobClientError(
            "no entrypoint: put the command after `--`, e.g. -- python -m jobs.train -c jobs/configs/demo.yaml"
        )
    if not working_dir.is_dir():
        raise JobClientError(f"--working-dir '{working_dir}': no such directory")
    env_vars = job_environment()
    uri = job_tracking_uri(cluster, tracking_uri)
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    runtime_env = {"working_dir": str(working_dir), "env_vars": env_vars}
    try:
        return cluster.client().submit_job(
            entrypoint=shlex.join(entrypoint),
            runtime_env=runtime_env,
            submission_id=submission_id,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )
    except RuntimeError as error:
        raise JobClientError(
            f"submitting to {cluster.dashboard_url} failed: {first_line(error, with_type=False)}"
        ) from None


def follow(cluster: ClusterAddress, job_id: str, out: TextIO = sys.stdout, poll_seconds: float = 1.0) -> JobStatus:
    """Stream the job's logs until it ends; returns its final status."""
    client = cluster.client()

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(stream())
    except Exception as error:  # a dropped log socket must not lose the job's final status
        out.write(f"[log stream ended: {first_line(error, with_type=False)}]\n")
    return wait(cluster, job_id, poll_seconds=poll_seconds)


def wait(
    cluster: ClusterAddress, job_id: str, timeout_seconds: float | None = None, poll_seconds: float = 1.0
) -> JobStatus:
    client = cluster.client()
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    while (status := client.get_job_status(job_id)) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)
    return status


def stop(cluster: ClusterAddress, job_id: str) -> bool:
    return cluster.client().stop_job(job_id)


def list_jobs(cluster: ClusterAddress) -> list[dict[str, str]]:
    rows = []
    for job in sorted(cluster.client().list_jobs(), key=lambda job: job.start_time or 0, reverse=True):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else ""
        rows.append(
            {
                "id": job.submission_id or job.job_id or "",
                "status": str(job.status.value),
                "started": started,
                "entrypoint": job.entrypoint,
            }
        )
    return rows
