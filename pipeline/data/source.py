"""Discovering an ILSVRC2012 source tree: classes, training images per class and the labelled official validation set.

The training images are always `train/<wnid>/*.JPEG`. The official validation images come in one of the three
layouts people actually have on disk, detected automatically:

- "folders": `val/<wnid>/*.JPEG`, as left by the widely used `valprep.sh`;
- "devkit":  a flat `val/ILSVRC2012_val_00000001.JPEG ...` labelled by `ILSVRC2012_devkit_t12/data/` (the
  ground-truth file holds ILSVRC2012_IDs, which meta.mat maps to wnids; the IDs are *not* class indices);
- "loc_csv": a flat `val/` labelled by Kaggle's `LOC_val_solution.csv`.

Kaggle's download (`ILSVRC/Data/CLS-LOC/{train,val}` below the folder holding the LOC_*.csv files) is accepted
as is. Without a `val/` folder there is simply no official validation set.
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.manifest import ClassInfo
from pipeline.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
SYNSET_MAPPING_FILE = "LOC_synset_mapping.txt"
LOC_SOLUTION_FILE = "LOC_val_solution.csv"
KAGGLE_IMAGE_ROOT = Path("ILSVRC") / "Data" / "CLS-LOC"
_VAL_FILE_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})$")


@dataclass(frozen=True)
class LabeledFile:
    path: Path
    wnid: str


@dataclass(frozen=True)
class StrayFile:
    """A file in an image folder that is not an image and is left out; reported so nothing vanishes silently."""

    path: Path
    reason: str
    folder: str  # "train" or "val": the source folder it was found in


@dataclass
class ImageNetSource:
    root: Path
    classes: list[ClassInfo]  # sorted wnids -> index 0..K-1, the order torchvision and every checkpoint use
    train_files: dict[str, list[Path]]  # wnid -> sorted image files
    official_val_files: list[LabeledFile]  # sorted by path; empty when the source has no val/
    val_layout: str | None  # "folders", "devkit", "loc_csv", or None without val/
    name_source: str  # where the human-readable class names came from
    stray_files: list[StrayFile] = field(default_factory=list)

    @property
    def class_index(self) -> dict[str, int]:
        return {info.wnid: info.index for info in self.classes}

    @property
    def num_train_files(self) -> int:
        return sum(len(files) for files in self.train_files.values())

    def describe(self) -> dict[str, object]:
        return {
            "path": str(self.root),
            "layout": self.val_layout,
            "class_names_from": self.name_source,
            "num_classes": len(self.classes),
            "train_images": self.num_train_files,
            "official_val_images": len(self.official_val_files),
        }


def discover_source(root: Path) -> ImageNetSource:
    """Scan `root` (holding train/ and usually val/) and return what is there, with labels and class names."""
    root = Path(root)
    image_root = root
    if not (root / "train").is_dir() and (root / KAGGLE_IMAGE_ROOT / "train").is_dir():
        image_root = root / KAGGLE_IMAGE_ROOT
    if not (image_root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder; expected an ImageNet tree with train/<wnid>/*.JPEG")
    # Kaggle keeps the LOC_* files two levels above the images; a hand-made tree keeps them beside train/.
    metadata_dirs = [root] if image_root == root else [root, image_root]

    stray_files: list[StrayFile] = []
    train_files = _scan_class_folders(image_root / "train", stray_files, "train", require_images=True)
    wnids = sorted(train_files)
    val_files, val_layout = _scan_val(image_root / "val", set(wnids), metadata_dirs, stray_files)
    names, name_source = _class_names(wnids, metadata_dirs)
    classes = [ClassInfo(index=index, wnid=wnid, name=names[wnid]) for index, wnid in enumerate(wnids)]
    if stray_files:
        logger.warning(
            "skipping %d files that are not images, e.g. %s (%s)",
            len(stray_files),
            stray_files[0].path,
            stray_files[0].reason,
        )
    return ImageNetSource(
        root=root,
        classes=classes,
        train_files=train_files,
        official_val_files=val_files,
        val_layout=val_layout,
        name_source=name_source,
        stray_files=stray_files,
    )


def hold_out_validation(
    source: ImageNetSource, val_per_class: int, seed: int
) -> tuple[list[LabeledFile], list[LabeledFile]]:
    """Split the training images into (train, held-out val), `val_per_class` per class, the same for a seed.

    The choice for a class depends only on the seed, the wnid and that class's sorted file list, so adding or
    removing another class does not move images between train and val.
    """
    if val_per_class < 0:
        raise DataError(f"val_per_class = {val_per_class} must be 0 or more")
    train, held_out = [], []
    for info in source.classes:
        files = source.train_files[info.wnid]
        if val_per_class and len(files) <= val_per_class:
            raise DataError(
                f"class {info.wnid} has {len(files)} training images; holding out val_per_class = {val_per_class} "
                "would leave none for training, lower val_per_class"
            )
        rng = np.random.default_rng([seed, zlib.crc32(info.wnid.encode())])
        chosen = set(rng.choice(len(files), size=val_per_class, replace=False).tolist())
        for position, path in enumerate(files):
            (held_out if position in chosen else train).append(LabeledFile(path, info.wnid))
    return train, held_out


def read_devkit_meta(devkit: Path) -> tuple[dict[int, str], dict[str, str]]:
    """Read `data/meta.mat` as torchvision does: ({ILSVRC2012_ID: wnid}, {wnid: words}) for the leaf synsets."""
    from scipy.io import loadmat  # only devkit users need scipy's MATLAB reader

    synsets = loadmat(devkit / "data" / "meta.mat", squeeze_me=True)["synsets"]
    # Non-leaf synsets (num_children > 0) are WordNet ancestors, not classes.
    leaves = [synset for synset in synsets if synset["num_children"] == 0]
    id_to_wnid = {int(synset["ILSVRC2012_ID"]): str(synset["WNID"]) for synset in leaves}
    wnid_to_words = {str(synset["WNID"]): str(synset["words"]) for synset in leaves}
    return id_to_wnid, wnid_to_words


def _scan_class_folders(
    folder: Path, stray_files: list[StrayFile], folder_kind: str, require_images: bool
) -> dict[str, list[Path]]:
    """{folder name: sorted image files} for every sub-folder; anything else is recorded as a stray file."""
    files: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            stray_files.append(StrayFile(entry, "hidden file or folder", folder_kind))
        elif entry.is_dir():
            images = []
            for path in sorted(entry.iterdir()):
                if path.is_dir():
                    stray_files.append(StrayFile(path, "a folder inside a class folder", folder_kind))
                elif path.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(path)
                else:
                    stray_files.append(StrayFile(path, _not_an_image(path), folder_kind))
            if require_images and not images:
                raise DataError(f"class folder {entry} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files[entry.name] = images
        else:
            stray_files.append(StrayFile(entry, f"not inside a class folder of {folder}", folder_kind))
    if require_images and not files:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<wnid>/*.JPEG")
    return files


def _scan_val(
    folder: Path, wnids: set[str], metadata_dirs: list[Path], stray_files: list[StrayFile]
) -> tuple[list[LabeledFile], str | None]:
    if not folder.is_dir():
        return [], None
    if any(entry.is_dir() for entry in folder.iterdir()):
        per_class = _scan_class_folders(folder, stray_files, "val", require_images=False)
        labeled = [LabeledFile(path, wnid) for wnid, paths in per_class.items() for path in paths]
        layout = "folders"
    else:
        images = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                stray_files.append(StrayFile(path, _not_an_image(path), "val"))
        if not images:
            logger.warning("%s holds no images: there will be no official validation (test) split", folder)
            return [], None
        solution = _find(metadata_dirs, LOC_SOLUTION_FILE)
        devkit = _find(metadata_dirs, DEVKIT_DIR)
        if solution is not None:
            labeled, layout = _label_from_loc_solution(images, solution), "loc_csv"
        elif devkit is not None:
            labeled, layout = _label_from_devkit(images, devkit), "devkit"
        else:
            raise DataError(
                f"{folder} holds {len(images)} images in one folder but no labels were found: expected "
                f"{LOC_SOLUTION_FILE} or {DEVKIT_DIR}/ in {metadata_dirs[0]}, or val/<wnid>/ class folders"
            )
    for item in labeled:
        if item.wnid not in wnids:
            raise DataError(f"validation image {item.path} has class {item.wnid}, which is not among the train classes")
    return sorted(labeled, key=lambda item: item.path), layout


def _label_from_loc_solution(images: list[Path], solution: Path) -> list[LabeledFile]:
    with open(solution, newline="") as handle:
        # PredictionString is "<wnid> x1 y1 x2 y2 <wnid> ...": every box of an image has the image's class.
        labels = {
            row["ImageId"]: row["PredictionString"].split()[0]
            for row in csv.DictReader(handle)
            if row.get("PredictionString", "").strip()
        }
    labeled = []
    for path in images:
        if path.stem not in labels:
            raise DataError(f"validation image {path} has no row in {solution}")
        labeled.append(LabeledFile(path, labels[path.stem]))
    return labeled


def _label_from_devkit(images: list[Path], devkit: Path) -> list[LabeledFile]:
    id_to_wnid, _ = read_devkit_meta(devkit)
    ground_truth_file = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    # Line n holds the ILSVRC2012_ID of ILSVRC2012_val_<n>: match by the number in the name, not by position,
    # so a val folder with some files missing is still labelled correctly.
    ground_truth = [int(line) for line in ground_truth_file.read_text().split()]
    labeled = []
    for path in images:
        match = _VAL_FILE_NUMBER.match(path.stem)
        if match is None:
            raise DataError(
                f"validation image {path} is not named ILSVRC2012_val_<8 digits>, so the devkit cannot label it"
            )
        number = int(match.group(1))
        if not 1 <= number <= len(ground_truth):
            raise DataError(f"validation image {path} has no line in {ground_truth_file} ({len(ground_truth)} lines)")
        labeled.append(LabeledFile(path, id_to_wnid[ground_truth[number - 1]]))
    return labeled


def _class_names(wnids: list[str], metadata_dirs: list[Path]) -> tuple[dict[str, str], str]:
    """Human-readable names, from the best source present; a class without a name is called by its wnid."""
    mapping_file = _find(metadata_dirs, SYNSET_MAPPING_FILE)
    devkit = _find(metadata_dirs, DEVKIT_DIR)
    if mapping_file is not None:
        lines = [line.split(maxsplit=1) for line in mapping_file.read_text().splitlines() if line.strip()]
        known, name_source = {parts[0]: parts[1] if len(parts) > 1 else parts[0] for parts in lines}, mapping_file.name
    elif devkit is not None and (devkit / "data" / "meta.mat").is_file():
        known, name_source = read_devkit_meta(devkit)[1], "meta.mat"
    elif len(wnids) == 1000:
        # torchvision's 1000 category names are listed in sorted-wnid order, the order of class indices here.
        from torchvision.models import AlexNet_Weights

        known = dict(zip(wnids, AlexNet_Weights.IMAGENET1K_V1.meta["categories"]))
        name_source = "torchvision"
    else:
        return {wnid: wnid for wnid in wnids}, "wnid"
    missing = [wnid for wnid in wnids if wnid not in known]
    if missing:
        logger.warning(
            "%s has no name for %d classes (e.g. %s); they are named by wnid", name_source, len(missing), missing[0]
        )
    return {wnid: known.get(wnid, wnid) for wnid in wnids}, name_source


def _not_an_image(path: Path) -> str:
    return f"not an image file (extension {path.suffix or 'none'!r})"


def _find(directories: list[Path], name: str) -> Path | None:
    for directory in directories:
        if (directory / name).exists():
            return directory / name
    return None
