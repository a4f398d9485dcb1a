"""The `imagenet-pipeline` command: one entry point, one subcommand per job.

    imagenet-pipeline generate --output data/synthetic
    imagenet-pipeline shard --source data/synthetic --output data/shards
    imagenet-pipeline verify data/shards
    imagenet-pipeline load --set data.root=data/shards
    imagenet-pipeline demo

Every subcommand's --help lists its options with defaults. Commands that train or load take the typed
config: YAML files (`--config`, merged left to right) then dotted overrides (`--set optim.lr=0.2`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT, Config, ConfigError, load_config, require_shards

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Distributed AlexNet/ResNet training on ImageNet webdataset shards (Ray Train, Ray Tune, MLflow).",
)

ConfigFiles = Annotated[
    Optional[list[Path]],
    typer.Option("--config", "-c", help=f"YAML config file(s), merged left to right (default: {DEFAULT_CONFIG.relative_to(PROJECT_ROOT)})"),
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a config key, e.g. --set optim.lr=0.2 (repeatable) (default: none)"),
]


def fail(message: str) -> None:
    """One clear line on stderr and exit status 2: the contract for every bad input."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def resolve_config(config_files: list[Path] | None, overrides: list[str] | None, show: bool = True) -> Config:
    try:
        config = load_config(config_files or None, overrides or None)
    except ConfigError as error:
        fail(str(error))
    if show:
        typer.echo("# resolved config\n" + config.to_yaml())
    return config


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
    from pipeline.synthetic import generate_imagenet_folder

    if val_layout not in ("folders", "devkit", "loc_csv"):
        fail(f"--val-layout {val_layout!r} is not one of folders, devkit, loc_csv")
    try:
        generate_imagenet_folder(
            output, num_classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
            width=width, height=height, quality=quality, seed=seed, val_layout=val_layout, processes=processes,
        )
    except ValueError as error:
        fail(str(error))
    typer.echo(f"wrote {classes} classes x {train_per_class} train + {val_per_class} val images to {output}")


