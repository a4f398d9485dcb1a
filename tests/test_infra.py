"""Deployment files in infra/: they parse, keep Ray and MLflow locked down, and agree with pyproject and jobs/.

    .venv/bin/python -m pytest -q tests/test_infra.py

Static checks, plus bash for the launcher's env-file writer: no network, Docker, Kubernetes or Ray. NetworkPolicies
are checked by evaluating them (Kubernetes' semantics, below) over the pods the manifests make.
"""

import configparser
import ipaddress
import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline.config import load_config
from pipeline.tune.search import cluster_fit_problem, concurrent_trials

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
IMAGE_WORKDIR = "/app"  # WORKDIR of infra/docker/Dockerfile: the repository root inside the image
SHARED_MOUNT = "/mnt/shared"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RAY_KINDS = ("RayCluster", "RayJob")
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")
LITERAL_SECRETS = [  # (pattern, a sample it must catch)
    (
        re.compile(
            r"(?i)[\w.-]*(password|passwd|token|secret|access_key|api_key)[\w.-]*\s*=\s*['\"]?"
            r"[A-Za-z0-9+_-][A-Za-z0-9+/_=-]{3,}"
        ),
        "MLFLOW_TRACKING_PASSWORD='hunter2hunter2'",
    ),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:(?!\$)[^/\s@]+@"), "postgresql://mlflow:hunter2@db:5432/x"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "AKIAIOSFODNN7EXAMPLE"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "-----BEGIN RSA PRIVATE KEY-----"),
]
# Pod Security "restricted": the volume types it admits, and the pod securityContext fields a container inherits.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
INHERITED_SECURITY = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "seLinuxOptions", "appArmorProfile")
# Where each image's processes write outside their data volumes; the root filesystem is read-only.
WRITABLE_PATHS = {
    "imagenet-pipeline": ("/tmp", "/tmp/ray", "/home/ray"),  # scratch, Ray's session dir, caches
    "mlflow-server": ("/tmp", "/home/mlflow"),
    "postgres": ("/tmp", "/var/run/postgresql"),
}  # the socket and its lock file
POSTGRES_UID = 999  # user `postgres` of the official image
GENERATED = "-x7k2q"  # KubeRay names a RayJob's own cluster <job name>-<5 random characters>
RAY_ROLES = ("ray-head", "ray-worker")
POD_PORTS = [(port, "TCP") for port in (5000, 5432, 6379, 8265, 10001, 23456)]  # services, GCS, and a Ray worker port


def documents(path: Path | str) -> list:
    return [doc for doc in yaml.safe_load_all((INFRA / path).read_text()) if doc]


def manifests(kinds: tuple[str, ...] = ()) -> list[dict]:
    """Kubernetes objects of every YAML file under infra/ (the cluster-launcher config has no kind)."""
    found = [doc for path in sorted(INFRA.rglob("*.yaml")) for doc in documents(path) if "kind" in doc]
    return [doc for doc in found if not kinds or doc["kind"] in kinds]


def cluster_specs(doc: dict) -> list[dict]:
    """The RayClusterSpecs a RayCluster or RayJob carries (none for a RayJob that selects a cluster)."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    return [doc["spec"]["rayClusterSpec"]] if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"] else []


def ray_pods(doc: dict) -> list[tuple[str, dict]]:
    """(label, pod spec) of every Ray head, worker group and job submitter in a manifest."""
    name, pods = doc["metadata"]["name"], []
    for spec in cluster_specs(doc):
        groups = [("head", spec["headGroupSpec"])] + [(group["groupName"], group) for group in spec["workerGroupSpecs"]]
        pods += [(f"{name}/{label}", group["template"]["spec"]) for label, group in groups]
    if "submitterPodTemplate" in doc["spec"]:
        pods.append((f"{name}/submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def containers(pod: dict) -> list[dict]:
    return pod["containers"] + pod.get("initContainers", [])


def walk(node):
    """Every dict inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            yield from walk(child)


def image_pins() -> dict[str, Requirement]:
    """The pins from the file infra/docker/Dockerfile installs with `pip install --requirement`."""
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    copied = re.search(r"^COPY (\S+\.txt) (\S+)$", dockerfile, re.MULTILINE)
    assert copied and f"--requirement {copied[2]}" in dockerfile, "the Dockerfile installs no requirements file"
    lines = (ROOT / copied[1]).read_text().splitlines()
    pins = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(pin.name): pin for pin in pins}


def pinned_version(pin: Requirement) -> str:
    clauses = list(pin.specifier)
    assert len(clauses) == 1 and clauses[0].operator == "==" and "*" not in clauses[0].version, f"{pin} is not exact"
    return clauses[0].version


