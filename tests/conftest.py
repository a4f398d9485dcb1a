"""Session-wide fixtures: tiny real JPEG shards written straight with webdataset, and one Ray instance."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.manifest import ClassInfo, Manifest, ShardInfo, file_sha256, write_manifest


def jpeg_bytes(label: int, index: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small real JPEG whose colour encodes the label (so decoded batches can be checked)."""
    rng = np.random.default_rng([label, index])
    pixels = np.full((size[1], size[0], 3), (label * 40) % 256, dtype=np.uint8)
    pixels = np.clip(pixels.astype(int) + rng.integers(-8, 8, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_split(split_dir: Path, shard_sizes: list[int], num_classes: int = 4, split: str = "val") -> Manifest:
    """Shards with the given sample counts; keys are 'sNNNNNN' so tests can audit exactly-once."""
    split_dir.mkdir(parents=True, exist_ok=True)
    shards, serial = [], 0
    for shard_index, size in enumerate(shard_sizes):
        name = f"{split}-{shard_index:06d}.tar"
        with wds.TarWriter(str(split_dir / name)) as writer:
            for _ in range(size):
                label = serial % num_classes
                writer.write({"__key__": f"s{serial:06d}", "jpg": jpeg_bytes(label, serial), "cls": str(label).encode()})
                serial += 1
        shards.append(ShardInfo(name, size, file_sha256(split_dir / name), (split_dir / name).stat().st_size))
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