@app.command()
def shard(
    source: Annotated[Path, typer.Option(help="ILSVRC2012 folder: train/<wnid>/*.JPEG and val/")] = Path("data/synthetic"),
    output: Annotated[Path, typer.Option(help="shard root; writes train/, val/, test/ with manifest.json")] = Path("data/shards"),
    val_per_class: Annotated[int, typer.Option(min=0, help="train images per class held out as the val split (0: none)")] = 50,
    samples_per_shard: Annotated[int, typer.Option(min=1, help="samples per tar shard")] = 1000,
    max_side: Annotated[Optional[int], typer.Option(min=16, help="pre-resize longer side to at most this (re-encodes) (default: keep size)")] = None,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality when re-encoding")] = 90,
    processes: Annotated[int, typer.Option(min=1, help="parallel shard writers")] = 1,
    seed: Annotated[int, typer.Option(help="seed for the val hold-out and the cross-shard shuffle")] = 0,
    resume: Annotated[bool, typer.Option(help="keep complete shards from an interrupted run")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Convert ImageNet (ILSVRC2012 layout) into webdataset shards for train, val (held out) and test."""
    from pipeline.sharding import shard_imagenet

    try:
        summary = shard_imagenet(
            source, output, val_per_class=val_per_class, samples_per_shard=samples_per_shard,
            max_side=max_side, quality=quality, processes=processes, seed=seed, resume=resume, progress=progress,
        )
    except ValueError as error:
        fail(str(error))
    typer.echo(str(summary))


@app.command()
def verify(
    root: Annotated[Path, typer.Argument(help="shard root (with train/ val/ test/) or one split folder")] = Path("data/shards"),
    decode: Annotated[bool, typer.Option(help="decode every image (slower, catches corrupt JPEGs)")] = True,
) -> None:
    """Check shards against their manifest: files, sizes, checksums, counts, labels, decodability."""
    from pipeline.verify import verify_dataset, verify_split

    try:
        results = {root.name: verify_split(root, decode=decode)} if (root / "manifest.json").is_file() \
            else verify_dataset(root, decode=decode)
    except ValueError as error:
        fail(str(error))
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
    classes_file: Annotated[Optional[Path], typer.Option(help="'wnid name' per line, in class-index order (default: names = indices)")] = None,
) -> None:
    """Write manifest.json for existing shards so they can be trained on."""
    from pipeline.verify import index_shards

    if split not in ("train", "val", "test"):
        fail(f"--split {split!r} is not one of train, val, test")
    try:
        manifest = index_shards(shard_dir, split, pattern=pattern, classes_file=classes_file)
    except ValueError as error:
        fail(str(error))
    typer.echo(f"indexed {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_classes} classes")


@app.command()
def load(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    split: Annotated[str, typer.Option(help="split to stream: train | val | test")] = "train",
    epochs: Annotated[int, typer.Option(min=1, help="epochs to stream")] = 1,
) -> None:
    """Stream a split as every rank of the configured world would, and check the plan's guarantees."""
    from pipeline.loadcheck import check_loading

    config = resolve_config(config_files, overrides)
    try:
        require_shards(config, (split,))
        report = check_loading(config, split, epochs=epochs)
    except ValueError as error:
        fail(str(error))
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def train(config_files: ConfigFiles = None, overrides: Overrides = None) -> None:
    """Train with Ray Train (data parallel), track in MLflow, register the best model."""
    config = resolve_config(config_files, overrides)
    try:
        require_shards(config, ("train", "val"))  # before the slow imports and Ray's start
        from pipeline.trainer import ensure_ray, run_training

        ensure_ray()
        outcome = run_training(config)
    except ValueError as error:
        fail(str(error))
    print_outcome(outcome, config)


def print_outcome(outcome, config: Config) -> None:
    from pipeline import metrics as m
    from pipeline.tracking import mlflow_ui_command

    best = outcome.best_metrics
    typer.echo(
        f"\nrun '{outcome.run_name}' finished in {outcome.seconds:.0f} s; best epoch {best.get(m.EPOCH, '?')}: "
        f"val top-1 {best.get(m.VAL_TOP1, float('nan')):.2f} %, top-5 {best.get(m.VAL_TOP5, float('nan')):.2f} %"
    )
    if outcome.model_version:
        typer.echo(f"registered model version {outcome.model_version}"
                   f"{' (now champion)' if outcome.promoted else ' (champion unchanged)'}")
    typer.echo(f"open the MLflow UI: {mlflow_ui_command(config)}")


@app.command()
def tune(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="continue the sweep named tracking.run_name after an interruption")] = False,
) -> None:
    """Search learning rate, batch size and dropout with Ray Tune + ASHA; register the best trial's model."""
    config = resolve_config(config_files, overrides)
    if resume and not config.tracking.run_name:
        fail("--resume needs the sweep's name: --set tracking.run_name=<name>")
    try:
        require_shards(config, ("train", "val"))
        from pipeline.search import run_search

        outcome = run_search(config, resume=resume)
    except ValueError as error:
        fail(str(error))
    if outcome.best is not None:
        typer.echo(f"\nbest trial {outcome.best.trial_id}: val top-1 {outcome.best.best_top1:.2f} % with {outcome.best.params}")
    if outcome.model_version:
        typer.echo(f"registered model '{config.tracking.registered_model}' version {outcome.model_version}"
                   f"{' -> @champion' if outcome.promoted else ' (champion unchanged)'}")


ModelSource = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/model or a "
                 "checkpoint folder (default: models:/<tracking.registered_model>@champion)"),
]


@app.command()
def evaluate(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: ModelSource = None,
    split: Annotated[str, typer.Option(help="split to evaluate on: test (final, once) | val | train")] = "test",
    log: Annotated[bool, typer.Option(help="log test/top1, test/top5 to the model's MLflow run")] = True,
) -> None:
    """Top-1 / top-5 of a registered model, run or checkpoint on the test split, beside published figures."""
    from pipeline.evaluate import evaluate_model

    config = resolve_config(config_files, overrides, show=False)
    source = model or f"models:/{config.tracking.registered_model}@champion"
    try:
        evaluate_model(config, source, split=split, log_to_mlflow=log)
    except ValueError as error:
        fail(str(error))


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="image files and/or folders (searched recursively)")],
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    model: ModelSource = None,
    top_k: Annotated[int, typer.Option(min=1, help="classes shown per image")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table (default: table)")] = False,
) -> None:
    """Top-k classes with names and probabilities for image files or folders."""
    from pipeline.predict import format_predictions
    from pipeline.predict import predict as run_predict

    config = resolve_config(config_files, overrides, show=False)
    source = model or f"models:/{config.tracking.registered_model}@champion"
    try:
        predictions = run_predict(config, source, inputs, top_k=top_k)
    except ValueError as error:
        fail(str(error))
    typer.echo(format_predictions(predictions, as_json=as_json))


