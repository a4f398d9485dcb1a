"""The synthetic ImageNet generator: the three ILSVRC2012 layouts, determinism, real JPEGs, learnable classes."""

import csv
import io
import re

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from pipeline.data.synthetic import generate_imagenet_folder, make_jpeg_bytes
from tests.helpers_data import SMALL, small_imagenet


def _folder_labels(root):
    """{val file stem: wnid} from the val/<wnid>/ layout."""
    return {path.stem: path.parent.name for path in (root / "val").glob("*/*.JPEG")}


def test_folders_layout_has_train_and_val_class_folders_of_decodable_jpegs(tmp_path):
    root = small_imagenet(tmp_path / "src", num_classes=3, train_per_class=4, val_per_class=2)
    wnids = sorted(path.name for path in (root / "train").iterdir())
    assert len(wnids) == 3 and all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)
    for wnid in wnids:
        names = sorted(path.name for path in (root / "train" / wnid).iterdir())
        assert names == sorted(f"{wnid}_{index}.JPEG" for index in range(4))
    val_files = sorted((root / "val").glob("*/*.JPEG"))
    assert [path.name for path in sorted(val_files, key=lambda p: p.name)] == [
        f"ILSVRC2012_val_{number:08d}.JPEG" for number in range(1, 7)
    ]
    mapping = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping == [f"{wnid} synthetic class {index}" for index, wnid in enumerate(wnids)]
    with Image.open(val_files[0]) as image:
        image.load()
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 48))


def test_devkit_layout_reads_as_torchvision_reads_it_and_agrees_with_folders(tmp_path):
    folders = small_imagenet(tmp_path / "folders", num_classes=4, val_per_class=3, seed=5)
    devkit = small_imagenet(tmp_path / "devkit", num_classes=4, val_per_class=3, seed=5, val_layout="devkit")
    assert not (devkit / "LOC_synset_mapping.txt").exists()
    # The exact steps of torchvision.datasets.imagenet.parse_devkit_archive.parse_meta_mat:
    meta = loadmat(devkit / "ILSVRC2012_devkit_t12" / "data" / "meta.mat", squeeze_me=True)["synsets"]
    nums_children = list(zip(*meta))[4]
    leaves = [meta[index] for index, children in enumerate(nums_children) if children == 0]
    ids, wnids, words = list(zip(*leaves))[:3]
    assert len(meta) > len(leaves) == 4  # non-leaf synsets exist and are filtered out, as in the real file
    assert sorted(wnids) == sorted(path.name for path in (devkit / "train").iterdir())
    assert list(ids) != [1, 2, 3, 4]  # IDs are not class indices, as in the real devkit
    id_to_wnid = dict(zip(ids, wnids))
    ground_truth = devkit / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    lines = [int(line) for line in ground_truth.read_text().split()]
    flat = sorted(path.stem for path in (devkit / "val").iterdir())
    assert len(lines) == len(flat) == 12
    assert {stem: id_to_wnid[line] for stem, line in zip(flat, lines)} == _folder_labels(folders)
    assert set(words) == {f"synthetic class {index}" for index in range(4)}


def test_loc_csv_layout_labels_agree_with_folders(tmp_path):
    folders = small_imagenet(tmp_path / "folders", num_classes=3, val_per_class=3, seed=2)
    kaggle = small_imagenet(tmp_path / "kaggle", num_classes=3, val_per_class=3, seed=2, val_layout="loc_csv")
    with open(kaggle / "LOC_val_solution.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"ImageId", "PredictionString"}
    labels = {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    assert labels == _folder_labels(folders)
    for row in rows:
        x1, y1, x2, y2 = map(int, row["PredictionString"].split()[1:5])
        assert 0 <= x1 < x2 < 64 and 0 <= y1 < y2 < 48
    assert (kaggle / "LOC_synset_mapping.txt").is_file()
    # The images themselves do not depend on the layout.
    assert (kaggle / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes() == next(
        (folders / "val").glob("*/ILSVRC2012_val_00000001.JPEG")
    ).read_bytes()


def test_same_seed_same_bytes_and_process_count_does_not_matter(tmp_path):
    first = small_imagenet(tmp_path / "a", num_classes=2, train_per_class=3, seed=7)
    second = generate_imagenet_folder(
        tmp_path / "b", num_classes=2, train_per_class=3, val_per_class=2, seed=7, processes=2, **SMALL
    )
    other = small_imagenet(tmp_path / "c", num_classes=2, train_per_class=3, seed=8)

    def contents(root):
        return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}

    assert contents(first) == contents(second)
    assert contents(first) != contents(other)


def test_classes_are_separable_by_mean_colour(tmp_path):
    root = small_imagenet(tmp_path / "src", num_classes=6, train_per_class=10, val_per_class=5, seed=1)

    def mean_colour(path):
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)

    wnids = sorted(path.name for path in (root / "train").iterdir())
    centroids = np.stack([np.mean([mean_colour(p) for p in (root / "train" / w).iterdir()], axis=0) for w in wnids])
    val = sorted((root / "val").glob("*/*.JPEG"))
    predicted = [wnids[int(np.argmin(np.linalg.norm(centroids - mean_colour(p), axis=1)))] for p in val]
    accuracy = np.mean([guess == path.parent.name for guess, path in zip(predicted, val)])
    assert accuracy >= 0.9  # a nearest-mean-colour rule already separates the classes; chance is 1/6


def test_full_size_images_weigh_like_imagenet_photos(tmp_path):
    root = generate_imagenet_folder(tmp_path / "src", num_classes=2, train_per_class=2, val_per_class=0)
    sizes = [path.stat().st_size for path in (root / "train").rglob("*.JPEG")]
    assert all(60_000 <= size <= 150_000 for size in sizes), sizes
    assert not (root / "val").exists() or not any((root / "val").rglob("*.JPEG"))


@pytest.mark.parametrize(
    ("mode", "format", "expected_mode"),
    [
        ("RGB", "JPEG", "RGB"),
        ("L", "JPEG", "L"),
        ("CMYK", "JPEG", "CMYK"),
        ("RGB", "PNG", "RGB"),
    ],
)
def test_make_jpeg_bytes_encodes_the_requested_mode_and_format(mode, format, expected_mode):
    data = make_jpeg_bytes(40, 30, seed=0, mode=mode, format=format)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert (image.format, image.mode, image.size) == (format, expected_mode, (40, 30))
    assert make_jpeg_bytes(40, 30, seed=0, mode=mode, format=format) == data


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"val_layout": "flat"}, "val_layout"),
        ({"width": 4}, "too small"),
        ({"quality": 101}, "quality"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        generate_imagenet_folder(tmp_path / "src", **{**SMALL, **options})
    assert not (tmp_path / "src").exists()
