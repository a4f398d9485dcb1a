"""Benchmark of the GPU path on one device: the compute ceiling, then real shards with CPU and with GPU decoding.

    imagenet-pipeline bench-gpu --out bench_gpu.json
    PYTHONPATH=.:wheels python -m pipeline.bench.gpu --out bench_gpu.json     # a bare GPU box: no Ray, no MLflow
    imagenet-pipeline bench-gpu --device cpu --smoke                          # the test suite's end-to-end run

Every figure goes through the project's own training step (`pipeline.train.step.train_one_epoch`: bf16
autocast and channels_last on CUDA, the device-side loss sums) and, for shards, its own loader:
1. ceiling: training images/s on synthetic uint8 batches already on the device (ResNet-50 with and without
   `torch.compile`, AlexNet, ResNet-18, ResNet-152);
2. real shards of generated ImageNet-sized JPEGs (500x375) with CPU decoding in 4, 8 and all-but-2 loader
   processes;
3. the same shards with `data.decode: gpu` (nvJPEG in the training process);
4. a table: images/s, share of the ceiling, data-wait share, peak device memory; also written as JSON.
Synthetic figures are the second of two epochs (the first pays cudnn autotuning and compilation); shard figures
are one epoch after every loader process has delivered its first batch (the loader's start would otherwise be
most of a short benchmark epoch). Nothing here asserts a speed.

Imports only torch, torchvision and the project's data path (which needs numpy, Pillow, PyYAML, pydantic,
webdataset and braceexpand): docs/performance.md, "GPU (`bench-gpu`)", says how to put them on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import Config, load_config
from pipeline.data.loader import IGNORE_LABEL, Batch, build_loader
from pipeline.errors import BenchmarkError
from pipeline.train.models import build_model
from pipeline.train.step import RankDevice, Trainee, autocast_dtype, record_epoch, train_one_epoch

CEILING_MODELS = ("resnet50", "alexnet", "resnet18", "resnet152")
TARGET_RESNET50 = 3000.0  # images/s, bf16, one H200, synthetic
TARGET_SHARE_GPU_DECODE = 0.90  # real shards with GPU decoding, share of the synthetic figure


@dataclass
class Figure:
    model: str
    feed: str  # synthetic | cpu decode, N loader processes | gpu decode, N loader processes
    compiled: bool
    images_per_second: float
    data_wait_share: float
    peak_memory_gib: float
    share_of_ceiling: float | None = None


@dataclass(frozen=True)
class Sizes:
    """What the run costs: the full GPU run, or the smoke run of the test suite (tiny, any device)."""

    image_size: int
    batch: int
    synthetic_steps: int
    images: int  # generated JPEGs for the shard runs
    width: int
    height: int

    @classmethod
    def for_run(cls, smoke: bool) -> "Sizes":
        if smoke:
            return cls(image_size=64, batch=8, synthetic_steps=2, images=32, width=80, height=64)  # AlexNet: >= 63 px
        return cls(image_size=224, batch=256, synthetic_steps=30, images=8192, width=500, height=375)


def run_gpu_benchmark(
    work_dir: Path,
    device_name: str,
    smoke: bool,
    models: tuple[str, ...],
    loader_processes: tuple[int, ...] | None,
    compile_resnet50: bool,
    out: Path | None,
) -> list[Figure]:
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device here; pass --device cpu for the smoke run")
    sizes = Sizes.for_run(smoke)
    processes = loader_processes or _default_processes()
    shards = _shards(work_dir, sizes)
    figures: list[Figure] = []
    # What matters most runs first, and the table is rewritten after every figure: a run cut short (GPU time is
    # rented by the minute) still leaves what it measured. The compiled ResNet-50 (a minute of compilation) is last.
    for name, feed, count, compiled in _plan(models, processes, compile_resnet50):
        if feed == "synthetic":
            figure = _synthetic(name, compiled, device, sizes)
        else:
            figure = _from_shards(name, feed, count, device, sizes, shards)
        ceiling = next(
            (f.images_per_second for f in figures if f.model == name and f.feed == "synthetic" and not f.compiled), None
        )
        if feed != "synthetic" and ceiling:
            figure.share_of_ceiling = figure.images_per_second / ceiling
        figures.append(figure)
        _write(out, device, sizes, figures)
    print(format_table(figures, device))
    if out is not None:
        print(f"wrote {out}")
    return figures


def _plan(
    models: tuple[str, ...], processes: tuple[int, ...], compile_resnet50: bool
) -> list[tuple[str, str, int, bool]]:
    """(model, synthetic | cpu | gpu, loader processes, compiled) in the order they run. GPU decoding uses the
    most loader processes (they only read bytes and draw crops then); on a CPU the same route decodes on the CPU
    device, which is what the smoke run checks end to end."""
    plan = []
    for name in models:
        plan.append((name, "synthetic", 0, False))
        plan.append((name, "gpu", processes[-1], False))
        plan += [(name, "cpu", count, False) for count in reversed(processes)]
    if compile_resnet50 and "resnet50" in models:
        plan.append(("resnet50", "synthetic", 0, True))
    return plan


def _write(out: Path | None, device: torch.device, sizes: Sizes, figures: list[Figure]) -> None:
    if out is None:
        return
    record = {"device": _device_label(device), "sizes": asdict(sizes), "figures": [asdict(f) for f in figures]}
    with storage.atomic_write(out) as handle:
        handle.write(json.dumps(record, indent=2).encode("utf-8"))


def _default_processes() -> tuple[int, ...]:
    cores = os.cpu_count() or 1
    return tuple(sorted({count for count in (4, 8, max(1, cores - 2)) if count <= max(1, cores - 2)}))


def _config(name: str, sizes: Sizes, shards: Path, processes: int = 0) -> Config:
    return load_config(
        overrides=[
            f"model.name={name}",
            f"data.root={shards}",
            f"data.train_image_size={sizes.image_size}",
            f"data.eval_image_size={sizes.image_size}",
            f"data.loader_workers={processes}",
            "data.shuffle_buffer=64",
            f"optim.batch_size={sizes.batch}",
            "optim.lr=0.1",
            "optim.epochs=2",
            "scaling.num_workers=0",
        ]
    )


def _rank(device: torch.device) -> RankDevice:
    return RankDevice(
        rank=0,
        world_size=1,
        device=device,
        autocast_dtype=autocast_dtype("auto", device),
        channels_last=device.type == "cuda",
    )


class _SyntheticLoader:
    """The same uint8 batch, already on the device, `steps` times: the step alone, with nothing to wait for."""

    def __init__(self, batch: Batch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def _synthetic(name: str, compiled: bool, device: torch.device, sizes: Sizes) -> Figure:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (sizes.batch, 3, sizes.image_size, sizes.image_size), dtype=torch.uint8, generator=generator
    ).to(device)
    labels = torch.randint(0, 1000, (sizes.batch,), generator=generator)
    loader = _SyntheticLoader(Batch(images, labels, [""] * sizes.batch), sizes.synthetic_steps)
    return _measure(name, "synthetic", compiled, device, sizes, loader, num_classes=1000)


def _from_shards(name: str, decode: str, processes: int, device: torch.device, sizes: Sizes, shards: Path) -> Figure:
    config = _config(name, sizes, shards, processes)
    # The data section alone: the whole config would (rightly) refuse gpu decoding without scaling.use_gpu,
    # and this process is the training process, with no Ray around it.
    data = config.data.model_copy(update={"decode": decode})
    loader = _TimedLoader(
        build_loader(
            data,
            "train",
            rank=0,
            world_size=1,
            batch_size=sizes.batch,
            seed=0,
            pin_memory=device.type == "cuda",
            decode_device=device if decode == "gpu" else None,
        )
    )
    feed = f"{decode} decode, {processes} loader processes"
    # One epoch, measured after every loader process has delivered its first batch (the loader's start is a
    # per-epoch cost the job pays, but on a short benchmark epoch it would be most of the figure).
    return _measure(
        name,
        feed,
        False,
        device,
        sizes,
        loader,
        loader.manifest.num_classes,
        config,
        epochs=1,
        skip_batches=min(processes + 2, len(loader) // 2),
    )


class _TimedLoader:
    """A loader timed batch by batch: when each batch arrived, how long the step waited for it, its images."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.arrivals: list[float] = []
        self.waits: list[float] = []
        self.images: list[int] = []

    @property
    def manifest(self):
        return self.loader.manifest

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.arrivals, self.waits, self.images = [], [], []
        batches = iter(self.loader)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            arrived = time.perf_counter()
            self.arrivals.append(arrived)
            self.waits.append(arrived - asked)
            self.images.append(int((batch.labels != IGNORE_LABEL).sum()))
            yield batch

    def steady(self, ended: float, skip: int) -> tuple[float, float]:
        """images/s and data-wait share from the arrival of batch `skip` to `ended` (the device done)."""
        elapsed = ended - self.arrivals[skip]
        return sum(self.images[skip:]) / elapsed, sum(self.waits[skip + 1 :]) / elapsed