def limits(group: dict) -> dict:
    """A worker group's Ray container limits, CPUs as a number ("500m" is 0.5)."""
    found = dict(group["template"]["spec"]["containers"][0]["resources"]["limits"])
    cpu = str(found["cpu"])
    found["cpu"] = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return found


def test_every_yaml_under_infra_parses_and_names_its_kind():
    expected = {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-refit.yaml",
        "kuberay/storage.yaml",
        "mlflow/mlflow.yaml",
        "mlflow/postgres.yaml",
        "cluster-launcher/aws-gpu.yaml",
    }
    found = {str(path.relative_to(INFRA)): documents(path) for path in INFRA.rglob("*.yaml")}
    assert expected <= found.keys(), f"missing: {sorted(expected - found.keys())}"
    for relative, docs in found.items():
        named = all("cluster_name" in doc or {"apiVersion", "kind", "metadata"} <= doc.keys() for doc in docs)
        assert docs and named, f"{relative}: empty, or an object without apiVersion/kind/metadata"


def test_every_ray_container_and_job_submitter_runs_with_token_auth():
    checked = 0
    for doc in manifests(RAY_KINDS):
        if doc["kind"] == "RayJob":
            assert "submitterPodTemplate" in doc["spec"], f"{doc['metadata']['name']}: submitter without the token"
        for label, pod in ray_pods(doc):
            for container in containers(pod):
                env = {entry["name"]: entry for entry in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{label}: RAY_AUTH_MODE is not token"
                reference = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert reference.get("name") and reference.get("key"), f"{label}: RAY_AUTH_TOKEN not from a Secret"
                checked += 1
    assert checked >= 7  # the long-lived cluster's 3 pods, the train job's 2, 2 submitters


def test_ray_clusters_set_auth_options_a_cpu_free_head_gpu_workers_and_the_shared_volume():
    claims = {doc["metadata"]["name"]: doc for doc in manifests(("PersistentVolumeClaim",))}
    for doc in manifests(RAY_KINDS):
        for spec in cluster_specs(doc):
            name = doc["metadata"]["name"]
            assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: authOptions.mode is not token"
            token_secrets = {
                entry["valueFrom"]["secretKeyRef"]["name"]
                for _, pod in ray_pods(doc)
                for container in containers(pod)
                for entry in container["env"]
                if entry["name"] == "RAY_AUTH_TOKEN"
            }
            assert token_secrets == {spec["authOptions"]["secretName"]}, f"{name}: two different tokens"
            assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: training on the head"
            assert any(limits(group).get("nvidia.com/gpu") for group in spec["workerGroupSpecs"]), f"{name}: no GPUs"
        for label, pod in ray_pods(doc):
            if label.endswith("/submitter"):
                continue
            volumes = {
                volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]
            }
            mounts = {mount["mountPath"]: mount["name"] for mount in pod["containers"][0]["volumeMounts"]}
            claim = claims.get(volumes.get(mounts.get(SHARED_MOUNT)))
            assert claim and claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{label}: {SHARED_MOUNT} not RWX"


def test_nothing_exposes_ray_or_mlflow_outside_the_cluster():
    for doc in manifests():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), f"{name} exposes a service"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name} is {doc['spec']['type']}"
        for spec in cluster_specs(doc):
            assert spec["headGroupSpec"].get("serviceType") == "ClusterIP", f"{name}: head service not ClusterIP"
        for node in walk(doc):
            assert not node.get("hostNetwork") and "hostPort" not in node, f"{name} binds a host port"
    launcher = documents("cluster-launcher/aws-gpu.yaml")[0]
    for rule in launcher["provider"].get("security_group", {}).get("IpPermissions", []):
        public = [
            r
            for r in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])
            if r.get("CidrIp") == "0.0.0.0/0" or r.get("CidrIpv6") == "::/0"
        ]
        assert not public, f"security group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to the internet"


def test_no_secret_is_written_in_infra():
    for pattern, sample in LITERAL_SECRETS:
        assert pattern.search(sample), f"{pattern.pattern} no longer catches {sample}"
    for doc in manifests():
        assert doc["kind"] != "Secret", f"Secret/{doc['metadata']['name']} is committed; create it from the environment"
        for node in walk(doc):
            if isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node):
                if any(word in node["name"].upper() for word in SECRET_WORDS):
                    assert "value" not in node and "valueFrom" in node, f"env {node['name']} holds a literal"
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, _ in LITERAL_SECRETS:
                assert not pattern.search(line), f"{path.relative_to(ROOT)}:{number} holds a secret: {line.strip()}"


