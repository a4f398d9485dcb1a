"""Fitting a sweep to its cluster: how many trials the nodes place at once (Ray Train places each worker whole
on one node), why not even one fits, and a trial's wait for room before its trainer starts."""

from __future__ import annotations

import time

import ray

from pipeline.cluster.session import ensure_ray
from pipeline.config import Config, with_overrides
from pipeline.errors import ConfigError


def fit_concurrency_to_cluster(config: Config) -> Config:
    """The config with search.max_concurrent_trials lowered to what the cluster places at once (Tune keeps the
    other trials pending until one ends); a ConfigError if not even one trial fits."""
    ensure_ray()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = cluster_fit_problem(config, nodes)
    if problem:
        raise ConfigError(problem)
    room = concurrent_trials(config, nodes)
    if config.search.max_concurrent_trials <= room:
        return config
    print(
        f"search.max_concurrent_trials = {config.search.max_concurrent_trials}: the cluster places {room} "
        f"trial(s) of {config.scaling.world_size} workers at once; running {room} at a time, the others wait"
    )
    return with_overrides(config, {"search.max_concurrent_trials": room})


def _per_worker(config: Config) -> dict[str, float]:
    per_worker = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        per_worker["GPU"] = config.scaling.gpus_per_worker
    return per_worker


def _worker_slots(config: Config, nodes: list[dict[str, float]]) -> int:
    """Workers the nodes hold. Ray Train places each worker whole on one node, so a cluster of 2 nodes x 4 GPUs
    holds four 2-GPU workers, not one 8-GPU worker; the count is per node, then summed."""
    per_worker = _per_worker(config)
    return sum(min(int(node.get(name, 0) // amount) for name, amount in per_worker.items()) for node in nodes)


def cluster_fit_problem(config: Config, nodes: list[dict[str, float]]) -> str | None:
    """Why `nodes` (each node's resources) cannot run one trial; None if they can."""
    per_worker = _per_worker(config)
    slots, workers = _worker_slots(config, nodes), config.scaling.world_size
    if slots >= workers:
        return None
    each = " + ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
    totals = ", ".join(f"{sum(node.get(name, 0) for node in nodes):g} {name}" for name in per_worker)
    return (
        f"scaling: one trial needs {workers} workers of {each} each, but the cluster's {len(nodes)} node(s) "
        f"({totals}) hold {slots}; lower scaling.num_workers or the per-worker resources"
    )


def concurrent_trials(config: Config, nodes: list[dict[str, float]]) -> int:
    return _worker_slots(config, nodes) // config.scaling.world_size


ROOM_POLL_S = 2.0


def wait_for_room(config: Config, trial_id: str) -> float:
    """Wait (without limit) until the cluster has free room for this trial's workers, and return the seconds
    waited. Ray Train gives a worker group a start timeout and then fails the run, so a trial started while other
    work holds the cluster would fail; waiting here, before its trainer exists, costs nothing. Free resources
    are the cluster's total (Ray gives no per-node view publicly): if they fit only across nodes, Ray Train's own
    timeout still applies."""
    if config.scaling.num_workers == 0:
        return 0.0  # local mode trains in the trial's own process
    started = time.monotonic()
    announced = False
    while (problem := cluster_fit_problem(config, [ray.available_resources()])) is not None:
        if not announced:
            print(f"trial {trial_id} waiting for resources: {problem.replace('hold', 'have free room for')}")
            announced = True
        time.sleep(ROOM_POLL_S)
    waited = time.monotonic() - started
    if announced:
        print(f"trial {trial_id} starts after waiting {waited:.0f} s for resources")
    return waited
