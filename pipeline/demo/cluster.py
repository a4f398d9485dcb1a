"""`make cluster-demo`: the path a cluster user takes, on this machine.

    imagenet-pipeline cluster demo      # or: make cluster-demo; stop with: make cluster-down

Steps: the demo data (generated, sharded, verified; kept when complete) -> a 2-node Ray cluster with token
auth and an MLflow server (`imagenet-pipeline cluster up`; reused if running) -> the training job submitted
with the real `ray job submit` CLI -> checks that the job SUCCEEDED, its MLflow run finished, a model version
was registered and the workers ran on both nodes -> the dashboard and MLflow UI addresses. The cluster keeps
running so both UIs can be explored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.cluster.jobs import resolve_address, wait
from pipeline.cluster.local import LocalCluster
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.demo.local import prepare_demo_data
from pipeline.tracking.models import versions_logged_by
from pipeline.tracking.runs import WORKER_NODES_TAG, find_run_in

DEMO_CONFIG = "jobs/configs/demo.yaml"
EXPERIMENT = "cluster-demo"


@dataclass
class ClusterRunCheck:
    run_status: str | None
    model_version: str | None
    worker_nodes: list[str]

    def problems(self, expected_nodes: int) -> list[str]:
        found = []
        if self.run_status != "FINISHED":
            found.append(f"MLflow run status {self.run_status}, expected FINISHED")
        if self.model_version is None:
            found.append("no model version registered from the run")
        if len(set(self.worker_nodes)) < expected_nodes:
            found.append(f"workers ran on {len(set(self.worker_nodes))} node(s), expected {expected_nodes}")
        return found


def run_cluster_demo(state_dir: Path, data_dir: Path) -> bool:
    config = load_config([PROJECT_ROOT / DEMO_CONFIG], [f"data.root={data_dir / 'shards'}"])
    if not prepare_demo_data(config, data_dir):
        typer.echo("\ncluster demo FAILED: the shards did not verify")
        return False
    typer.echo(f"\n== cluster [{time.strftime('%H:%M:%S')}]")
    cluster = LocalCluster.load(state_dir)
    if cluster is None:
        cluster = LocalCluster.start(state_dir, nodes=2, cpus_per_node=1)
        typer.echo(f"  started 2 nodes, 1 CPU each, from {state_dir}")
    else:
        typer.echo(f"  reusing the cluster running from {state_dir}")

    run_name = f"cluster-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    entrypoint = [
        "python",
        "-m",
        "jobs.train",
        "-c",
        DEMO_CONFIG,
        # Absolute: the job runs in Ray's copy of the working directory, where data/ is not uploaded.
        "--set",
        f"data.root={data_dir / 'shards'}",
        "--set",
        f"tracking.storage_path={Path(cluster.state_dir) / 'ray_results'}",  # every node reaches it
        "--set",
        f"tracking.run_name={run_name}",
        "--set",
        f"tracking.experiment={EXPERIMENT}",
    ]
    typer.echo(f"\n== ray job submit [{time.strftime('%H:%M:%S')}]")
    status = submit_with_ray_cli(cluster, entrypoint, submission_id=run_name)
    check = check_cluster_run(cluster.mlflow_uri, EXPERIMENT, run_name, config.tracking.registered_model)
    problems = ([] if status == "SUCCEEDED" else [f"job {run_name} {status}"]) + check.problems(cluster.nodes)
    typer.echo(f"\n== result [{time.strftime('%H:%M:%S')}]")
    typer.echo(
        f"  job {run_name}: {status}; MLflow run {check.run_status}; model version {check.model_version}; "
        f"workers on {len(set(check.worker_nodes))} node(s)"
    )
    for problem in problems:
        typer.echo(f"  FAILED: {problem}")
    typer.echo("\n".join(cluster.describe()))
    return not problems


def submit_with_ray_cli(cluster: LocalCluster, entrypoint: list[str], submission_id: str) -> str:
    """`ray job submit` exactly as a user types it, with the cluster's token in the environment; final status."""
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(PROJECT_ROOT),
        "--",
        *entrypoint,
    ]
    typer.echo("  " + " ".join(command[1:]))
    done = subprocess.run(command, env={**os.environ, **cluster.client_env()}, cwd=PROJECT_ROOT, check=False)
    try:  # `ray job submit` exits non-zero both when the job fails and when it never started: ask the server
        return wait(resolve_address(cluster.dashboard_url, cluster.token_path), submission_id, timeout_seconds=60).value
    except RuntimeError:
        return f"not submitted (`ray job submit` exited with {done.returncode})"


def check_cluster_run(mlflow_uri: str, experiment: str, run_name: str, registered_model: str) -> ClusterRunCheck:
    """What the job left in MLflow: its run's status, the model version logged from it, the workers' nodes."""
    run = find_run_in(mlflow_uri, experiment, run_name)
    if run is None:
        return ClusterRunCheck(None, None, [])
    versions = versions_logged_by(mlflow_uri, registered_model, run.info.run_id)
    nodes = run.data.tags.get(WORKER_NODES_TAG, "")
    return ClusterRunCheck(run.info.status, versions[0] if versions else None, nodes.split(",") if nodes else [])