def test_image_pins_are_exact_and_satisfy_pyproject():
    pins = image_pins()
    versions = {name: pinned_version(pin) for name, pin in pins.items()}
    declared = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["cloud"]
    for requirement in map(Requirement, declared):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} has no pin in the image"
        assert requirement.specifier.contains(versions[name], prereleases=True), f"{pins[name]} breaks {requirement}"
        assert requirement.extras <= pins[name].extras, f"{pins[name]} lacks the extras of {requirement}"
    base = re.search(r"^FROM python:(\d+\.\d+)", (INFRA / "docker" / "Dockerfile").read_text(), re.MULTILINE)
    assert base and SpecifierSet(PROJECT["requires-python"]).contains(base[1]), "image Python outside requires-python"


def test_ray_mlflow_and_image_versions_agree_across_infra():
    versions = {name: pinned_version(pin) for name, pin in image_pins().items()}
    images = [c["image"] for doc in manifests(RAY_KINDS) for _, pod in ray_pods(doc) for c in pod["containers"]]
    images.append(documents("cluster-launcher/aws-gpu.yaml")[0]["docker"]["image"])
    assert images and all(image.endswith(f"/imagenet-pipeline:{PROJECT['version']}") for image in images), images
    for doc in manifests(RAY_KINDS):
        for spec in cluster_specs(doc):
            assert spec["rayVersion"] == versions["ray"], f"{doc['metadata']['name']}: rayVersion {spec['rayVersion']}"
    server_pin = re.search(r"mlflow\[auth\]==([\w.]+)", (INFRA / "mlflow" / "Dockerfile").read_text())
    assert server_pin and server_pin[1] == versions["mlflow"], "MLflow server and clients differ"
    (deployment,) = [doc for doc in documents("mlflow/mlflow.yaml") if doc["kind"] == "Deployment"]
    server_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert server_image.endswith(f"/mlflow-server:{versions['mlflow']}"), server_image


def job_config(doc: dict):
    """The module and the validated config a RayJob's entrypoint runs, read from this checkout."""
    words = shlex.split(doc["spec"]["entrypoint"])
    module = words[words.index("-m") + 1]
    assert module.startswith("jobs.") and (ROOT / f"{module.replace('.', '/')}.py").is_file(), f"no module {module}"
    files = [words[i + 1] for i, word in enumerate(words) if word in ("-c", "--config")]
    overrides = [words[i + 1] for i, word in enumerate(words) if word in ("-s", "--set")]
    local = [ROOT / Path(file).relative_to(IMAGE_WORKDIR) if file.startswith("/") else ROOT / file for file in files]
    assert files and all(path.is_file() for path in local), f"missing config among {files}"
    return module, load_config(local, overrides)  # unknown keys and bad values raise here


def test_rayjob_entrypoints_run_existing_modules_with_valid_configs_on_shared_storage():
    jobs = manifests(("RayJob",))
    assert {job_config(doc)[0] for doc in jobs} == {"jobs.train", "jobs.tune", "jobs.refit", "jobs.embed"}
    for doc in jobs:
        module, config = job_config(doc)
        written = (config.retrieval.output,) if module == "jobs.embed" else ()  # a gallery outlives the job's copy
        for location in (config.data.root, config.tracking.storage_path, *written):
            assert location.startswith(f"{SHARED_MOUNT}/") or "://" in location, f"{location} is not shared"


def test_rayjobs_fit_the_cluster_they_run_on():
    clusters = {doc["metadata"]["name"]: doc["spec"] for doc in manifests(("RayCluster",))}
    for doc in manifests(("RayJob",)):
        module, config = job_config(doc)
        spec = doc["spec"].get("rayClusterSpec") or clusters[doc["spec"]["clusterSelector"]["ray.io/cluster"]]
        nodes = []
        for group in spec["workerGroupSpecs"]:  # Ray reads a pod's CPUs and GPUs from its limits unless told
            advertised = {
                "CPU": float(group["rayStartParams"].get("num-cpus", limits(group)["cpu"])),
                "GPU": float(limits(group).get("nvidia.com/gpu", 0)),
            }
            nodes += [advertised] * group["replicas"]
        if module != "jobs.tune":
            config = config.model_copy(update={"search": config.search.model_copy(update={"max_concurrent_trials": 1})})
        assert cluster_fit_problem(config, nodes) is None, doc["metadata"]["name"]
        assert concurrent_trials(config, nodes) >= config.search.max_concurrent_trials, doc["metadata"]["name"]


