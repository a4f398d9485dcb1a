"""A generator of small ImageNet look-alikes: real JPEGs in the ILSVRC2012 folder layouts, with classes a CNN can learn.

Used by the demo, the benchmarks and the tests, so the whole pipeline (discovery, sharding, loading, training)
runs on the same kinds of files as the real dataset without downloading 150 GB:

    python -c "from pathlib import Path; from pipeline.data.synthetic import generate_imagenet_folder; \
        generate_imagenet_folder(Path('data/synthetic'), num_classes=10)"

Each class has a dominant hue and a grating of class-specific orientation and period; each image varies the
hue slightly, the grating phase, the lighting and a randomly placed ellipse, and carries photo-like noise so
that a 500x375 JPEG at quality 90 weighs about as much as a real ImageNet photo (~100 KB).
"""

from __future__ import annotations

import colorsys
import csv
import io
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.data.source import DEVKIT_DIR, LOC_SOLUTION_FILE, SYNSET_MAPPING_FILE
from pipeline.errors import DataError

VAL_LAYOUTS = ("folders", "devkit", "loc_csv")
# The field order of the real devkit's meta.mat; torchvision reads num_children by position (index 4).
META_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)
# Seeds of per-image generators are (seed, split, class, image), so the pixels of an image do not depend on
# how many processes drew it or in which order.
_TRAIN, _VAL = 0, 1
NOISE_SCALE = 0.25  # uniform pixel noise of +-32 grey levels: ~100 KB per 500x375 JPEG at quality 90


@dataclass(frozen=True)
class _ImageJob:
    path: Path
    split_code: int
    class_index: int
    image_index: int
    num_classes: int
    width: int
    height: int
    quality: int
    seed: int