def _measure(
    name: str,
    feed: str,
    compiled: bool,
    device: torch.device,
    sizes: Sizes,
    loader,
    num_classes: int,
    config: Config | None = None,
    epochs: int = 2,
    skip_batches: int = 0,
) -> Figure:
    """`epochs` 2: the figure is the second (the first pays for autotuning and compilation); 1: the window
    after `skip_batches` of a timed loader's one epoch."""
    config = config or _config(name, sizes, Path("."))
    rank = _rank(device)
    model = build_model(config.model, num_classes).to(device)
    if rank.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainee = Trainee.build(model, config.optim, len(loader), rank)
    trainee.model = torch.compile(model) if compiled else model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    metrics = {}
    for _ in range(epochs):
        metrics = train_one_epoch(trainee, loader, config, rank)
        record_epoch(trainee.state, metrics)
    ended = time.perf_counter()  # train_one_epoch's last act reads its device sums: the device is done
    rate, wait = metrics["train/images_per_second"], metrics["train/data_wait_share"]
    if isinstance(loader, _TimedLoader):
        rate, wait = loader.steady(ended, skip_batches)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    figure = Figure(name, feed, compiled, rate, wait, peak)
    print(
        f"  {name:9s} {feed:34s} {'compiled' if compiled else 'eager':8s} {figure.images_per_second:9.1f} images/s",
        flush=True,
    )
    return figure


