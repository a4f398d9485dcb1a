"""The layout's promises, checked over every module: imports point one way, no cycles, and the pure-PyTorch core
(data path, models, step, inference) imports neither Ray nor MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Lower layers never import higher ones; within a layer only a package's own modules import each other.
LAYERS = {
    "pipeline.architectures": 0,
    "pipeline.config": 0,
    "pipeline.errors": 0,
    "pipeline.metrics": 0,
    "pipeline.storage": 0,
    "pipeline.events": 0,
    "pipeline.upstream": 0,
    "pipeline.data": 1,
    "pipeline.features": 2,
    "pipeline.tracking": 3,
    "pipeline.cluster": 4,
    "pipeline.train": 5,
    "pipeline.inference": 6,
    "pipeline.tune": 6,
    "pipeline.retrieval": 7,
    "pipeline.bench": 8,
    "pipeline.demo": 8,
    "pipeline.cli": 9,
}
PURE = [
    "pipeline.architectures",
    "pipeline.config",
    "pipeline.errors",
    "pipeline.metrics",
    "pipeline.storage",
    "pipeline.events",
    "pipeline.data.loader",
    "pipeline.data.shard_reader",
    "pipeline.data.plan",
    "pipeline.data.transforms",
    "pipeline.data.manifest",
    "pipeline.data.verify",
    "pipeline.data.sharding",
    "pipeline.data.synthetic",
    "pipeline.data.source",
    "pipeline.data.loadcheck",
    "pipeline.train.models",
    "pipeline.train.optim",
    "pipeline.train.step",
    "pipeline.train.checkpoints",
    "pipeline.train.progress",
    "pipeline.tracking.uri",
    "pipeline.inference.loading",
    "pipeline.inference.evaluate",
    "pipeline.inference.predict",
    "pipeline.features.extract",
    "pipeline.features.quality",
    "pipeline.features.index",
    "pipeline.features.store",
    "pipeline.retrieval.sheet",
    "pipeline.bench.gpu",
    "pipeline.data.image_header",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, top_level_only: bool) -> set[str]:
    """The project modules `name` imports (a `from package import module` counts as the module)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found - {name}


def layer(name: str) -> tuple[str, int]:
    for prefix, rank in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if name == prefix or name.startswith(prefix + "."):
            return ("the shared base" if rank == 0 else prefix), rank  # base modules may use each other
    raise AssertionError(f"{name} belongs to no layer: add its package to LAYERS")


def test_every_module_belongs_to_a_layer_and_imports_point_down():
    wrong = []
    for name in MODULES:
        if name == "pipeline":
            continue
        package, rank = layer(name)
        for target in imports_of(name, top_level_only=False):
            target_package, target_rank = layer(target)
            if target_package != package and target_rank >= rank:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_there_are_no_import_cycles():
    graph = {name: imports_of(name, top_level_only=False) for name in MODULES}
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]) if target in path else target)
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_pure_core_imports_neither_ray_nor_mlflow():
    check = (
        "import importlib, sys\n"
        f"for name in {PURE!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = [lib for lib in ('ray', 'mlflow') if lib in sys.modules]\n"
        "    if heavy: sys.exit(f'{name} imports {heavy}')\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr or result.stdout


def test_private_ray_apis_are_touched_only_by_the_ray_54305_workaround():
    users = sorted(
        name
        for name, path in MODULES.items()
        if "ray._raylet" in path.read_text() or "ray.train.v2._internal" in path.read_text()
    )
    assert users == ["pipeline.upstream.ray_54305"]
