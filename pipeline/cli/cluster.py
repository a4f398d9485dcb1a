"""`imagenet-pipeline job ...` (any Ray cluster) and `imagenet-pipeline cluster ...` (a local one).

imagenet-pipeline job submit -- python -m jobs.train -c jobs/configs/resnet50_imagenet.yaml
imagenet-pipeline job logs raysubmit_XYZ --follow
imagenet-pipeline cluster up --nodes 2      # token auth on, MLflow server beside it
imagenet-pipeline cluster demo              # make cluster-demo
imagenet-pipeline cluster down
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from pipeline.cli.common import PipelineTyper, fail
from pipeline.config import PROJECT_ROOT

job_app = PipelineTyper(
    no_args_is_help=True, help="Submit, follow, stop and list jobs on a Ray cluster (token auth aware)."
)
cluster_app = PipelineTyper(
    no_args_is_help=True, help="A real multi-node Ray cluster on this machine, for trying cluster jobs."
)

Address = Annotated[
    Optional[str],
    typer.Option(
        help="job server: http://<head>:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else http://127.0.0.1:8265)"
    ),
]
TokenFile = Annotated[
    Optional[Path],
    typer.Option(help="Ray auth token file (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)"),
]
StateDir = Annotated[Path, typer.Option(help="the local cluster's token, MLflow store and checkpoints")]
DEFAULT_STATE_DIR = Path(".cluster")


@contextmanager
def _one_line_errors():
    """Ray's job client raises RuntimeError with the server's whole response (a missing job, a bad token)."""
    from pipeline.cluster.jobs import JobClientError
    from pipeline.errors import first_line

    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, typer.Exit):
        raise  # typer's own exits (an inner `fail`) are RuntimeErrors too: not errors to reword
    except (JobClientError, RuntimeError, ConnectionError) as error:
        fail(first_line(error, with_type=False))


def _cluster(address: str | None, token_file: Path | None):
    from pipeline.cluster.jobs import resolve_address

    with _one_line_errors():
        return resolve_address(address, token_file)


@job_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def job_submit(
    context: typer.Context,
    address: Address = None,
    token_file: TokenFile = None,
    mlflow_uri: Annotated[
        Optional[str],
        typer.Option(help="MLflow tracking URI for the job (default: the cluster's own MLFLOW_TRACKING_URI)"),
    ] = None,
    entrypoint_num_cpus: Annotated[
        float,
        typer.Option(min=0, help="CPUs reserved for the driver: > 0 places it on a worker node, e.g. for `jobs.shard`"),
    ] = 0,
    entrypoint_num_gpus: Annotated[
        float, typer.Option(min=0, help="GPUs reserved for the driver, e.g. for `jobs.evaluate` on a GPU node")
    ] = 0,
    working_dir: Annotated[
        Path, typer.Option(help="uploaded as the job's working directory (.gitignore and .rayignore apply)")
    ] = PROJECT_ROOT,
    submission_id: Annotated[Optional[str], typer.Option(help="job id to use (default: Ray picks one)")] = None,
    wait: Annotated[bool, typer.Option(help="follow the logs until the job ends; exit 1 unless it SUCCEEDED")] = True,
) -> None:
    """Upload the project and run the command after `--` on the cluster, e.g. `-- python -m jobs.train -c ...`."""
    from pipeline.cluster.jobs import JobClientError, follow, submit

    cluster = _cluster(address, token_file)
    try:
        job_id = submit(
            cluster,
            list(context.args),
            working_dir=working_dir,
            tracking_uri=mlflow_uri,
            submission_id=submission_id,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )
    except JobClientError as error:
        fail(str(error))
    typer.echo(f"submitted {job_id} to {cluster.dashboard_url}")
    if not wait:
        typer.echo(f"follow it with: imagenet-pipeline job logs {job_id} --follow")
        return
    try:
        status = follow(cluster, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the job keeps running. Stop it with: imagenet-pipeline job stop {job_id}")
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id} {status.value}")
    raise typer.Exit(0 if status.value == "SUCCEEDED" else 1)


@job_app.command("logs")
def job_logs(
    job_id: str,
    address: Address = None,
    token_file: TokenFile = None,
    follow_logs: Annotated[
        bool, typer.Option("--follow", "-f", help="stream until the job ends (default: print and exit)")
    ] = False,
) -> None:
    """Print a job's driver logs."""
    from pipeline.cluster.jobs import follow

    cluster = _cluster(address, token_file)
    with _one_line_errors():
        if follow_logs:
            status = follow(cluster, job_id)
            typer.echo(f"job {job_id} {status.value}")
        else:
            typer.echo(cluster.client().get_job_logs(job_id), nl=False)


@job_app.command("status")
def job_status(job_id: str, address: Address = None, token_file: TokenFile = None) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    with _one_line_errors():
        typer.echo(_cluster(address, token_file).client().get_job_status(job_id).value)


@job_app.command("stop")
def job_stop(job_id: str, address: Address = None, token_file: TokenFile = None) -> None:
    """Ask a running job to stop (its checkpoints stay; resubmit with the same run name to resume)."""
    from pipeline.cluster.jobs import stop

    with _one_line_errors():
        stopped = stop(_cluster(address, token_file), job_id)
    typer.echo(f"job {job_id} {'stopping' if stopped else 'was not running'}")


@job_app.command("list")
def job_list(address: Address = None, token_file: TokenFile = None) -> None:
    """Jobs on the cluster, newest first."""
    from pipeline.cluster.jobs import list_jobs

    with _one_line_errors():
        rows = list_jobs(_cluster(address, token_file))
    for row in rows:
        typer.echo(f"{row['id']:<32} {row['status']:<10} {row['started']:<20} {row['entrypoint']}")


@cluster_app.command("up")
def cluster_up(
    nodes: Annotated[int, typer.Option(min=1, help="Ray nodes (raylets) to start: the head plus nodes-1")] = 2,
    cpus_per_node: Annotated[int, typer.Option(min=1, help="logical CPUs each node offers")] = 1,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Start a head and more nodes with token auth, plus an MLflow server; print how to reach them."""
    from pipeline.cluster.local import LocalCluster

    cluster = LocalCluster.start(state_dir, nodes=nodes, cpus_per_node=cpus_per_node)
    typer.echo("\n".join(cluster.describe()))


@cluster_app.command("down")
def cluster_down(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Stop the local cluster and its MLflow server (the MLflow store and checkpoints in the state dir stay)."""
    from pipeline.cluster.local import LocalCluster

    cluster = LocalCluster.load(state_dir)
    if cluster is None:
        typer.echo(f"no local cluster runs from {state_dir}")
        return
    cluster.stop()
    typer.echo(f"stopped the local cluster (dashboard was {cluster.dashboard_url})")


@cluster_app.command("demo")
def cluster_demo(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    data_dir: Annotated[Path, typer.Option(help="where the demo's generated images and shards go")] = Path("data/demo"),
) -> None:
    """`make cluster-demo`: a 2-node cluster, the demo data, `ray job submit` of training, checks, addresses."""
    from pipeline.demo.cluster import run_cluster_demo
    from pipeline.errors import first_line

    try:
        ok = run_cluster_demo(state_dir.absolute(), data_dir.absolute())
    except TimeoutError as error:  # the job or a node did not come up in time: the user's to look into
        fail(first_line(error, with_type=False))
    raise typer.Exit(0 if ok else 1)