def test_mlflow_server_uses_basic_auth_allowed_hosts_and_secrets():
    docs = {doc["kind"]: doc for doc in documents("mlflow/mlflow.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])
    assert args["app-name"] == "basic-auth" and "serve-artifacts" in args
    uris = {
        entry["value"]
        for doc in manifests(RAY_KINDS)
        for _, pod in ray_pods(doc)
        for c in containers(pod)
        for entry in c.get("env", [])
        if entry["name"] == "MLFLOW_TRACKING_URI"
    }
    assert uris and {uri.split("://")[1].rstrip("/") for uri in uris} <= set(args["allowed-hosts"].split(",")), uris
    env = {entry["name"]: entry for entry in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    ini = configparser.ConfigParser()
    ini.read_string(docs["ConfigMap"]["data"][Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).name])
    assert "admin_password" not in ini["mlflow"], "the admin password belongs in a Secret, not the ConfigMap"
    for uri in (ini["mlflow"]["database_uri"], args["backend-store-uri"]):
        assert ":" not in uri.split("://")[1].split("@")[0], f"{uri} carries a password"


def test_cluster_launcher_starts_every_node_with_token_auth_and_the_token_file():
    launcher = documents("cluster-launcher/aws-gpu.yaml")[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in launcher[key] if "ray start" in command]
        assert starts, f"{key} starts no Ray"
        for command in starts:  # each entry is its own shell: the export must precede `ray start` in it
            assert "RAY_AUTH_MODE=token" in command.split("ray start")[0], f"{key}: {command}"
    assert any("RAY_AUTH_MODE=token" in command for command in launcher["setup_commands"])
    assert any(local.endswith("/.ray/auth_token") for local in launcher["file_mounts"].values())
    assert "--gpus all" in launcher["docker"]["worker_run_options"]


@dataclass
class Endpoint:
    """One end of a connection: a pod, labelled as Kubernetes will label it, or an address outside the cluster."""

    name: str
    role: str  # ray-head, ray-worker, submitter, mlflow, postgres; operator, stranger, dns, internet, metadata
    namespace: str = "imagenet"
    labels: dict = field(default_factory=dict)
    cluster: str = ""  # a Ray pod's cluster; for a submitter, the cluster its job runs on
    ip: str = ""  # set only for addresses outside the cluster
    spec: dict = field(default_factory=dict)  # the pod spec, for the manifests' own pods


def workload_pods() -> list[Endpoint]:
    """Every pod the manifests make, with the labels and volumes their controllers add."""
    pods = []
    for doc in manifests():
        kind, name, namespace = doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", "default")
        if kind in ("Deployment", "StatefulSet"):
            template = doc["spec"]["template"]
            claims = [
                {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
                for claim in doc["spec"].get("volumeClaimTemplates", [])
            ]  # the StatefulSet controller adds these
            spec = {**template["spec"], "volumes": template["spec"].get("volumes", []) + claims}
            role = {"mlflow-postgres": "postgres"}.get(name, name)
            pods.append(Endpoint(f"{kind}/{name}", role, namespace, template["metadata"].get("labels", {}), spec=spec))
        for cluster_spec in cluster_specs(doc):
            cluster = name if kind == "RayCluster" else name + GENERATED
            groups = [("head", "headgroup", cluster_spec["headGroupSpec"])]
            groups += [("worker", group["groupName"], group) for group in cluster_spec["workerGroupSpecs"]]
            for node_type, group_name, group in groups:
                template = group["template"]
                labels = {
                    **template.get("metadata", {}).get("labels", {}),
                    "ray.io/is-ray-node": "yes",
                    "ray.io/cluster": cluster,
                    "ray.io/node-type": node_type,
                    "ray.io/group": group_name,
                    "app.kubernetes.io/name": "kuberay",
                    "app.kubernetes.io/created-by": "kuberay-operator",
                }
                pods.append(
                    Endpoint(
                        f"{kind}/{name}/{group_name}",
                        f"ray-{node_type}",
                        namespace,
                        labels,
                        cluster,
                        spec=template["spec"],
                    )
                )
        if kind == "RayJob":  # KubeRay 1.6 keeps the template's labels; the Job adds its own
            template = doc["spec"]["submitterPodTemplate"]
            target = doc["spec"].get("clusterSelector", {}).get("ray.io/cluster", name + GENERATED)
            labels = {**template.get("metadata", {}).get("labels", {}), "batch.kubernetes.io/job-name": name}
            pods.append(
                Endpoint(f"{kind}/{name}/submitter", "submitter", namespace, labels, target, spec=template["spec"])
            )
    return pods


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics: every matchLabels pair and matchExpressions entry holds ({} selects all)."""
    operators = {
        "In": lambda e: labels.get(e["key"]) in e["values"],
        "NotIn": lambda e: labels.get(e["key"]) not in e["values"],
        "Exists": lambda e: e["key"] in labels,
        "DoesNotExist": lambda e: e["key"] not in labels,
    }
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items()) and all(
        operators[e["operator"]](e) for e in selector.get("matchExpressions", [])
    )


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


class Network:
    """The manifests' NetworkPolicies as Kubernetes applies them: a pod selected by a policy of a direction is
    isolated in it and admits only what some rule of those policies allows; a connection needs the source's
    egress and the destination's ingress. Named ports are not resolved (the policies here use numbers)."""

    def __init__(self):
        self.policies = manifests(("NetworkPolicy",))
        self.namespaces = {
            doc["metadata"]["name"]: doc["metadata"].get("labels", {}) for doc in manifests(("Namespace",))
        }

    def connects(self, source: Endpoint, destination: Endpoint, port: int, protocol: str) -> bool:
        return self.admits("Egress", source, destination, port, protocol) and (
            bool(destination.ip) or self.admits("Ingress", destination, source, port, protocol)
        )

    def admits(self, direction: str, pod: Endpoint, peer: Endpoint, port: int, protocol: str) -> bool:
        """Whether `pod`'s policies of `direction` let it receive from / send to `peer`."""
        isolating = [
            policy
            for policy in self.policies
            if policy["metadata"]["namespace"] == pod.namespace
            and direction in policy_types(policy)
            and selects(policy["spec"]["podSelector"], pod.labels)
        ]
        rules, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        return not isolating or any(
            self._port_matches(rule, port, protocol)
            and (not rule.get(peers) or any(self._peer_matches(entry, pod.namespace, peer) for entry in rule[peers]))
            for policy in isolating
            for rule in policy["spec"].get(rules) or []
        )

    @staticmethod
    def _port_matches(rule: dict, port: int, protocol: str) -> bool:
        return not rule.get("ports") or any(
            entry.get("protocol", "TCP") == protocol
            and ("port" not in entry or entry["port"] <= port <= entry.get("endPort", entry["port"]))
            for entry in rule["ports"]
            if isinstance(entry.get("port", 0), int)
        )

    def _peer_matches(self, peer: dict, namespace: str, endpoint: Endpoint) -> bool:
        if "ipBlock" in peer:  # counted for outside addresses only: CNIs differ on whether it covers pod IPs
            address, block = endpoint.ip and ipaddress.ip_address(endpoint.ip), peer["ipBlock"]
            return (
                bool(address)
                and address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(excluded) for excluded in block.get("except", []))
            )
        if endpoint.ip:
            return False
        labels = {**self.namespaces.get(endpoint.namespace, {}), "kubernetes.io/metadata.name": endpoint.namespace}
        in_namespace = (
            selects(peer["namespaceSelector"], labels)
            if "namespaceSelector" in peer
            else endpoint.namespace == namespace
        )
        return in_namespace and selects(peer.get("podSelector", {}), endpoint.labels)


def should_connect(source: Endpoint, destination: Endpoint, port: int, shared_clusters: set[str]) -> bool:
    """The connections the pipeline makes, and no others."""
    if destination.role in RAY_ROLES:
        if source.role in RAY_ROLES and source.cluster == destination.cluster:
            return True  # GCS, object transfer and Ray's worker ports: every port
        # `ray job submit` and the operator's status polls use the job API. Any RayJob of the namespace may select
        # a standalone RayCluster by name; a RayJob's own cluster serves that job alone.
        submitter = source.role == "submitter" and (
            source.cluster == destination.cluster or destination.cluster in shared_clusters
        )
        return destination.role == "ray-head" and port == 8265 and (submitter or source.role == "operator")
    return {
        "mlflow": source.role in RAY_ROLES and port == 5000,
        "postgres": source.role == "mlflow" and port == 5432,
        "dns": source.role in (*RAY_ROLES, "submitter", "mlflow"),
        "internet": source.role in (*RAY_ROLES, "mlflow"),
    }.get(destination.role, False)  # metadata: nobody


@pytest.mark.parametrize("role", [*RAY_ROLES, "mlflow", "postgres", "submitter", "dns", "internet", "metadata"])
def test_network_policies_admit_exactly_the_connections_the_pipeline_makes(role):
    network, pods = Network(), workload_pods()
    shared_clusters = {doc["metadata"]["name"] for doc in manifests(("RayCluster",))}
    others = [
        Endpoint("kuberay-operator", "operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}),
        Endpoint("another pod of the namespace", "stranger", labels={"app": "debug"}),
        Endpoint("a pod of another namespace", "stranger", "default"),
    ]
    beyond = {
        "dns": Endpoint("kube-dns", "dns", "kube-system", {"k8s-app": "kube-dns"}),
        "internet": Endpoint("an object store", "internet", ip="203.0.113.10"),
        "metadata": Endpoint("the cloud metadata service", "metadata", ip="169.254.169.254"),
    }
    probes = {"dns": [(53, "UDP"), (53, "TCP")], "internet": [(443, "TCP")], "metadata": [(80, "TCP")]}
    destinations = [beyond[role]] if role in beyond else [pod for pod in pods if pod.role == role]
    # Only this namespace's egress is ours to restrict: other namespaces may reach DNS and the internet.
    sources = pods + [other for other in others if role not in beyond or other.namespace == "imagenet"]
    assert destinations, f"no {role} pod in the manifests"
    wrong = []
    for destination in destinations:
        for source, (port, protocol) in ((s, p) for s in sources for p in probes.get(role, POD_PORTS)):
            expected = should_connect(source, destination, port, shared_clusters)
            # Our pods' ingress must hold by itself too: a source's egress policy is not the destination's defence.
            verdicts = {"connection": network.connects(source, destination, port, protocol)}
            if role not in beyond:
                verdicts["its ingress"] = network.admits("Ingress", destination, source, port, protocol)
            wrong += [
                f"{source.name} -> {destination.name} {port}/{protocol}: {what} {'open' if allowed else 'blocked'}"
                for what, allowed in verdicts.items()
                if allowed != expected
            ]
    assert not wrong, "\n".join(wrong)


def test_a_default_deny_isolates_the_namespace_and_every_other_policy_names_its_pods_and_peers():
    policies = manifests(("NetworkPolicy",))
    namespaces = {doc["metadata"]["namespace"] for doc in manifests() if "namespace" in doc["metadata"]}
    for namespace in namespaces:
        deny = [p for p in policies if p["metadata"]["namespace"] == namespace and not p["spec"]["podSelector"]]
        assert len(deny) == 1, f"{namespace}: {len(deny)} namespace-wide policies, expected one default-deny"
        assert set(policy_types(deny[0])) == {"Ingress", "Egress"}, (
            f"{namespace}: the default-deny leaves a direction open"
        )
        assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress"), "the default-deny allows"
    for policy in policies:
        name = policy["metadata"]["name"]
        if not policy["spec"]["podSelector"]:
            continue
        selector = policy["spec"]["podSelector"]
        assert selector.get("matchLabels") or selector.get("matchExpressions"), f"{name} selects every pod"
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without `from` admits every source"
            for peer in rule["from"]:
                pods = peer.get("podSelector", {})
                assert "ipBlock" not in peer and (pods.get("matchLabels") or pods.get("matchExpressions")), (
                    f"{name}: peer {peer} admits whole namespaces or address ranges"
                )


def effective_security_context(pod: dict, container: dict) -> dict:
    """The securityContext the kubelet applies: the pod's inheritable fields, overridden by the container's."""
    inherited = {key: value for key, value in pod.get("securityContext", {}).items() if key in INHERITED_SECURITY}
    return {**inherited, **container.get("securityContext", {})}


def image_name(container: dict) -> str:
    return container["image"].rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def dockerfile_user(path: str) -> int:
    users = re.findall(r"^USER (\d+)", (INFRA / path).read_text(), re.MULTILINE)
    assert users, f"{path} runs as root (no numeric USER)"
    return int(users[-1])


def test_every_container_meets_pod_security_restricted_as_its_images_own_user():
    uids = {
        "imagenet-pipeline": dockerfile_user("docker/Dockerfile"),
        "mlflow-server": dockerfile_user("mlflow/Dockerfile"),
        "postgres": POSTGRES_UID,
    }
    checked = 0
    for pod in workload_pods():
        spec = pod.spec
        assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), f"{pod.name} shares the host's"
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{pod.name}: volume {volume['name']} not allowed"
        for container in containers(spec):
            where, context = f"{pod.name}/{container['name']}", effective_security_context(spec, container)
            capabilities = context.get("capabilities", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
            assert not context.get("privileged"), f"{where} is privileged"
            assert "ALL" in capabilities.get("drop", []), f"{where} keeps the default capabilities"
            assert set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{where} adds capabilities"
            assert context.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), (
                f"{where}: no seccomp"
            )
            assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
            assert context.get("runAsUser") == uids[image_name(container)], (
                f"{where}: runAsUser is not the image's user"
            )
            assert context.get("readOnlyRootFilesystem") is True, f"{where}: the image is writable"
            if any("persistentVolumeClaim" in volume for volume in spec.get("volumes", [])):
                group = spec.get("securityContext", {}).get("fsGroup")
                assert group == context.get("runAsGroup", context["runAsUser"]), (
                    f"{where}: its volumes are not its group's"
                )
            checked += 1
    assert checked >= 9  # 5 Ray pods, 2 submitters, MLflow, Postgres


def test_writable_paths_are_empty_dirs_and_postgres_keeps_its_data_on_its_claim():
    for pod in workload_pods():
        volumes = {volume["name"]: volume for volume in pod.spec.get("volumes", [])}
        for container in containers(pod.spec):
            mounts = container.get("volumeMounts", [])
            env = {entry["name"]: entry.get("value") for entry in container.get("env", [])}

            def volume_at(path: str, mounts=mounts, volumes=volumes) -> dict:  # the deepest mount holding the path
                holders = [
                    m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
                ]
                deepest = max(holders, key=lambda mount: len(mount["mountPath"]), default=None)
                return {} if deepest is None or deepest.get("readOnly") else volumes[deepest["name"]]

            for path in WRITABLE_PATHS[image_name(container)]:
                assert "emptyDir" in volume_at(path), (
                    f"{pod.name}/{container['name']}: {path} is not a writable emptyDir"
                )
            if "PGDATA" in env:
                assert "persistentVolumeClaim" in volume_at(env["PGDATA"]), (
                    f"{pod.name}: the database is not on its claim"
                )


def test_the_namespace_enforces_pod_security_restricted_from_its_creation():
    namespaces = {doc["metadata"]["name"]: doc["metadata"].get("labels", {}) for doc in manifests(("Namespace",))}
    for name in {doc["metadata"]["namespace"] for doc in manifests() if "namespace" in doc["metadata"]}:
        assert name in namespaces, f"namespace {name} has no Namespace object, so no Pod Security labels"
        for mode in ("enforce", "audit", "warn"):
            assert namespaces[name].get(f"pod-security.kubernetes.io/{mode}") == "restricted", f"{name}: {mode}"
    script = (INFRA / "secrets.example.sh").read_text()
    assert "namespace.yaml" in script and "create namespace" not in script, "secrets.example.sh makes it unlabelled"


def test_no_pod_is_given_a_kubernetes_api_token():
    for pod in workload_pods():
        assert pod.spec.get("automountServiceAccountToken") is False, f"{pod.name} mounts a service account token"


def test_every_image_turns_mlflow_pickle_deserialisation_off():
    for dockerfile in (INFRA / "docker" / "Dockerfile", INFRA / "mlflow" / "Dockerfile"):
        assert "ENV MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in dockerfile.read_text(), dockerfile


def test_training_pods_mount_the_shards_read_only_and_only_the_sharding_group_may_write_them():
    for doc in manifests(RAY_KINDS):
        for label, pod in ray_pods(doc):
            if label.endswith("/submitter"):
                continue
            mounts = {mount["mountPath"]: mount for mount in pod["containers"][0]["volumeMounts"]}
            shards = mounts.get(f"{SHARED_MOUNT}/imagenet-shards")
            writes_shards = label.endswith("/cpu")
            assert writes_shards or (
                shards and shards.get("readOnly") is True and shards["subPath"] == "imagenet-shards"
            ), f"{label}: shards writable"


def test_every_rayjob_has_a_deadline():
    for doc in manifests(("RayJob",)):
        deadline = doc["spec"].get("activeDeadlineSeconds")
        assert isinstance(deadline, int) and deadline > 0, f"{doc['metadata']['name']} may hold its cluster forever"


def test_mlflow_reaches_postgres_as_its_own_role_with_an_explicit_sslmode():
    docs = {doc["kind"]: doc for doc in documents("mlflow/mlflow.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])
    ini = configparser.ConfigParser()
    ini.read_string(next(iter(docs["ConfigMap"]["data"].values())))
    postgres = {doc["kind"]: doc for doc in documents("mlflow/postgres.yaml")}
    server_env = {
        entry["name"]: entry for entry in postgres["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    superuser = server_env.get("POSTGRES_USER", {}).get("value", "postgres")
    init_sql = "\n".join(postgres["ConfigMap"]["data"].values())
    service = postgres["Service"]["metadata"]["name"]
    in_cluster = {service, f"{service}.imagenet", f"{service}.imagenet.svc", f"{service}.imagenet.svc.cluster.local"}
    for uri in map(urlsplit, (ini["mlflow"]["database_uri"], args["backend-store-uri"])):
        user, database = uri.username, uri.path.lstrip("/")
        assert user and user != superuser, f"{uri.geturl()} logs in as the superuser {superuser}"
        sslmode = parse_qs(uri.query).get("sslmode", [""])[0]
        # libpq's default `prefer` falls back to plain text silently; a database beyond the cluster must refuse that.
        accepted = {"require", "verify-ca", "verify-full"} | ({"prefer"} if uri.hostname in in_cluster else set())
        assert sslmode in accepted, f"{uri.geturl()}: sslmode {sslmode or 'unset'}"
        assert re.search(rf"CREATE DATABASE {database} OWNER {user}\b", init_sql, re.IGNORECASE), (
            f"{database} not {user}'s"
        )
    role = re.search(rf"CREATE ROLE {user}\b([^;]*);", init_sql, re.IGNORECASE)
    assert role and not re.search(r"\b(SUPERUSER|CREATEROLE|CREATEDB|REPLICATION|BYPASSRLS)\b", role[1], re.IGNORECASE)
    mlflow_password = {entry["name"]: entry for entry in container["env"]}["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert server_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] != mlflow_password["name"], (
        "MLflow's pod can read the superuser password"
    )


def test_cluster_launcher_nodes_have_their_own_instance_profiles_and_require_imdsv2():
    launcher = documents("cluster-launcher/aws-gpu.yaml")[0]
    profiles = {}
    for name, node_type in launcher["available_node_types"].items():
        node_config = node_type["node_config"]
        # Without one on the head, Ray 2.60's bootstrap creates and attaches ray-autoscaler-v1, which holds
        # AmazonEC2FullAccess and AmazonS3FullAccess.
        profile = node_config.get("IamInstanceProfile", {})
        profiles[name] = profile.get("Arn") or profile.get("Name")
        assert profiles[name], f"{name}: no IamInstanceProfile"
        metadata = node_config.get("MetadataOptions", {})
        assert metadata.get("HttpTokens") == "required", f"{name}: IMDSv1 answers anyone who can make a GET"
        assert metadata.get("HttpPutResponseHopLimit") in (1, 2), f"{name}: IMDS tokens reach beyond the node"
    head = launcher["head_node_type"]
    assert all(profiles[name] != profiles[head] for name in profiles if name != head), (
        "workers get the head's EC2 rights"
    )


def test_cluster_launcher_nodes_use_a_security_group_made_for_them():
    launcher = documents("cluster-launcher/aws-gpu.yaml")[0]
    for name, node_type in launcher["available_node_types"].items():
        # Ray 2.60's bootstrap creates (or fills, if empty) a group for each node type without SecurityGroupIds
        # and always adds SSH from 0.0.0.0/0 to it, whatever provider.security_group.IpPermissions says.
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name}: Ray would open SSH to the internet"


def test_the_mlflow_env_file_keeps_hostile_values_literal_when_the_nodes_source_it(tmp_path):
    canary = tmp_path / "payload-ran"
    values = {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com/a b",
        "MLFLOW_TRACKING_USERNAME": f"ray`touch {canary}`",
        "MLFLOW_TRACKING_PASSWORD": f"x'\"$(touch {canary}); touch {canary}\n$HOME \\ %s",
    }
    env_file, clean = tmp_path / "mlflow.env", {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    writer = INFRA / "cluster-launcher" / "write-mlflow-env.sh"
    subprocess.run(["bash", str(writer), str(env_file)], env={**clean, **values}, check=True, timeout=30)
    launcher = documents("cluster-launcher/aws-gpu.yaml")[0]
    sourcing = "set -a; . $HOME/.config/imagenet-pipeline/mlflow.env; set +a;"
    assert all(
        sourcing in command
        for command in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]
    ), "the start commands read the file some other way"
    read_back = subprocess.run(
        [
            "bash",
            "-c",
            sourcing.replace("$HOME/.config/imagenet-pipeline/mlflow.env", '"$1"')
            + ' printf "%s\\0" '
            + " ".join(f'"${name}"' for name in values),
            "bash",
            str(env_file),
        ],
        env=clean,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert not canary.exists(), "a value ran as a command"
    assert read_back.split(b"\0")[:-1] == [value.encode() for value in values.values()]
    assert env_file.stat().st_mode & 0o077 == 0, "the credentials are readable by other users"
