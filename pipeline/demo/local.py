"""`make demo`: the whole pipeline on generated data, on this machine, with no downloads.

    imagenet-pipeline demo            # or: make demo

Steps: generate an ImageNet-layout folder of real JPEGs -> shard it into train/val/test webdataset
shards -> verify the shards -> train ResNet-18 with 2 Ray Train workers, tracked in MLflow, and
register the best model. Data steps are skipped when their output is complete, so a rerun only trains.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline import metrics as m
from pipeline.config import Config
from pipeline.data.manifest import SPLITS, manifest_path
from pipeline.storage import require_local
from pipeline.tracking.uri import mlflow_ui_command

# Small enough for 2 cores, large enough that 10 classes are learnable: 10 x 80 train, 10 x 10 test.
DEMO_CLASSES = 10
DEMO_TRAIN_PER_CLASS = 80
DEMO_TEST_PER_CLASS = 10
DEMO_VAL_PER_CLASS = 10
DEMO_IMAGE_SIZE = (160, 120)


def run_demo(config: Config, data_dir: Path) -> bool:
    if not prepare_demo_data(config, data_dir):
        typer.echo("\ndemo FAILED: the shards did not verify")
        return False

    _step(f"train {config.model.name} with {config.scaling.num_workers} Ray Train workers")
    from pipeline.cluster.session import ensure_ray
    from pipeline.train.driver import run_training

    ensure_ray()
    outcome = run_training(config)
    best = outcome.best_metrics
    chance = 100.0 / DEMO_CLASSES
    typer.echo(
        f"\nbest val top-1 {best[m.VAL_TOP1]:.1f} % (chance {chance:.0f} %), top-5 {best[m.VAL_TOP5]:.1f} %, "
        f"{outcome.seconds:.0f} s of training"
    )
    typer.echo(
        f"registered model '{config.tracking.registered_model}' version {outcome.model_version}"
        f"{' -> @champion' if outcome.promoted else ' (champion kept: it scored higher)'}"
    )
    typer.echo(
        f"evaluate it once on test: imagenet-pipeline evaluate -c jobs/configs/demo.yaml "
        f"--model models:/{config.tracking.registered_model}@champion"
    )
    typer.echo(f"open the MLflow UI:       {mlflow_ui_command(config)}")
    return best[m.VAL_TOP1] > chance


def prepare_demo_data(config: Config, data_dir: Path) -> bool:
    """Generate, shard and verify the demo data under `data_dir` (kept when complete); True when it verifies."""
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder
    from pipeline.data.verify import verify_dataset

    source, shards = data_dir / "source", require_local(config.data.root, "data.root")  # the demo writes shards
    _step("generate")
    if (source / "train").is_dir():
        typer.echo(f"  {source} exists, kept")
    else:
        width, height = DEMO_IMAGE_SIZE
        generate_imagenet_folder(
            source,
            num_classes=DEMO_CLASSES,
            train_per_class=DEMO_TRAIN_PER_CLASS,
            val_per_class=DEMO_TEST_PER_CLASS,
            width=width,
            height=height,
            seed=config.seed,
            processes=2,
        )
        typer.echo(f"  wrote {DEMO_CLASSES} classes to {source}")

    _step("shard")
    if all(manifest_path(shards / split).is_file() for split in SPLITS):
        typer.echo(f"  {shards} complete, kept")
    else:
        summary = shard_imagenet(
            source,
            shards,
            val_per_class=DEMO_VAL_PER_CLASS,
            samples_per_shard=100,
            processes=2,
            seed=config.seed,
            resume=shards.exists(),
            progress=False,
        )
        typer.echo(f"  {summary}")

    _step("verify")
    problems = verify_dataset(shards, decode=True)
    for split, issues in problems.items():
        typer.echo(f"  {split}: {'ok' if not issues else issues}")
    return not any(problems.values())


def _step(name: str) -> None:
    typer.echo(f"\n== {name} [{time.strftime('%H:%M:%S')}]")