@app.command(name="bench-data")
def bench_data(
    work_dir: Annotated[Path, typer.Option(help="scratch folder for the benchmark images and shards")] = Path("data/bench"),
    images: Annotated[int, typer.Option(min=8, help="ImageNet-sized JPEGs (500x375, q90) to decode")] = 400,
    repeats: Annotated[int, typer.Option(min=1, help="passes per path; the best is reported")] = 2,
) -> None:
    """Benchmark: decoded + augmented train images/s per core, ours vs torchvision's reference path."""
    from pipeline.benchmark_data import run_data_benchmark

    run_data_benchmark(work_dir, num_images=images, repeats=repeats)


@app.command(name="bench-train")
def bench_train(
    work_dir: Annotated[Path, typer.Option(help="scratch folder: generated shards, throw-away MLflow store and Ray storage")] = Path("data/bench_train"),
    only: Annotated[Optional[str], typer.Option(help="overhead | startup (default: both)")] = None,
    model: Annotated[str, typer.Option(help="architecture for both paths")] = "resnet18",
    image_size: Annotated[int, typer.Option(min=16, help="overhead: training crop side, pixels")] = 64,
    global_batch: Annotated[int, typer.Option(min=1, help="overhead: global batch")] = 32,
    epochs: Annotated[int, typer.Option(min=2, help="overhead: epochs per run; the first is warm-up")] = 2,
    train_images: Annotated[int, typer.Option(min=1, help="overhead: training images per epoch")] = 512,
    rounds: Annotated[int, typer.Option(min=1, help="overhead: alternating reference/ours pairs")] = 2,
) -> None:
    """Benchmark: Ray Train vs plain torchrun DDP images/s, and a 1-epoch train job's start-up time."""
    from pipeline.benchmark_startup import run_startup_benchmark
    from pipeline.benchmark_train import run_overhead_benchmark

    if only not in (None, "overhead", "startup"):
        fail(f"--only {only!r} is not one of overhead, startup")
    try:
        if only in (None, "overhead"):
            run_overhead_benchmark(work_dir, model=model, image_size=image_size, global_batch=global_batch,
                                   epochs=epochs, train_images=train_images, rounds=rounds)
        if only in (None, "startup"):
            run_startup_benchmark(work_dir, model=model)
    except ValueError as error:
        fail(str(error))


@app.command()
def demo(
    config_files: ConfigFiles = None,
    overrides: Overrides = None,
    data_dir: Annotated[Path, typer.Option(help="where the demo's generated images and shards go")] = Path("data/demo"),
) -> None:
    """End to end on generated data: generate, shard, verify, train on 2 Ray workers, register in MLflow."""
    from pipeline.demo import run_demo

    files = config_files or [PROJECT_ROOT / "jobs" / "configs" / "demo.yaml"]
    config = resolve_config(files, [f"data.root={data_dir / 'shards'}", *(overrides or [])])
    try:
        ok = run_demo(config, data_dir)
    except ValueError as error:
        fail(str(error))
    raise typer.Exit(0 if ok else 1)


@app.command(name="config")
def show_config(config_files: ConfigFiles = None, overrides: Overrides = None) -> None:
    """Print the resolved config (YAML) after merging files and overrides."""
    resolve_config(config_files, overrides)


from pipeline.cli_cluster import cluster_app, job_app  # noqa: E402 - sub-commands register on `app`

app.add_typer(job_app, name="job")
app.add_typer(cluster_app, name="cluster")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
