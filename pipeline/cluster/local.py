"""A real multi-node Ray cluster on this machine: `ray start --head`, more nodes with `ray start --address`,
token authentication on, and an MLflow tracking server beside it, as on a production cluster.

    imagenet-pipeline cluster up --nodes 2      # prints the dashboard and MLflow addresses and the env to export
    imagenet-pipeline cluster down

Each node is a separate raylet with its own CPUs (`--num-cpus`), so a 2-worker training job with one CPU per
worker must place one worker on each node. Ray's temporary files live in a private folder under /tmp (Unix
socket paths are limited to 107 bytes) and the cluster is stopped by killing exactly the processes that
name that folder, and their children: `ray stop` would also kill every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil

from pipeline.config import WORKER_GROUP_START_TIMEOUT_S
from pipeline.errors import ClusterError
from pipeline.tracking.uri import ui_link

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
OBJECT_STORE_BYTES = 300 * 1024**2  # per node: jobs here pass no large objects; Ray's default takes 30 % of RAM


@dataclass
class LocalCluster:
    state_dir: str  # token, MLflow database and artifacts, logs; kept after `down`
    temp_dir: str  # Ray's session files; removed after `down`
    gcs_port: int
    dashboard_port: int
    mlflow_port: int
    mlflow_pid: int | None
    nodes: int
    cpus_per_node: int

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def token_path(self) -> Path:
        return Path(self.state_dir) / TOKEN_FILE

    def client_env(self) -> dict[str, str]:
        """What a client (`ray job submit`, `imagenet-pipeline job ...`, a test) needs to talk to this cluster."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
        }

    def node_env(self) -> dict[str, str]:
        """The environment every node starts with, as infra/ sets it on every pod."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
        return {
            **env,
            **self.client_env(),
            # Jobs run `python`: make it this environment's interpreter, with the project installed.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WORKER_GROUP_START_TIMEOUT_S,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    @classmethod
    def start(
        cls, state_dir: Path, nodes: int = 2, cpus_per_node: int = 1, timeout_seconds: float = 120
    ) -> "LocalCluster":
        """Start MLflow, the head and `nodes - 1` more nodes; on any failure stop what started, then raise."""
        if nodes < 1 or cpus_per_node < 1:
            raise ClusterError(f"nodes = {nodes}, cpus_per_node = {cpus_per_node}: both must be at least 1")
        state = Path(state_dir).absolute()
        if (existing := cls.load(state)) is not None:
            raise ClusterError(
                f"a local cluster already runs from {state} (dashboard {existing.dashboard_url}); "
                "stop it first with `imagenet-pipeline cluster down`"
            )
        state.mkdir(parents=True, exist_ok=True)
        cluster = cls(
            state_dir=str(state),
            temp_dir=tempfile.mkdtemp(prefix="ray-pipeline-"),
            gcs_port=free_port(),
            dashboard_port=free_port(),
            mlflow_port=free_port(),
            mlflow_pid=None,
            nodes=nodes,
            cpus_per_node=cpus_per_node,
        )
        write_token(cluster.token_path)
        cluster.save()
        try:
            cluster.mlflow_pid = start_mlflow_server(state, cluster.mlflow_port, cluster.node_env())
            cluster.save()
            for index in range(nodes):
                cluster.ray_start(index)
            deadline = time.monotonic() + timeout_seconds
            wait_until(lambda: len(cluster.alive_node_ids()) >= nodes, deadline, f"{nodes} Ray nodes to join")
            wait_until(lambda: http_ok(f"{cluster.mlflow_uri}/health"), deadline, "the MLflow server to answer")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def ray_start(self, index: int) -> None:
        """Node 0 is the head. Each node has its own temp dir, as separate machines have separate disks: on a
        shared one, a node's runtime-env cleanup deletes the job's working directory under the other's feet."""
        head = index == 0
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.cpus_per_node),
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--disable-usage-stats",
            "--temp-dir",
            f"{self.temp_dir}/node{index}",
            # The default agent port (52365) is one per machine; every node here needs its own.
            "--dashboard-agent-listen-port",
            str(free_port()),
        ]
        if head:
            command += [
                "--head",
                "--port",
                str(self.gcs_port),
                "--ray-client-server-port",
                str(free_port()),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
            ]
        else:
            command += ["--address", self.gcs_address]
        # A session of its own: the nodes outlive this command and its terminal's Ctrl-C.
        try:
            done = subprocess.run(
                command, env=self.node_env(), capture_output=True, text=True, timeout=120, start_new_session=True
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"`ray start{' --head' if head else ''}` did not return within 120 s") from None
        if done.returncode != 0:
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            raise ClusterError(
                f"`ray start{' --head' if head else ''}` failed: {lines[-1] if lines else done.returncode}"
            )

    def alive_node_ids(self) -> set[str]:
        """Ray node ids of the ALIVE nodes, from the dashboard's state API (authenticated like any client)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=100",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                rows = json.load(response)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return set()
        return {row["node_id"] for row in rows if row.get("state") == "ALIVE"}

    def stop(self) -> None:
        """Kill this cluster's Ray processes (and their workers) and its MLflow server; keep state_dir."""
        roots = [
            process
            for process in psutil.process_iter(["cmdline"])
            if any(self.temp_dir in part for part in process.info["cmdline"] or [])
        ]
        if (server := self.mlflow_server()) is not None:
            roots.append(server)
        terminate_trees(roots)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        (Path(self.state_dir) / STATE_FILE).unlink(missing_ok=True)

    def mlflow_server(self) -> psutil.Process | None:
        """This cluster's MLflow server if it still runs: the recorded pid, still running the server on our port
        and store (after a reboot the pid may belong to anything else)."""
        try:
            process = psutil.Process(self.mlflow_pid) if self.mlflow_pid is not None else None
            command = " ".join(process.cmdline()) if process is not None else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        ours = "mlflow" in command and f"--port {self.mlflow_port}" in command and self.state_dir in command
        return process if ours else None

    def describe(self) -> list[str]:
        """Where to look and how to connect, for a person at a shell."""
        return [
            f"Ray dashboard:  {self.dashboard_url}   ({self.nodes} nodes, token auth on: it asks for the token "
            f"once, `cat {self.token_path}`)",
            f"MLflow UI:      {ui_link(self.mlflow_uri)}",
            "to submit jobs from this shell:",
            "  export " + " ".join(f"{key}={value}" for key, value in self.client_env().items()),
            "stop it with:   imagenet-pipeline cluster down   (or make cluster-down)",
        ]

    def save(self) -> None:
        (Path(self.state_dir) / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, state_dir: Path) -> "LocalCluster | None":
        """The cluster recorded in `state_dir`, or None (none recorded, or its head is gone)."""
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        try:
            known = {field.name for field in fields(cls)}
            cluster = cls(**{key: value for key, value in json.loads(path.read_text()).items() if key in known})
        except (TypeError, ValueError) as error:
            raise ClusterError(
                f"{path} is not a cluster record this version reads ({error}); stop that cluster's "
                "processes and remove the file"
            ) from None
        if not any(
            cluster.temp_dir in " ".join(process.info["cmdline"] or []) for process in psutil.process_iter(["cmdline"])
        ):
            cluster.stop()  # a stale record (machine rebooted, processes killed): clean up what is left
            return None
        return cluster


def start_mlflow_server(state: Path, port: int, env: dict[str, str]) -> int:
    """A tracking server with a SQLite store and proxied artifacts: workers on any node log over HTTP."""
    log = open(state / "mlflow-server.log", "ab")  # the server outlives this call
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{state / 'mlflow.db'}",
            "--artifacts-destination",
            str(state / "mlartifacts"),
            "--serve-artifacts",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process.pid


def terminate_trees(roots: list[psutil.Process], grace_seconds: float = 10) -> None:
    processes = set(roots)
    for root in roots:
        try:
            processes.update(root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(processes), timeout=grace_seconds)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_seconds)


def write_token(path: Path) -> None:
    """A fresh random token readable by its owner only (Ray reads it through RAY_AUTH_TOKEN_PATH)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))


def free_port() -> int:
    # Ephemeral ports (32768+) never collide with Ray's worker port range (10002-19999).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def wait_until(condition, deadline: float, what: str, poll_seconds: float = 1.0) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(poll_seconds)
