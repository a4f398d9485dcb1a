"""`make demo`: the whole pipeline on generated data, on this machine, with no downloads.

    imagenet-pipeline demo            # or: make demo

Steps: generate an ImageNet-layout folder of real JPEGs -> shard it into train/val/test webdataset
shards -> verify the shards -> stream every split as each rank of the configured world would.
Each step is skipped when its output is already complete, so a second run is quick.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.config import Config
from pipeline.loadcheck import check_loading
from pipeline.manifest import SPLITS, manifest_path

# Small enough for 2 cores, large enough that 10 classes are learnable: 10 x 80 train, 10 x 10 test.
DEMO_CLASSES = 10
DEMO_TRAIN_PER_CLASS = 80
DEMO_TEST_PER_CLASS = 10
DEMO_VAL_PER_CLASS = 10
DEMO_IMAGE_SIZE = (160, 120)


def run_demo(config: Config, data_dir: Path) -> bool:
    from pipeline.sharding import shard_imagenet
    from pipeline.synthetic import generate_imagenet_folder
    from pipeline.verify import verify_dataset

    source, shards = data_dir / "source", Path(config.data.root)
    _step("generate")
    if (source / "train").is_dir():
        typer.echo(f"  {source} exists, kept")
    else:
        width, height = DEMO_IMAGE_SIZE
        generate_imagenet_folder(
            source, num_classes=DEMO_CLASSES, train_per_class=DEMO_TRAIN_PER_CLASS,
            val_per_class=DEMO_TEST_PER_CLASS, width=width, height=height, seed=config.seed, processes=2,
        )
        typer.echo(f"  wrote {DEMO_CLASSES} classes to {source}")

    _step("shard")
    if all(manifest_path(shards / split).is_file() for split in SPLITS):
        typer.echo(f"  {shards} complete, kept")
    else:
        summary = shard_imagenet(
            source, shards, val_per_class=DEMO_VAL_PER_CLASS, samples_per_shard=100, processes=2,
            seed=config.seed, resume=shards.exists(), progress=False,
        )
        typer.echo(f"  {summary}")

    _step("verify")
    problems = verify_dataset(shards, decode=True)
    for split, issues in problems.items():
        typer.echo(f"  {split}: {'ok' if not issues else issues}")
    ok = not any(problems.values())

    for split in SPLITS:
        _step(f"stream {split} as {config.scaling.world_size} ranks")
        report = check_loading(config, split, epochs=2 if split == "train" else 1)
        typer.echo("  " + report.summary().replace("\n", "\n  "))
        ok = ok and report.ok
    typer.echo("\ndemo " + ("succeeded" if ok else "FAILED"))
    return ok


def _step(name: str) -> None:
    typer.echo(f"\n== {name} [{time.strftime('%H:%M:%S')}]")
