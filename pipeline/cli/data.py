"""`generate`, `shard`, `verify`, `index`, `load`: making, checking and streaming shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigFiles, Overrides, app, fail, resolve_config
from pipeline.config import require_shards


@app.command()
def generate(
    output: Annotated[Path, typer.Option(help="folder to create in the ILSVRC2012 layout")] = Path("data/synthetic"),
    classes: Annotated[int, typer.Option(min=2, help="number of classes")] = 10,
    train_per_class: Annotated[int, typer.Option(min=1, help="train images per class")] = 60,
    val_per_class: Annotated[int, typer.Option(min=0, help="official-val (becomes test) images per class")] = 10,
    width: Annotated[int, typer.Option(min=8, help="image width, pixels (ImageNet-like: 500)")] = 500,
    height: Annotated[int, typer.Option(min=8, help="image height, pixels (ImageNet-like: 375)")] = 375,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality")] = 90,
    val_layout: Annotated[str, typer.Option(help="official-val layout: folders | devkit | loc_csv")] = "folders",
    seed: Annotated[int, typer.Option(help="random seed; same seed, same files")] = 0,
    processes: Annotated[int, typer.Option(min=1, help="parallel processes")] = 1,
) -> None:
    """Write an ImageNet-layout folder of real JPEGs with learnable classes (no download needed)."""
    from pipeline.data.synthetic import generate_imagenet_folder

    if val_layout not in ("folders", "devkit", "loc_csv"):
        fail(f"--val-layout {val_layout!r} is not one of folders, devkit, loc_csv")
    generate_imagenet_folder(
        output,
        num_classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        width=width,
        height=height,
        quality=quality,
        seed=seed,
        val_layout=val_layout,
        processes=processes,
    )
    typer.echo(f"wrote {classes} classes x {train_per_class} train + {val_per_class} val images to {output}")


@app.command()
def shard(
    source: Annotated[Path, typer.Option(help="ILSVRC2012 folder: train/<wnid>/*.JPEG and val/")] = Path(
        "data/synthetic"
    ),
    output: Annotated[Path, typer.Option(help="shard root; writes train/, val/, test/ with manifest.json")] = Path(
        "data/shards"
    ),
    val_per_class: Annotated[
        int, typer.Option(min=0, help="train images per class held out as the val split (0: none)")
    ] = 50,
    samples_per_shard: Annotated[int, typer.Option(min=1, help="samples per tar shard")] = 1000,
    max_side: Annotated[
        Optional[int],
        typer.Option(min=16, help="pre-resize longer side to at most this (re-encodes) (default: keep size)"),
    ] = None,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality when re-encoding")] = 90,
    processes: Annotated[int, typer.Option(min=1, help="parallel shard writers")] = 1,
    seed: Annotated[int, typer.Option(help="seed for the val hold-out and the cross-shard shuffle")] = 0,
    resume: Annotated[bool, typer.Option(help="keep complete shards from an interrupted run")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Convert ImageNet (ILSVRC2012 layout) into webdataset shards for train, val (held out) and test."""
    from pipeline.data.sharding import shard_imagenet

    summary = shard_imagenet(
        source,
        output,
        val_per_class=val_per_class,
        samples_per_shard=samples_per_shard,
        max_side=max_side,
        quality=quality,
        processes=processes,
        seed=seed,
        resume=resume,
        progress=progress,
    )
    typer.echo(str(summary))


@app.command()
def verify(
    root: Annotated[Path, typer.Argument(help="shard root (with train/ val/ test/) or one split folder")] = Path(
        "data/shards"
    ),
    decode: Annotated[bool, typer.Option(help="decode every image (slower, catches corrupt JPEGs)")] = True,
) -> None:
    """Check shards against their manifest: files, sizes, checksums, counts, labels, decodability."""
    from pipeline.data.verify import verify_dataset, verify_split

    results = (
        {root.name: verify_split(root, decode=decode)}
        if (root / "manifest.json").is_file()
        else verify_dataset(root, decode=decode)
    )
    if not results:
        fail(f"{root} holds no split with a manifest.json")
    bad = False
    for split, problems in results.items():
        typer.echo(f"{split}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            typer.echo(f"  - {problem}")
        bad = bad or bool(problems)
    raise typer.Exit(1 if bad else 0)


@app.command()
def index(
    shard_dir: Annotated[Path, typer.Argument(help="folder of .tar shards made elsewhere (jpg/cls keys)")],
    split: Annotated[str, typer.Option(help="split these shards hold: train | val | test")] = "train",
    pattern: Annotated[str, typer.Option(help="glob of shard files inside the folder")] = "*.tar",
    classes_file: Annotated[
        Optional[Path], typer.Option(help="'wnid name' per line, in class-index order (default: names = indices)")
    ] = None,
) -> None:
    """Write manifest.json for existing shards so they can be trained on."""
    from pipeline.data.verify import index_shards

    if split not in ("train", "val", "test"):
        fail(f"--split {split!r} is not one of train, val, test")
    manifest = index_shards(shard_dir, split, pattern=pattern, classes_file=classes_file)
    typer.echo(f"indexed {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_classes} classes")


@app.command()
def load(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    split: Annotated[str, typer.Option(help="split to stream: train | val | test")] = "train",
    epochs: Annotated[int, typer.Option(min=1, help="epochs to stream")] = 1,
) -> None:
    """Stream a split as every rank of the configured world would, and check the plan's guarantees."""
    from pipeline.data.loadcheck import check_loading

    config = resolve_config(config_files, overrides)
    require_shards(config, (split,))
    report = check_loading(config, split, epochs=epochs)
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)
