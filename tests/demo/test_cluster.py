"""`make cluster-demo`'s checks (pipeline/demo/cluster.py): what the job left in MLflow, and each way it can fall
short named. The whole demo starts a 2-node cluster; the same path is tested in tests/cluster/test_local.py."""

from __future__ import annotations

from pipeline.demo.cluster import ClusterRunCheck, check_cluster_run
from pipeline.tracking.runs import RUN_NAME_TAG, WORKER_NODES_TAG


def test_a_finished_run_with_a_model_on_every_node_has_no_problem():
    assert ClusterRunCheck("FINISHED", "3", ["node-a", "node-b"]).problems(expected_nodes=2) == []


def test_each_shortfall_is_named():
    check = ClusterRunCheck("FAILED", None, ["node-a", "node-a"])  # both ranks on one node
    assert check.problems(expected_nodes=2) == [
        "MLflow run status FAILED, expected FINISHED",
        "no model version registered from the run",
        "workers ran on 1 node(s), expected 2",
    ]


def test_the_check_reads_the_runs_status_version_and_worker_nodes_from_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert check_cluster_run(uri, "cluster-demo", "demo-1", "demo-model") == ClusterRunCheck(None, None, [])

    client = MlflowClient(uri)
    experiment = client.create_experiment("cluster-demo", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment, tags={RUN_NAME_TAG: "demo-1", WORKER_NODES_TAG: "node-a,node-b"})
    client.set_terminated(run.info.run_id, "FINISHED")
    client.create_registered_model("demo-model")
    client.create_model_version("demo-model", source=str(tmp_path / "model"), run_id=run.info.run_id)

    check = check_cluster_run(uri, "cluster-demo", "demo-1", "demo-model")
    assert check == ClusterRunCheck("FINISHED", "1", ["node-a", "node-b"])
    assert check.problems(expected_nodes=2) == []
    assert (
        check_cluster_run(uri, "cluster-demo", "demo-2", "demo-model")
        .problems(1)[0]
        .startswith("MLflow run status None")
    )