def generate_imagenet_folder(
    output: Path,
    num_classes: int = 10,
    train_per_class: int = 20,
    val_per_class: int = 5,
    width: int = 500,
    height: int = 375,
    quality: int = 90,
    seed: int = 0,
    val_layout: Literal["folders", "devkit", "loc_csv"] = "folders",
    processes: int = 1,
) -> Path:
    """Write `output/train/<wnid>/<wnid>_<i>.JPEG` and an official-val analogue in `val_layout`; return `output`."""
    _check_arguments(num_classes, train_per_class, val_per_class, width, height, quality, val_layout, processes)
    output = Path(output)
    rng = np.random.default_rng(seed)
    # Real-looking wnids; two extra ones name the non-leaf synsets of the devkit's meta.mat.
    wnids = [
        f"n{number:08d}"
        for number in sorted(rng.choice(np.arange(1_000_000, 15_000_000), num_classes + 2, replace=False))
    ]
    leaf_wnids, parent_wnids = wnids[:num_classes], wnids[num_classes:]
    names = [f"synthetic class {index}" for index in range(num_classes)]

    jobs = []
    for class_index, wnid in enumerate(leaf_wnids):
        for image_index in range(train_per_class):
            path = output / "train" / wnid / f"{wnid}_{image_index}.JPEG"
            jobs.append(_ImageJob(path, _TRAIN, class_index, image_index, num_classes, width, height, quality, seed))

    # Like the real validation set, file numbers are shuffled across classes.
    val_images = [(class_index, index) for class_index in range(num_classes) for index in range(val_per_class)]
    val_images = [val_images[position] for position in rng.permutation(len(val_images))]
    val_labels = []  # (file stem, class index), in file-number order
    for number, (class_index, image_index) in enumerate(val_images, start=1):
        stem = f"ILSVRC2012_val_{number:08d}"
        folder = output / "val" / leaf_wnids[class_index] if val_layout == "folders" else output / "val"
        jobs.append(
            _ImageJob(
                folder / f"{stem}.JPEG", _VAL, class_index, image_index, num_classes, width, height, quality, seed
            )
        )
        val_labels.append((stem, class_index))

    for directory in {job.path.parent for job in jobs} | {output / "train"}:
        directory.mkdir(parents=True, exist_ok=True)
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            boxes = pool.map(_write_image, jobs, chunksize=max(1, len(jobs) // (processes * 8)))
    else:
        boxes = [_write_image(job) for job in jobs]
    val_boxes = boxes[len(jobs) - len(val_labels) :]

    if val_layout == "devkit":
        _write_devkit(output / DEVKIT_DIR, leaf_wnids, parent_wnids, names, val_labels, rng, train_per_class)
    else:
        (output / SYNSET_MAPPING_FILE).write_text("".join(f"{w} {n}\n" for w, n in zip(leaf_wnids, names)))
    if val_layout == "loc_csv":
        _write_loc_solution(output / LOC_SOLUTION_FILE, leaf_wnids, val_labels, val_boxes, rng)
    return output


def make_jpeg_bytes(
    width: int, height: int, seed: int, mode: str = "RGB", quality: int = 90, format: str = "JPEG"
) -> bytes:
    """Encode a small smooth random picture: `mode` e.g. "RGB", "L", "CMYK"; `format` e.g. "JPEG", "PNG"."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    options = {"quality": quality} if format.upper() in ("JPEG", "WEBP") else {}
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def render_class_image(
    class_index: int, num_classes: int, rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Draw one image of a class: (height x width x 3 uint8 pixels, ellipse bounding box x1, y1, x2, y2)."""
    # Class identity: hue spaced evenly around the wheel; grating orientation and period spread by the golden
    # ratio so that classes with close hues (many classes) still differ in texture.
    hue = class_index / num_classes + rng.normal(0.0, 0.15 / max(num_classes, 4))
    orientation = math.pi * ((class_index * 0.618034) % 1.0) + rng.normal(0.0, 0.05)
    period = min(width, height) * (0.07 + 0.07 * ((class_index * 0.381966) % 1.0)) * rng.uniform(0.9, 1.1)
    colour = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 0.8), rng.uniform(0.55, 0.85)), np.float32)

    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    # sin(a*x + b*y + phase) as a sum of outer products: no full-size trigonometry, which dominated the time.
    frequency = 2 * math.pi / period
    along_x, along_y = frequency * math.cos(orientation) * x, frequency * math.sin(orientation) * y
    phase = rng.uniform(0, 2 * math.pi)
    grating = np.sin(along_x) * np.cos(along_y + phase) + np.cos(along_x) * np.sin(along_y + phase)
    lighting = _smooth_noise(rng, width, height, grid=(3, 4), channels=1) * 0.25 + 1.0  # 0.75-1.25
    pixels = colour * 255.0 * lighting + (28.0 * grating)[..., None]

    # An object of the complementary hue at a random place and size: the position varies, the class does not.
    centre_x, centre_y = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    radius_x, radius_y = rng.uniform(0.1, 0.3, size=2) * min(width, height)
    angle = rng.uniform(0, math.pi)
    half_x = abs(radius_x * math.cos(angle)) + abs(radius_y * math.sin(angle))
    half_y = abs(radius_x * math.sin(angle)) + abs(radius_y * math.cos(angle))
    box = (
        max(0, int(centre_x - half_x)),
        max(0, int(centre_y - half_y)),
        min(width - 1, int(centre_x + half_x)),
        min(height - 1, int(centre_y + half_y)),
    )
    window = (slice(box[1], box[3] + 1), slice(box[0], box[2] + 1))
    dx, dy = x[:, window[1]] - centre_x, y[window[0], :] - centre_y
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = dy * math.cos(angle) - dx * math.sin(angle)
    inside = np.clip(4.0 * (1.0 - (along / radius_x) ** 2 - (across / radius_y) ** 2), 0.0, 1.0)[..., None]
    object_colour = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.6, 0.8), np.float32) * 255.0
    object_pixels = object_colour + 20.0 * grating[window][..., None]
    pixels[window] = pixels[window] * (1.0 - inside) + object_pixels * inside

    # Photo-like texture at two scales; together with NOISE_SCALE it sets the JPEG size.
    pixels += 14.0 * _smooth_noise(rng, width, height, grid=(height // 3, width // 3), channels=3)
    # Uniform rather than Gaussian pixel noise: five times cheaper to draw, and the JPEG cannot tell.
    pixels += (rng.integers(0, 256, size=pixels.shape, dtype=np.uint8).astype(np.float32) - 127.5) * NOISE_SCALE
    return np.clip(pixels, 0, 255).astype(np.uint8), box


def _smooth_noise(
    rng: np.random.Generator, width: int, height: int, grid: tuple[int, int], channels: int
) -> np.ndarray:
    """Random values on a coarse grid, bicubically upsampled: roughly in [-1, 1], shape (height, width, channels)."""
    rows, columns = max(2, grid[0]), max(2, grid[1])
    coarse = rng.integers(0, 256, size=(rows, columns, channels), dtype=np.uint8)
    planes = [
        np.asarray(Image.fromarray(coarse[..., c], "L").resize((width, height), Image.BICUBIC)) for c in range(channels)
    ]
    return np.stack(planes, axis=-1).astype(np.float32) / 127.5 - 1.0


def _write_image(job: _ImageJob) -> tuple[int, int, int, int]:
    rng = np.random.default_rng([job.seed, job.split_code, job.class_index, job.image_index])
    pixels, box = render_class_image(job.class_index, job.num_classes, rng, job.width, job.height)
    Image.fromarray(pixels, "RGB").save(job.path, format="JPEG", quality=job.quality)
    return box


def _write_devkit(
    devkit: Path,
    leaf_wnids: list[str],
    parent_wnids: list[str],
    names: list[str],
    val_labels: list[tuple[str, int]],
    rng: np.random.Generator,
    train_per_class: int,
) -> None:
    """meta.mat and the ground-truth file as in ILSVRC2012_devkit_t12, read by `torchvision.datasets.ImageNet`."""
    from scipy.io import savemat  # only this layout needs scipy

    (devkit / "data").mkdir(parents=True, exist_ok=True)
    # As in the real devkit, ILSVRC2012_IDs are not in sorted-wnid order (ID 1 is n02119789, "kit fox"), so a
    # reader that confuses an ID with a class index gets wrong labels.
    leaf_ids = [int(identifier) + 1 for identifier in rng.permutation(len(leaf_wnids))]
    halves = np.array_split(np.array(leaf_ids, dtype=np.uint16), len(parent_wnids))
    synsets = np.zeros((len(leaf_wnids) + len(parent_wnids), 1), dtype=[(name, object) for name in META_FIELDS])
    for position, (wnid, name) in enumerate(zip(leaf_wnids, names)):
        synsets[position, 0] = (
            leaf_ids[position],
            wnid,
            name,
            f"a {name} image",
            0,
            np.zeros(0, np.uint16),
            0,
            train_per_class,
        )
    for offset, (wnid, children) in enumerate(zip(parent_wnids, halves)):
        synsets[len(leaf_wnids) + offset, 0] = (
            len(leaf_wnids) + offset + 1,
            wnid,
            f"synthetic group {offset}",
            "a group of synthetic classes",
            len(children),
            children,
            1,
            0,
        )
    savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    ground_truth = "".join(f"{leaf_ids[class_index]}\n" for _, class_index in val_labels)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(ground_truth)


def _write_loc_solution(
    path: Path,
    leaf_wnids: list[str],
    val_labels: list[tuple[str, int]],
    boxes: list[tuple[int, int, int, int]],
    rng: np.random.Generator,
) -> None:
    """Kaggle's localisation solution: one row per image, in no particular order (as in the real file)."""
    rows = [
        (stem, " ".join([leaf_wnids[class_index], *map(str, box)]) + " ")
        for (stem, class_index), box in zip(val_labels, boxes)
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows[position] for position in rng.permutation(len(rows)))


def _check_arguments(
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    width: int,
    height: int,
    quality: int,
    val_layout: str,
    processes: int,
) -> None:
    if num_classes < 1:
        raise DataError(f"num_classes = {num_classes} must be at least 1")
    if train_per_class < 1:
        raise DataError(f"train_per_class = {train_per_class} must be at least 1")
    if val_per_class < 0:
        raise DataError(f"val_per_class = {val_per_class} must be 0 or more")
    if width < 8 or height < 8:
        raise DataError(f"image size {width}x{height} is too small; width and height must be at least 8 pixels")
    if not 1 <= quality <= 100:
        raise DataError(f"quality = {quality} must be between 1 and 100")
    if val_layout not in VAL_LAYOUTS:
        raise DataError(f"val_layout = {val_layout!r} is not one of {', '.join(VAL_LAYOUTS)}")
    if processes < 1:
        raise DataError(f"processes = {processes} must be at least 1")
