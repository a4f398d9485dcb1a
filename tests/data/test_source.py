"""Discovering an ILSVRC2012 tree: val layouts, class names, bad trees, and the held-out validation split."""

import logging
import shutil

import pytest

from pipeline.data.source import discover_source, hold_out_validation
from pipeline.data.synthetic import make_jpeg_bytes
from tests.helpers_data import small_imagenet


def _labels(source):
    return {item.path.stem: item.wnid for item in source.official_val_files}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The same generated dataset in all three val layouts."""
    base = tmp_path_factory.mktemp("layouts")
    return {
        layout: small_imagenet(base / layout, val_layout=layout, num_classes=4, val_per_class=3, seed=4)
        for layout in ("folders", "devkit", "loc_csv")
    }


@pytest.mark.parametrize("layout", ["folders", "devkit", "loc_csv"])
def test_each_val_layout_is_detected_and_labelled_like_the_folders(trees, layout):
    source = discover_source(trees[layout])
    assert source.val_layout == layout
    assert [info.index for info in source.classes] == [0, 1, 2, 3]
    assert [info.wnid for info in source.classes] == sorted(source.train_files)
    assert source.num_train_files == 4 * 8
    assert len(source.official_val_files) == 12
    assert _labels(source) == _labels(discover_source(trees["folders"]))
    assert source.stray_files == []


def test_names_come_from_synset_mapping_then_devkit_then_wnid(trees, tmp_path):
    assert discover_source(trees["loc_csv"]).name_source == "LOC_synset_mapping.txt"
    from_devkit = discover_source(trees["devkit"])
    assert from_devkit.name_source == "meta.mat"
    assert [info.name for info in from_devkit.classes] == [f"synthetic class {index}" for index in range(4)]

    bare = shutil.copytree(trees["folders"], tmp_path / "bare")
    (bare / "LOC_synset_mapping.txt").unlink()
    (bare / "LOC_synset_mapping.txt").with_name("unrelated.txt").write_text("x")
    source = discover_source(bare)
    assert source.name_source == "wnid"
    assert [info.name for info in source.classes] == [info.wnid for info in source.classes]


def test_a_custom_synset_mapping_names_the_classes(trees, tmp_path):
    root = shutil.copytree(trees["folders"], tmp_path / "named")
    wnids = sorted(path.name for path in (root / "train").iterdir())
    (root / "LOC_synset_mapping.txt").write_text(f"{wnids[0]} tench, Tinca tinca\n{wnids[1]} goldfish\n")
    names = [info.name for info in discover_source(root).classes]
    # Classes the file does not name keep their wnid rather than failing the whole run.
    assert names == ["tench, Tinca tinca", "goldfish", wnids[2], wnids[3]]


def test_exactly_1000_classes_without_metadata_take_torchvision_names(tmp_path):
    from torchvision.models import AlexNet_Weights

    tiny = make_jpeg_bytes(8, 8, seed=0)
    for number in range(1000):
        folder = tmp_path / "train" / f"n{number:08d}"
        folder.mkdir(parents=True)
        (folder / "a.JPEG").write_bytes(tiny)
    source = discover_source(tmp_path)
    assert source.name_source == "torchvision"
    categories = AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
    assert [info.name for info in source.classes] == categories
    assert (source.classes[0].name, source.classes[999].name) == ("tench", "toilet tissue")
    assert source.val_layout is None and source.official_val_files == []


def test_kaggle_download_layout_is_accepted(trees, tmp_path):
    kaggle = tmp_path / "imagenet-object-localization-challenge"
    images = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    images.mkdir(parents=True)
    for name in ("train", "val"):
        shutil.copytree(trees["loc_csv"] / name, images / name)
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.copy(trees["loc_csv"] / name, kaggle / name)
    source = discover_source(kaggle)
    assert (source.val_layout, source.name_source) == ("loc_csv", "LOC_synset_mapping.txt")
    assert _labels(source) == _labels(discover_source(trees["folders"]))


def test_stray_files_are_skipped_and_reported_with_a_warning(trees, tmp_path, caplog):
    root = shutil.copytree(trees["folders"], tmp_path / "stray")
    class_dir = next((root / "train").iterdir())
    (class_dir / "notes.txt").write_text("not an image")
    (class_dir / ".DS_Store").write_bytes(b"\0")
    (class_dir / "nested").mkdir()
    (class_dir / "upper.JPG").write_bytes(make_jpeg_bytes(8, 8, seed=1))
    (root / "train" / "README").write_text("x")
    (root / "val" / "index.html").write_text("x")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.source"):
        source = discover_source(root)
    reasons = {stray.path.name: stray.reason for stray in source.stray_files}
    assert set(reasons) == {"notes.txt", ".DS_Store", "nested", "README", "index.html"}
    assert "not an image" in reasons["notes.txt"] and "not inside a class folder" in reasons["README"]
    assert class_dir / "upper.JPG" in source.train_files[class_dir.name]  # extensions are case-insensitive
    assert {stray.path.name: stray.folder for stray in source.stray_files}["index.html"] == "val"
    assert sum(stray.folder == "train" for stray in source.stray_files) == 4
    assert "skipping 5 files" in caplog.text


def test_empty_class_folder_is_an_error_naming_it(trees, tmp_path):
    root = shutil.copytree(trees["folders"], tmp_path / "empty")
    (root / "train" / "n00000001").mkdir()
    (root / "train" / "n00000001" / "readme.txt").write_text("only a stray file")
    with pytest.raises(ValueError, match=r"class folder .*n00000001 holds no images"):
        discover_source(root)


def test_val_class_missing_from_train_is_an_error_naming_wnid_and_file(trees, tmp_path):
    root = shutil.copytree(trees["folders"], tmp_path / "unknown")
    (root / "val" / "n99999999").mkdir()
    (root / "val" / "n99999999" / "ILSVRC2012_val_00000099.JPEG").write_bytes(make_jpeg_bytes(8, 8, seed=0))
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000099.JPEG has class n99999999"):
        discover_source(root)


def test_missing_train_and_unlabelled_flat_val_are_errors(trees, tmp_path):
    with pytest.raises(ValueError, match="no train/ folder"):
        discover_source(tmp_path)
    root = shutil.copytree(trees["loc_csv"], tmp_path / "unlabelled")
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(ValueError, match="no labels were found"):
        discover_source(root)


def test_without_val_folder_there_is_no_official_val(trees, tmp_path):
    root = shutil.copytree(trees["folders"], tmp_path / "train_only")
    shutil.rmtree(root / "val")
    source = discover_source(root)
    assert (source.val_layout, source.official_val_files) == (None, [])


def test_held_out_val_is_deterministic_disjoint_and_complete(trees):
    source = discover_source(trees["folders"])
    train, held_out = hold_out_validation(source, val_per_class=3, seed=11)
    again_train, again_held_out = hold_out_validation(source, val_per_class=3, seed=11)
    assert (train, held_out) == (again_train, again_held_out)
    assert {item.path for item in train}.isdisjoint(item.path for item in held_out)
    everything = {path for paths in source.train_files.values() for path in paths}
    assert {item.path for item in train} | {item.path for item in held_out} == everything
    for wnid in source.train_files:
        assert sum(item.wnid == wnid for item in held_out) == 3
        assert all(item.path.parent.name == item.wnid for item in train + held_out)
    _, other_seed = hold_out_validation(source, val_per_class=3, seed=12)
    assert {item.path for item in other_seed} != {item.path for item in held_out}
    assert hold_out_validation(source, val_per_class=0, seed=11)[1] == []


def test_holding_out_all_images_of_a_class_is_an_error(trees):
    source = discover_source(trees["folders"])
    with pytest.raises(ValueError, match="has 8 training images; holding out val_per_class = 8"):
        hold_out_validation(source, val_per_class=8, seed=0)
    with pytest.raises(ValueError, match="val_per_class = -1"):
        hold_out_validation(source, val_per_class=-1, seed=0)
