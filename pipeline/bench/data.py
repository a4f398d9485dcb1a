"""Benchmark: decoded + augmented training images per second per core, our path against torchvision's.

    imagenet-pipeline bench-data --images 400 --repeats 2

Both paths run side by side in one process on the same ImageNet-sized JPEGs (500x375, quality 90, made by
`pipeline.data.synthetic`), one core each:
- reference: `torchvision.datasets.ImageFolder` with the PIL loader and
  Compose([RandomResizedCrop(S), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)]), iterated by a
  DataLoader with num_workers=0, as in torchvision's classification reference;
- ours: the same JPEGs read back from webdataset tar shards and decoded by `pipeline.data.transforms.TrainTransform`
  into uint8 (normalisation happens later, on the accelerator).
Throughput is images per CPU-second of this process (torch limited to one thread), so other work on the
machine does not distort it; wall-clock figures are returned as well. Passes alternate between the two paths
and the best pass of each counts, so drifting load hits both alike. This is a benchmark, not a test: nothing
here asserts a speed.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as tv_transforms

from pipeline.data.sharding import prepare_image
from pipeline.data.synthetic import generate_imagenet_folder
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform
from pipeline.errors import BenchmarkError

# ImageNet-like files: the most common ILSVRC2012 train size, at the quality of typical web photos.
IMAGE_WIDTH, IMAGE_HEIGHT, JPEG_QUALITY = 500, 375, 90
# Training at reduced resolution (progressive resizing, FFCV-style schedules) is common: report those too.
REDUCED_IMAGE_SIZES = (160, 128)
BENCHMARK_CLASSES = 4
IMAGES_PER_SHARD = 100
TARGET_SPEEDUP = 3.0
# `shard --max-side 342` stores 500x375 images as 342x256 (shorter side 256, torchvision's eval resize).
PRE_RESIZED_MAX_SIDE = 342


@dataclass(frozen=True)
class Throughput:
    images: int
    cpu_seconds: float  # CPU time of this process: one core's worth of work
    wall_seconds: float

    @property
    def images_per_second_per_core(self) -> float:
        return self.images / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else float("inf")


def run_data_benchmark(
    work_dir: Path,
    num_images: int = 400,
    image_size: int = 224,
    repeats: int = 2,
    reduced_image_sizes: Sequence[int] = REDUCED_IMAGE_SIZES,
) -> dict:
    """Make the JPEGs and shards under `work_dir`, time both paths at each size, print a table, return figures."""
    for name, value in (("num_images", num_images), ("image_size", image_size), ("repeats", repeats)):
        if value < 1:
            raise BenchmarkError(f"{name} = {value} must be at least 1")
    image_sizes = list(dict.fromkeys([image_size, *reduced_image_sizes]))
    image_folder = make_benchmark_images(Path(work_dir) / "jpeg_folder", num_images)
    shards = write_benchmark_shards(image_folder, Path(work_dir) / "shards", num_images)
    resized_shards = write_benchmark_shards(
        image_folder, Path(work_dir) / "shards_resized", num_images, max_side=PRE_RESIZED_MAX_SIDE
    )
    # Reading every shard once also puts them in the page cache, as the JPEG folder already is.
    images_in_memory = list(read_shard_images(shards))
    mean_jpeg_kilobytes = sum(len(image) for image in images_in_memory) / num_images / 1000
    # First calls load codecs and plugins; keep that out of the timed passes.
    measure_reference(image_folder, image_size, min(num_images, 8))
    measure_train_transform(itertools.islice(read_shard_images(shards), 8), image_size)

    by_image_size = {}
    for size in image_sizes:
        reference_best = ours_best = transform_best = resized_best = None
        for repeat in range(repeats):
            reference_best = _faster(reference_best, measure_reference(image_folder, size, num_images, repeat))
            ours_best = _faster(ours_best, measure_train_transform(read_shard_images(shards), size, repeat))
            # The transform alone, bytes already in memory: what is left once shard reading is free.
            transform_best = _faster(transform_best, measure_train_transform(images_in_memory, size, repeat))
            resized_best = _faster(
                resized_best, measure_train_transform(read_shard_images(resized_shards), size, repeat)
            )
        by_image_size[size] = {
            "reference": asdict(reference_best),
            "ours": asdict(ours_best),
            "ours_transform_only": asdict(transform_best),
            "reference_images_per_second_per_core": reference_best.images_per_second_per_core,
            "ours_images_per_second_per_core": ours_best.images_per_second_per_core,
            "ours_transform_only_images_per_second_per_core": transform_best.images_per_second_per_core,
            "speedup": ours_best.images_per_second_per_core / reference_best.images_per_second_per_core,
            "ours_pre_resized": asdict(resized_best),
            "ours_pre_resized_images_per_second_per_core": resized_best.images_per_second_per_core,
            "pre_resized_speedup": resized_best.images_per_second_per_core / reference_best.images_per_second_per_core,
        }
    result = {
        "num_images": num_images,
        "repeats": repeats,
        "image_width": IMAGE_WIDTH,
        "image_height": IMAGE_HEIGHT,
        "jpeg_quality": JPEG_QUALITY,
        "mean_jpeg_kilobytes": mean_jpeg_kilobytes,
        "target_speedup": TARGET_SPEEDUP,
        "by_image_size": by_image_size,
    }
    print(format_table(result))
    return result


def measure_train_transform(images: Iterable[bytes], image_size: int, seed: int = 0) -> Throughput:
    """Our path: iterate encoded images (reading them is part of the timed work) through TrainTransform."""
    transform = TrainTransform(image_size)
    rng = random.Random(seed)
    count = 0
    with _single_torch_thread():
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for image_bytes in images:
            transform(image_bytes, rng)
            count += 1
        return Throughput(count, time.process_time() - cpu_start, time.perf_counter() - wall_start)


def measure_reference(image_folder: Path, image_size: int, num_images: int, seed: int = 0) -> Throughput:
    """torchvision's reference path: ImageFolder + PIL loader + float normalise, num_workers=0."""
    transform = tv_transforms.Compose(
        [
            tv_transforms.RandomResizedCrop(image_size),
            tv_transforms.RandomHorizontalFlip(),
            tv_transforms.ToTensor(),
            tv_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = Subset(datasets.ImageFolder(str(image_folder / "train"), transform=transform), range(num_images))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)
    count = 0
    # The reference draws its crops from torch's global generator: seed it, and leave the caller's state alone.
    with _single_torch_thread(), torch.random.fork_rng():
        torch.manual_seed(seed)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _image, _label in loader:
            count += 1
        return Throughput(count, time.process_time() - cpu_start, time.perf_counter() - wall_start)


def make_benchmark_images(output: Path, num_images: int) -> Path:
    """A fresh ImageNet-layout folder with at least `num_images` photo-like training JPEGs; returns its root."""
    if output.exists():
        shutil.rmtree(output)  # stale images of another size or count would skew the figures
    per_class = -(-num_images // BENCHMARK_CLASSES)  # ceiling division
    # ~30 ms per image: worth a process pool for the default 400, not for a test's dozen (spawn costs ~1 s).
    processes = min(4, os.cpu_count() or 1) if num_images >= 100 else 1
    return generate_imagenet_folder(
        output,
        num_classes=BENCHMARK_CLASSES,
        train_per_class=per_class,
        val_per_class=0,
        width=IMAGE_WIDTH,
        height=IMAGE_HEIGHT,
        quality=JPEG_QUALITY,
        processes=processes,
    )


def write_benchmark_shards(
    image_folder: Path, output: Path, num_images: int, max_side: int | None = None
) -> list[Path]:
    """The first `num_images` training JPEGs (ImageFolder order) in webdataset tar shards: the original
    bytes, or with `max_side` the bytes the sharder stores for `shard --max-side`."""
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    samples = datasets.ImageFolder(str(image_folder / "train")).samples[:num_images]
    shards = []
    for start in range(0, len(samples), IMAGES_PER_SHARD):
        shards.append(output / f"train-{start // IMAGES_PER_SHARD:06d}.tar")
        with wds.TarWriter(str(shards[-1])) as writer:
            for index, (path, label) in enumerate(samples[start : start + IMAGES_PER_SHARD], start=start):
                data = (
                    Path(path).read_bytes()
                    if max_side is None
                    else prepare_image(Path(path), max_side, JPEG_QUALITY).data
                )
                writer.write({"__key__": f"{index:08d}", "jpg": data, "cls": str(label).encode()})
    return shards


def read_shard_images(shards: Sequence[Path]) -> Iterator[bytes]:
    """The raw JPEG bytes of every sample, in shard order (no decoding: the transform does that)."""
    dataset = wds.WebDataset([str(path) for path in shards], shardshuffle=False, empty_check=False)
    for sample in dataset:
        yield sample["jpg"]


def format_table(result: dict) -> str:
    lines = [
        f"{result['num_images']} JPEGs {result['image_width']}x{result['image_height']} q{result['jpeg_quality']}"
        f" (~{result['mean_jpeg_kilobytes']:.0f} KB each), best of {result['repeats']} passes, one core",
        f"{'size':>5} {'reference img/s':>16} {'transform only':>15} {'ours img/s':>11} {'speedup':>8}"
        f" {'ours, pre-resized':>18} {'speedup':>8}",
    ]
    for size, figures in result["by_image_size"].items():
        lines.append(
            f"{size:>5} {figures['reference_images_per_second_per_core']:>16.1f}"
            f" {figures['ours_transform_only_images_per_second_per_core']:>15.1f}"
            f" {figures['ours_images_per_second_per_core']:>11.1f} {figures['speedup']:>7.2f}x"
            f" {figures['ours_pre_resized_images_per_second_per_core']:>18.1f}"
            f" {figures['pre_resized_speedup']:>7.2f}x"
        )
    lines.append(
        f"(target speedup: {result['target_speedup']:.0f}x; img/s = images per CPU-second of one process;"
        " 'transform only' = ours without reading the shards;"
        f" 'pre-resized' = shards made with `shard --max-side {PRE_RESIZED_MAX_SIDE}`)"
    )
    return "\n".join(lines)


def _faster(best: Throughput | None, candidate: Throughput) -> Throughput:
    if best is None or candidate.images_per_second_per_core > best.images_per_second_per_core:
        return candidate
    return best


@contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Limit torch's intra-op threads to one while timing, so 'per core' means one core; restore after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
