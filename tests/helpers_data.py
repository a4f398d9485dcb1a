"""Small ImageNet-layout trees for the data tests: the project's generator plus the bad files ImageNet really has."""

from __future__ import annotations

from pathlib import Path

import webdataset

from pipeline.data.synthetic import generate_imagenet_folder, make_jpeg_bytes

# 64x48 keeps every test fast; sizes matter only in the file-size test of the generator.
SMALL = {"width": 64, "height": 48}


def small_imagenet(
    root: Path,
    *,
    val_layout: str = "folders",
    num_classes: int = 3,
    train_per_class: int = 8,
    val_per_class: int = 2,
    seed: int = 0,
) -> Path:
    return generate_imagenet_folder(
        root,
        num_classes=num_classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        seed=seed,
        val_layout=val_layout,
        **SMALL,
    )


def add_bad_files(class_dir: Path) -> dict[str, str]:
    """Write the kinds of odd files found in ILSVRC2012 train/; returns {file name: what should happen to it}."""
    good = make_jpeg_bytes(64, 48, seed=1)
    files = {
        "cmyk.JPEG": (make_jpeg_bytes(64, 48, seed=2, mode="CMYK"), "converted"),
        "gray.JPEG": (make_jpeg_bytes(64, 48, seed=3, mode="L"), "converted"),
        "png_inside.JPEG": (make_jpeg_bytes(64, 48, seed=4, format="PNG"), "converted"),
        "photo.png": (make_jpeg_bytes(64, 48, seed=5, format="PNG"), "converted"),
        "truncated.JPEG": (good[: len(good) // 2], "skipped"),
        "garbage.JPEG": (b"this is not an image" * 10, "skipped"),
        "empty.JPEG": (b"", "skipped"),
        "notes.txt": (b"not an image", "stray"),
    }
    for name, (data, _) in files.items():
        (class_dir / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}


def read_samples(shard: Path) -> list[dict]:
    """Samples exactly as a plain webdataset pipeline sees them (image bytes, integer label)."""
    dataset = webdataset.WebDataset(str(shard), shardshuffle=False).decode()
    return list(dataset)
