"""Session-wide fixtures: tiny real JPEG shards written straight with webdataset, and one Ray instance."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.manifest import ClassInfo, Manifest, ShardInfo, file_sha256, write_manifest


def jpeg_bytes(label: int, index: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small real JPEG whose colour encodes the label (so decoded batches can be checked)."""
    rng = np.random.default_rng([label, index])
    pixels = np.full((size[1], size[0], 3), (label * 40) % 256, dtype=np.uint8)
    pixels = np.clip(pixels.astype(int) + rng.integers(-8, 8, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_split(
    split_dir: Path,
    shard_sizes: list[int],
    num_classes: int = 4,
    split: str = "val",
    key_prefix: str = "s",
    indexed: bool = False,
) -> Manifest:
    """Shards with the given sample counts; keys are 'sNNNNNN' (`key_prefix`) so tests can audit exactly-once.
    `indexed`: with sample indexes, as `shard` writes them (without: as older versions did)."""
    from pipeline.data.index import write_index

    split_dir.mkdir(parents=True, exist_ok=True)
    shards, serial = [], 0
    for shard_index, size in enumerate(shard_sizes):
        name = f"{split}-{shard_index:06d}.tar"
        with wds.TarWriter(str(split_dir / name)) as writer:
            for _ in range(size):
                label = serial % num_classes
                writer.write(
                    {
                        "__key__": f"{key_prefix}{serial:06d}",
                        "jpg": jpeg_bytes(label, serial),
                        "cls": str(label).encode(),
                    }
                )
                serial += 1
        index_sha256 = write_index(split_dir / name)[0] if indexed else None
        shards.append(
            ShardInfo(name, size, file_sha256(split_dir / name), (split_dir / name).stat().st_size, index_sha256)
        )
    classes = [ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(num_classes)]
    manifest = Manifest(split=split, classes=classes, shards=shards)
    write_manifest(manifest, split_dir)
    return manifest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A shard root with train (5 shards, 53 samples), val (3 shards, 22) and test (2 shards, 11)."""
    root = tmp_path_factory.mktemp("tiny_shards")
    write_split(root / "train", [12, 12, 12, 12, 5], split="train")
    write_split(root / "val", [8, 8, 6], split="val")
    write_split(root / "test", [6, 5], split="test")
    return root


def copy_to_memory(local_root: Path, name: str) -> str:
    """Every file under `local_root` into fsspec's in-process memory filesystem; returns the memory:// root."""
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"memory://{name}"
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            memory.pipe_file(f"{root}/{path.relative_to(local_root).as_posix()}", path.read_bytes())
    return root


@pytest.fixture
def memory_shards(tiny_shards):
    """`tiny_shards` as an object-store-like URL root (memory://), removed after the test."""
    import uuid

    import fsspec

    root = copy_to_memory(tiny_shards, f"shards-{uuid.uuid4().hex}")  # the memory filesystem is process-wide
    yield root
    fsspec.filesystem("memory").rm(root, recursive=True)


# ---------------------------------------------------------------------------------------------
# Ray and training fixtures: Ray starts once per test session; one real 2-worker run is shared by
# every test that only reads its results (MLflow contents, evaluate, predict).


@pytest.fixture(scope="session")
def ray_session():
    import os

    import ray

    # Test runs last seconds, MLflow samples system metrics every 10 s by default; workers inherit this.
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    from pipeline.config import WORKER_GROUP_START_TIMEOUT_S

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_TIMEOUT_S)
    # 4 logical CPUs on 2 cores: room for the train controller plus 2 workers without queueing.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def learnable_shards(tmp_path_factory) -> Path:
    """The project's own generator and sharder: 4 classes, 64x48 px, train 80 / val 16 / test 24."""
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder

    base = tmp_path_factory.mktemp("learnable")
    generate_imagenet_folder(
        base / "source", num_classes=4, train_per_class=24, val_per_class=6, width=64, height=48, seed=3
    )
    shard_imagenet(base / "source", base / "shards", val_per_class=4, samples_per_shard=16, seed=3, progress=False)
    return base / "shards"


def training_config(shards: Path, workdir: Path, run_name: str, *extra: str):
    from pipeline.config import load_config

    return load_config(
        overrides=[
            f"data.root={shards}",
            "data.train_image_size=32",
            "data.eval_image_size=32",
            "data.loader_workers=0",
            "data.shuffle_buffer=64",
            "model.name=resnet18",
            "optim.batch_size=16",
            "optim.lr=0.4",
            "optim.epochs=3",
            "optim.warmup_epochs=0.3",
            "scaling.num_workers=2",
            "scaling.max_failures=1",
            f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            f"tracking.storage_path={workdir / 'ray'}",
            f"tracking.run_name={run_name}",
            "tracking.experiment=tests",
            "tracking.registered_model=test-model",
            *extra,
        ]
    )


class TrainedRun:
    def __init__(self, config, outcome, workdir: Path, shards: Path) -> None:
        self.config, self.outcome, self.workdir, self.shards = config, outcome, workdir, shards

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.tracking_uri


@pytest.fixture(scope="session")
def trained_run(ray_session, learnable_shards, tmp_path_factory) -> TrainedRun:
    """One real 2-worker Ray Train run, 3 epochs (val k-NN top-1 in the last), registered in a SQLite MLflow store."""
    from pipeline.train.driver import run_training

    workdir = tmp_path_factory.mktemp("trained")
    config = training_config(learnable_shards, workdir, "shared-run", "tracking.knn_every=3")
    return TrainedRun(config, run_training(config), workdir, learnable_shards)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a SQLite store in the test's folder; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
