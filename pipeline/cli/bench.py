"""`bench-data`, `bench-train`, `bench-plan`, `bench-retrieval`, `bench-gpu`: benchmarks that print figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import app, fail


@app.command(name="bench-data")
def bench_data(
    work_dir: Annotated[Path, typer.Option(help="scratch folder for the benchmark images and shards")] = Path(
        "data/bench"
    ),
    images: Annotated[int, typer.Option(min=8, help="ImageNet-sized JPEGs (500x375, q90) to decode")] = 400,
    repeats: Annotated[int, typer.Option(min=1, help="passes per path; the best is reported")] = 2,
) -> None:
    """Benchmark: decoded + augmented train images/s per core, ours vs torchvision's reference path."""
    from pipeline.bench.data import run_data_benchmark

    run_data_benchmark(work_dir, num_images=images, repeats=repeats)


@app.command(name="bench-train")
def bench_train(
    work_dir: Annotated[
        Path, typer.Option(help="scratch folder: generated shards, throw-away MLflow store and Ray storage")
    ] = Path("data/bench_train"),
    only: Annotated[Optional[str], typer.Option(help="overhead | startup | trial-gap (default: all)")] = None,
    model: Annotated[str, typer.Option(help="architecture for both paths")] = "resnet18",
    image_size: Annotated[int, typer.Option(min=16, help="overhead: training crop side, pixels")] = 64,
    global_batch: Annotated[int, typer.Option(min=1, help="overhead: global batch")] = 32,
    epochs: Annotated[int, typer.Option(min=2, help="overhead: epochs per run; the first is warm-up")] = 2,
    train_images: Annotated[int, typer.Option(min=1, help="overhead: training images per epoch")] = 4096,
    rounds: Annotated[int, typer.Option(min=3, help="overhead: alternating reference/ours pairs")] = 3,
) -> None:
    """Benchmark: Ray Train vs plain torchrun DDP images/s, a 1-epoch train job's start-up time, and a sweep's
    fixed cost per trial."""
    from pipeline.bench.overhead import run_overhead_benchmark
    from pipeline.bench.startup import run_startup_benchmark
    from pipeline.bench.trials import run_trial_gap_benchmark

    if only not in (None, "overhead", "startup", "trial-gap"):
        fail(f"--only {only!r} is not one of overhead, startup, trial-gap")
    if only in (None, "overhead"):
        run_overhead_benchmark(
            work_dir,
            model=model,
            image_size=image_size,
            global_batch=global_batch,
            epochs=epochs,
            train_images=train_images,
            rounds=rounds,
        )
    if only in (None, "startup"):
        run_startup_benchmark(work_dir, model=model)
    if only in (None, "trial-gap"):
        run_trial_gap_benchmark(work_dir, model=model)


@app.command(name="bench-plan")
def bench_plan(
    datasets: Annotated[
        str, typer.Option(help="comma-separated: imagenet-1k, imagenet-22k")
    ] = "imagenet-1k,imagenet-22k",
    worlds: Annotated[str, typer.Option(help="comma-separated world sizes (ranks)")] = "8,64,512",
    loaders: Annotated[str, typer.Option(help="comma-separated DataLoader processes per rank")] = "2,8",
    out: Annotated[Optional[Path], typer.Option(help="also write the figures as JSON here (default: none)")] = None,
) -> None:
    """Benchmark (simulated, no data read): bytes read per bytes planned with and without sample indexes, plan
    time per rank and manifest size, for ImageNet-1k and -22k layouts at 8-512 ranks."""
    from pipeline.bench.plan import DATASETS, run_plan_benchmark

    names = tuple(name.strip() for name in datasets.split(","))
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        fail(f"--datasets: {', '.join(unknown)} not among {', '.join(DATASETS)}")
    try:
        world_sizes = tuple(int(n) for n in worlds.split(","))
        processes = tuple(int(n) for n in loaders.split(","))
    except ValueError:
        fail(f"--worlds {worlds!r} / --loaders {loaders!r}: comma-separated whole numbers, e.g. 8,64")
    if min(world_sizes + processes) < 1:
        fail("--worlds and --loaders count ranks and processes: each at least 1")
    run_plan_benchmark(names, world_sizes, processes, out)


@app.command(name="bench-retrieval")
def bench_retrieval(
    work_dir: Annotated[Path, typer.Option(help="scratch folder: generated shards, a checkpoint, embeddings")] = Path(
        "data/bench_retrieval"
    ),
    only: Annotated[Optional[str], typer.Option(help="embed | knn | index (default: all three)")] = None,
    images: Annotated[int, typer.Option(min=8, help="embed: generated 500x375 JPEGs to embed")] = 256,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds per path")] = 3,
    gallery: Annotated[
        Optional[list[str]], typer.Option(help="index: ROWSxDIM synthetic galleries, repeatable (default: 100000x512)")
    ] = None,
    kinds: Annotated[
        str,
        typer.Option(
            help="index: comma-separated kinds to measure; flat (exact) always runs, as the reference for recall"
        ),
    ] = "flat,ivf,hnsw",
) -> None:
    """Benchmark: embed images/s (Ray Data vs a plain forward pass), the cost of tracking.knn_every, and faiss
    latency, exact vs approximate."""
    from pipeline.bench.retrieval import run_retrieval_benchmark

    sizes = []
    for text in gallery or ["100000x512"]:
        rows, _, dim = text.partition("x")
        if not (rows.isdigit() and dim.isdigit() and int(rows) > 0 and int(dim) > 0):
            fail(f"--gallery {text!r}: expected ROWSxDIM, e.g. 100000x512")
        sizes.append((int(rows), int(dim)))
    run_retrieval_benchmark(
        work_dir, only, images, rounds, sizes, tuple(k.strip() for k in kinds.split(",") if k.strip())
    )


@app.command(name="bench-gpu")
def bench_gpu(
    work_dir: Annotated[Path, typer.Option(help="scratch folder: generated ImageNet-sized shards")] = Path(
        "data/bench_gpu"
    ),
    device: Annotated[str, typer.Option(help="cuda, or cpu for the smoke run")] = "cuda",
    smoke: Annotated[bool, typer.Option(help="tiny sizes (the test suite's end-to-end run)")] = False,
    models: Annotated[str, typer.Option(help="comma-separated architectures")] = "resnet50,alexnet,resnet18,resnet152",
    loader_processes: Annotated[
        Optional[str], typer.Option(help="comma-separated loader process counts (default: 4, 8 and all cores but 2)")
    ] = None,
    compile_resnet50: Annotated[
        bool, typer.Option("--compile/--no-compile", help="also ResNet-50 under torch.compile")
    ] = True,
    out: Annotated[Optional[Path], typer.Option(help="also write the table as JSON here (default: none)")] = None,
) -> None:
    """Benchmark on one GPU: the compute ceiling, then real shards with CPU and GPU JPEG decoding (no Ray or MLflow)."""
    from pipeline.bench.gpu import run_gpu_benchmark

    counts = None
    if loader_processes:
        try:
            counts = tuple(int(count) for count in loader_processes.split(","))
        except ValueError:
            fail(f"--loader-processes {loader_processes!r}: expected counts such as 4,8,14")
    run_gpu_benchmark(
        work_dir, device, smoke, tuple(m.strip() for m in models.split(",") if m.strip()), counts, compile_resnet50, out
    )
