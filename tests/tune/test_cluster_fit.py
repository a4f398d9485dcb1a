"""Fitting a sweep to its cluster, from each node's resources: Ray Train places each worker whole on one node.
(The fit against a live Ray cluster, `fit_concurrency_to_cluster`, is tested with the sweeps in test_search.)"""

from pipeline.config import load_config
from pipeline.tune.cluster_fit import cluster_fit_problem, concurrent_trials, wait_for_room


def _config(*overrides: str):
    return load_config(overrides=list(overrides))


def test_workers_are_counted_per_node():
    gpu_nodes = [{"CPU": 44.0, "GPU": 4.0}, {"CPU": 44.0, "GPU": 4.0}]  # infra/kuberay's gpu group
    two_gpu_trials = _config(
        "scaling.use_gpu=true",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=11",
        "search.max_concurrent_trials=4",
    )
    assert cluster_fit_problem(two_gpu_trials, gpu_nodes) is None and concurrent_trials(two_gpu_trials, gpu_nodes) == 4
    # 8 CPUs in total, but no single node holds a 6-CPU worker.
    wide = _config(
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=6",
        "search.max_concurrent_trials=1",
    )
    assert "hold 0" in cluster_fit_problem(wide, [{"CPU": 4.0}, {"CPU": 4.0}])
    assert concurrent_trials(wide, [{"CPU": 4.0}, {"CPU": 4.0}]) == 0


def test_a_trial_too_big_for_any_node_is_refused_naming_what_one_worker_needs_and_what_the_nodes_hold():
    gpu_nodes = [{"CPU": 44.0, "GPU": 4.0}, {"CPU": 44.0, "GPU": 4.0}]
    # 8 GPUs in all hold four 2-GPU workers, but never one 8-GPU worker.
    two_gpu_workers = _config("scaling.use_gpu=true", "scaling.num_workers=1", "scaling.gpus_per_worker=2")
    assert concurrent_trials(two_gpu_workers, gpu_nodes) == 4
    eight_gpu_worker = _config("scaling.use_gpu=true", "scaling.num_workers=1", "scaling.gpus_per_worker=8")
    assert cluster_fit_problem(eight_gpu_worker, gpu_nodes) == (
        "scaling: one trial needs 1 workers of 1 CPU + 8 GPU each, but the cluster's 2 node(s) (88 CPU, 8 GPU) "
        "hold 0; lower scaling.num_workers or the per-worker resources"
    )


def test_a_local_mode_trial_never_waits_for_room():
    # num_workers=0 trains in the trial's own process: no Ray resources are asked for (and Ray is not touched).
    assert wait_for_room(_config("scaling.num_workers=0"), "abcde_00001") == 0.0