def decode_breakdown(work_dir: Path, device_name: str, smoke: bool, rounds: int = 5) -> dict[str, float]:
    """Where GPU decoding's time goes, for one training batch: torchvision's batched nvJPEG call, the same
    images one call each, the crops and resizes after it (the whole device route minus the decode), and the
    CPU route's decode in one process for comparison. Milliseconds per batch, median of `rounds`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.data.transforms import decode_on_device

    device = torch.device(device_name)
    sizes = Sizes.for_run(smoke)
    data = _config("resnet50", sizes, _shards(work_dir, sizes)).data.model_copy(update={"decode": "gpu"})
    stream = build_loader(data, "train", rank=0, world_size=1, batch_size=sizes.batch, seed=0).dataset
    slots = [slot for slot in next(iter(stream)).encoded if slot is not None and not slot.ready]
    jpegs = [slot.data for slot in slots]
    routes = {
        "nvjpeg batched": lambda: decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device),
        "nvjpeg one by one": lambda: [decode_jpeg(j, mode=ImageReadMode.RGB, device=device) for j in jpegs],
        "device route (decode, crop, resize)": lambda: decode_on_device(slots, True, sizes.image_size, device),
        "cpu route, one process": lambda: decode_on_device(slots, True, sizes.image_size, torch.device("cpu")),
    }
    timings = {}
    for label, route in routes.items():
        route()  # warm: the decoder's buffers, the kernels
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            route()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - started)
        timings[label] = 1000 * sorted(samples)[len(samples) // 2]
    timings["crops and resizes (route minus batched decode)"] = (
        timings["device route (decode, crop, resize)"] - timings["nvjpeg batched"]
    )
    print(f"decode breakdown, one batch of {len(jpegs)} {sizes.width}x{sizes.height} JPEGs on {_device_label(device)}:")
    for label, ms in timings.items():
        print(f"  {label:48s} {ms:8.1f} ms  {len(jpegs) / ms * 1000:9.0f} images/s")
    return timings


def _shards(work_dir: Path, sizes: Sizes) -> Path:
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder

    root = work_dir / f"shards-{sizes.images}-{sizes.width}x{sizes.height}"
    if (root / "train" / "manifest.json").is_file():
        return root
    source = work_dir / f"source-{sizes.images}-{sizes.width}x{sizes.height}"
    classes = 8 if sizes.images >= 64 else 4
    cores = os.cpu_count() or 1
    generate_imagenet_folder(
        source,
        num_classes=classes,
        train_per_class=sizes.images // classes,
        val_per_class=1,
        width=sizes.width,
        height=sizes.height,
        seed=0,
        processes=cores,
    )
    # 64 samples a shard: enough shards that every loader process gets a near-equal share of the epoch.
    shard_imagenet(source, root, val_per_class=1, samples_per_shard=64, seed=0, progress=False, processes=cores)
    shutil.rmtree(source)
    return root


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def format_table(figures: list[Figure], device: torch.device) -> str:
    rows = [("model", "feed", "mode", "images/s", "of ceiling", "data wait", "peak GiB")]
    for f in figures:
        rows.append(
            (
                f.model,
                f.feed,
                "compiled" if f.compiled else "eager",
                f"{f.images_per_second:.1f}",
                "-" if f.share_of_ceiling is None else f"{f.share_of_ceiling:.0%}",
                f"{f.data_wait_share:.0%}",
                f"{f.peak_memory_gib:.1f}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [f"bench-gpu on {_device_label(device)}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    resnet50 = [f for f in figures if f.model == "resnet50" and f.feed == "synthetic"]
    if resnet50 and device.type == "cuda":
        best = max(f.images_per_second for f in resnet50)
        lines.append(
            f"target: ResNet-50 synthetic >= {TARGET_RESNET50:.0f} images/s: {best:.0f} "
            f"({'met' if best >= TARGET_RESNET50 else 'not met'})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench_gpu"), help="generated shards go here")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the test suite's end-to-end run")
    parser.add_argument("--models", default=",".join(CEILING_MODELS), help="comma-separated architectures")
    parser.add_argument("--loader-processes", default=None, help="comma-separated counts (default: 4, 8, cores-2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled ResNet-50 run")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument(
        "--decode-breakdown",
        action="store_true",
        help="only time GPU decoding's parts for one batch (see decode_breakdown)",
    )
    args = parser.parse_args(argv)
    if args.decode_breakdown:
        decode_breakdown(args.work_dir, args.device, args.smoke)
        return
    processes = tuple(int(n) for n in args.loader_processes.split(",")) if args.loader_processes else None
    run_gpu_benchmark(
        args.work_dir, args.device, args.smoke, tuple(args.models.split(",")), processes, not args.no_compile, args.out
    )


if __name__ == "__main__":
    main()
