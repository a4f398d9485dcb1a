"""Deployment files in infra/: they parse, keep Ray and MLflow locked down, and agree with pyproject and jobs/.

    .venv/bin/python -m pytest -q tests/test_infra.py

Static checks only: no network, Docker, Kubernetes or Ray.
"""

import configparser
import re
import shlex
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline.config import load_config
from pipeline.tune.search import cluster_fit_problem

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
IMAGE_WORKDIR = "/app"  # WORKDIR of infra/docker/Dockerfile: the repository root inside the image
SHARED_MOUNT = "/mnt/shared"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RAY_KINDS = ("RayCluster", "RayJob")
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")
LITERAL_SECRETS = [  # (pattern, a sample it must catch)
    (re.compile(r"(?i)[\w.-]*(password|passwd|token|secret|access_key|api_key)[\w.-]*\s*=\s*['\"]?"
                r"[A-Za-z0-9+_-][A-Za-z0-9+/_=-]{3,}"), "MLFLOW_TRACKING_PASSWORD='hunter2hunter2'"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:(?!\$)[^/\s@]+@"), "postgresql://mlflow:hunter2@db:5432/x"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "AKIAIOSFODNN7EXAMPLE"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "-----BEGIN RSA PRIVATE KEY-----"),
]


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
    expected = {"kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml",
                "kuberay/storage.yaml", "mlflow/mlflow.yaml", "mlflow/postgres.yaml", "cluster-launcher/aws-gpu.yaml"}
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
            token_secrets = {entry["valueFrom"]["secretKeyRef"]["name"] for _, pod in ray_pods(doc)
                             for container in containers(pod) for entry in container["env"]
                             if entry["name"] == "RAY_AUTH_TOKEN"}
            assert token_secrets == {spec["authOptions"]["secretName"]}, f"{name}: two different tokens"
            assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: training on the head"
            assert any(limits(group).get("nvidia.com/gpu") for group in spec["workerGroupSpecs"]), f"{name}: no GPUs"
        for label, pod in ray_pods(doc):
            if label.endswith("/submitter"):
                continue
            volumes = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName")
                       for volume in pod["volumes"]}
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
        public = [r for r in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])
                  if r.get("CidrIp") == "0.0.0.0/0" or r.get("CidrIpv6") == "::/0"]
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
    assert {job_config(doc)[0] for doc in jobs} == {"jobs.train", "jobs.tune"}
    for doc in jobs:
        config = job_config(doc)[1]
        for location in (config.data.root, config.tracking.storage_path):
            assert location.startswith(f"{SHARED_MOUNT}/") or "://" in location, f"{location} is not shared"


def test_rayjobs_fit_the_cluster_they_run_on():
    clusters = {doc["metadata"]["name"]: doc["spec"] for doc in manifests(("RayCluster",))}
    for doc in manifests(("RayJob",)):
        module, config = job_config(doc)
        spec = doc["spec"].get("rayClusterSpec") or clusters[doc["spec"]["clusterSelector"]["ray.io/cluster"]]
        nodes = []
        for group in spec["workerGroupSpecs"]:  # Ray reads a pod's CPUs and GPUs from its limits unless told
            advertised = {"CPU": float(group["rayStartParams"].get("num-cpus", limits(group)["cpu"])),
                          "GPU": float(limits(group).get("nvidia.com/gpu", 0))}
            nodes += [advertised] * group["replicas"]
        if module != "jobs.tune":
            config = config.model_copy(update={"search": config.search.model_copy(update={"max_concurrent_trials": 1})})
        assert cluster_fit_problem(config, nodes) is None, doc["metadata"]["name"]


def test_mlflow_server_uses_basic_auth_allowed_hosts_and_secrets():
    docs = {doc["kind"]: doc for doc in documents("mlflow/mlflow.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])
    assert args["app-name"] == "basic-auth" and "serve-artifacts" in args
    uris = {entry["value"] for doc in manifests(RAY_KINDS) for _, pod in ray_pods(doc) for c in containers(pod)
            for entry in c.get("env", []) if entry["name"] == "MLFLOW_TRACKING_URI"}
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
