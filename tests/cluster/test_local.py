"""A real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`), token auth on,
an MLflow server beside it, and the training job submitted with the real `ray job submit` CLI.

One cluster serves the whole module and is stopped at the end even when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cluster.jobs import resolve_address, wait
from pipeline.cluster.local import LocalCluster
from pipeline.config import PROJECT_ROOT
from pipeline.tracking.runs import RUN_NAME_TAG, WORKER_NODES_TAG

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RAY = str(Path(sys.executable).parent / "ray")
PIPELINE = str(Path(sys.executable).parent / "imagenet-pipeline")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = LocalCluster.start(tmp_path_factory.mktemp("cluster"), nodes=2, cpus_per_node=1)
    try:
        yield started
    finally:
        started.stop()


def client_env(cluster: LocalCluster, with_token: bool = True) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    if with_token:
        return {**env, **cluster.client_env()}
    # No token anywhere Ray looks: not in the environment, not in ~/.ray/auth_token.
    return {**env, "RAY_AUTH_MODE": "token", "HOME": str(Path(cluster.state_dir) / "no-home")}


def test_the_job_server_refuses_a_client_without_the_token(cluster):
    done = subprocess.run(
        [RAY, "job", "list", "--address", cluster.dashboard_url],
        env=client_env(cluster, with_token=False),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Authentication" in done.stdout + done.stderr or "Unauthorized" in done.stdout + done.stderr


def test_a_training_job_submitted_with_ray_job_submit_runs_on_both_nodes_and_lands_in_mlflow(cluster, tiny_shards):
    run_name = "cluster-test-run"
    storage = Path(cluster.state_dir) / "ray_results"  # one path every node reaches, as NFS would be
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        run_name,
        "--working-dir",
        str(PROJECT_ROOT),
        "--",
        "python",
        "-m",
        "jobs.train",
        "-c",
        "jobs/configs/demo.yaml",
        "--set",
        f"data.root={tiny_shards}",
        "--set",
        "data.train_image_size=32",
        "--set",
        "data.eval_image_size=32",
        "--set",
        "data.loader_workers=0",
        "--set",
        "optim.batch_size=8",
        "--set",
        "optim.epochs=1",
        "--set",
        f"tracking.storage_path={storage}",
        "--set",
        f"tracking.run_name={run_name}",
        "--set",
        "tracking.experiment=cluster-test",
        "--set",
        "tracking.registered_model=cluster-test-model",
    ]
    done = subprocess.run(
        command, env=client_env(cluster), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr

    # The job found the cluster's MLflow server through the nodes' MLFLOW_TRACKING_URI, as pods get it in infra/.
    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name("cluster-test")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags.get("ray.job_id") == run_name
    assert client.search_model_versions(f"name = 'cluster-test-model' and run_id = '{run.info.run_id}'")
    workers = run.data.tags[WORKER_NODES_TAG].split(",")
    assert len(workers) == 2 and set(workers) == cluster.alive_node_ids()  # rank 0 on one node, rank 1 on the other
    assert list(storage.glob(f"{run_name}/checkpoint_*/state.pt"))


def test_a_sweep_on_uri_storage_runs_its_trials_side_by_side_one_per_node(cluster, tiny_shards):
    # 2 trials x 1 worker of 1 CPU on 2 nodes of 1 CPU: they fit only if the trial drivers take no CPU.
    command = [
        PIPELINE,
        "job",
        "submit",
        "--submission-id",
        "cluster-sweep",
        "--",
        "python",
        "-m",
        "jobs.tune",
        "-c",
        "jobs/configs/demo.yaml",
        "-c",
        "jobs/configs/demo_sweep.yaml",
        "--set",
        f"data.root={tiny_shards}",
        "--set",
        "data.train_image_size=32",
        "--set",
        "data.eval_image_size=32",
        "--set",
        "data.loader_workers=0",
        "--set",
        "optim.epochs=1",
        "--set",
        "search.num_samples=2",
        "--set",
        "search.max_concurrent_trials=2",
        "--set",
        "search.space={optim.lr: {kind: loguniform, low: 0.01, high: 1.0}}",
        # A storage URI, as s3:// or gs:// would be: Ray writes through pyarrow, the driver reads back through
        # fsspec (placement-group notes) and downloads the best checkpoint to register it.
        "--set",
        "optim.batch_size=8",
        "--set",
        f"tracking.storage_path=file://{Path(cluster.state_dir) / 'uri_results'}",
        "--set",
        "tracking.run_name=cluster-sweep",
        "--set",
        "tracking.experiment=cluster-sweep",
        "--set",
        "tracking.registered_model=cluster-sweep-model",
    ]
    done = subprocess.run(
        command, env=client_env(cluster), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    client = MlflowClient(cluster.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("cluster-sweep").experiment_id])
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId")]
    # A trial ASHA stopped is KILLED; one that trained every epoch is FINISHED even when Tune stopped its driver
    # at max_t before the driver closed the run (seen in CI); none may fail or be left RUNNING.
    assert len(trials) == 2 and all(run.info.status in {"FINISHED", "KILLED"} for run in trials)
    nodes = {run.data.tags[WORKER_NODES_TAG] for run in trials}
    assert nodes == cluster.alive_node_ids()  # both at once, so one on each node
    assert client.search_model_versions("name = 'cluster-sweep-model'")
    results = Path(cluster.state_dir) / "uri_results"
    assert len(list(results.glob("cluster-sweep-*/checkpoint_*/state.pt"))) >= 2
    # No placement-group note is left on the URI storage: the sweep reads, frees and removes each one.
    assert list(results.glob("cluster-sweep-*")) and not list(results.glob("cluster-sweep-*/.placement_group"))


def test_job_commands_pass_the_token_and_the_tracking_uri(cluster, tmp_path):
    entry = (
        "import os; print('uri=' + os.environ['MLFLOW_TRACKING_URI'], "
        "'commit=' + os.environ.get('PIPELINE_GIT_COMMIT', '-'))"
    )
    env = client_env(cluster)
    submit = subprocess.run(
        [
            PIPELINE,
            "job",
            "submit",
            "--submission-id",
            "env-check",
            "--mlflow-uri",
            "http://mlflow.example:5000",
            "--",
            "python",
            "-c",
            entry,
        ],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    assert "uri=http://mlflow.example:5000" in submit.stdout  # the submitter's URI, not the cluster's default
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert f"commit={commit}" in submit.stdout  # the uploaded copy has no .git: the submitter passes its commit
    assert "job env-check SUCCEEDED" in submit.stdout

    listed = subprocess.run([PIPELINE, "job", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "env-check" in listed.stdout and "SUCCEEDED" in listed.stdout

    logs = subprocess.run([PIPELINE, "job", "logs", "env-check"], env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "uri=http://mlflow.example:5000" in logs.stdout

    sleeper = subprocess.run(
        [
            PIPELINE,
            "job",
            "submit",
            "--submission-id",
            "sleeper",
            "--no-wait",
            "--",
            "python",
            "-c",
            "import time; time.sleep(300)",
        ],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sleeper.returncode == 0, sleeper.stderr
    stopped = subprocess.run([PIPELINE, "job", "stop", "sleeper"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "sleeper stopping" in stopped.stdout
    assert (
        wait(resolve_address(cluster.dashboard_url, cluster.token_path), "sleeper", timeout_seconds=60).value
        == "STOPPED"
    )

    missing = subprocess.run(
        [PIPELINE, "job", "status", "no-such-job"], env=env, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no-such-job" in missing.stderr


def test_stopping_the_cluster_leaves_no_process_behind(cluster):
    """Last in this module: it stops the shared 2-node cluster (the fixture's own stop then finds nothing)."""
    assert len(cluster.alive_node_ids()) == 2
    cluster.stop()
    leftovers = [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if any(cluster.temp_dir in part for part in process.info["cmdline"] or [])
    ]
    assert leftovers == [] and cluster.mlflow_server() is None
    assert LocalCluster.load(Path(cluster.state_dir)) is None
