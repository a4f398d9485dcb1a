"""Sharding an ILSVRC2012 tree: counts, shuffling, original bytes, odd and damaged files, parallelism, resume."""

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import file_sha256, read_manifest
from pipeline.data.sharding import shard_imagenet
from tests.helpers_data import add_bad_files, read_samples, small_imagenet

VAL_PER_CLASS = 2
OPTIONS = {"val_per_class": VAL_PER_CLASS, "samples_per_shard": 7, "seed": 3, "progress": False}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """4 classes x 10 good train JPEGs + 3 official val each; the first class also holds ImageNet's odd files."""
    root = small_imagenet(
        tmp_path_factory.mktemp("source") / "imagenet", num_classes=4, train_per_class=10, val_per_class=3, seed=1
    )
    odd_class = sorted((root / "train").iterdir())[0]
    return root, odd_class, add_bad_files(odd_class)


@pytest.fixture(scope="module")
def sharded(source, tmp_path_factory):
    output = tmp_path_factory.mktemp("sharded") / "shards"
    return output, shard_imagenet(source[0], output, **OPTIONS)


def _split_samples(output, split):
    return [sample for shard in sorted((output / split).glob("*.tar")) for sample in read_samples(shard)]


def _source_images(root, folder):
    return {path.stem: path for path in (root / folder).rglob("*") if path.suffix.lower() in (".jpeg", ".jpg", ".png")}


def test_every_image_lands_once_with_its_label(source, sharded):
    root, _, outcomes = source
    output, summary = sharded
    skipped = {name.split(".")[0] for name, outcome in outcomes.items() if outcome == "skipped"}
    wnids = sorted(path.name for path in (root / "train").iterdir())
    train_images = _source_images(root, "train")
    stored = {split: _split_samples(output, split) for split in ("train", "val", "test")}
    keys = [sample["__key__"] for split in ("train", "val") for sample in stored[split]]
    assert len(keys) == len(set(keys)) == len(train_images) - len(skipped) == 4 * 10 + 4
    assert set(keys) == set(train_images) - skipped
    for sample in stored["train"] + stored["val"]:
        assert wnids[sample["cls"]] == train_images[sample["__key__"]].parent.name
    val_images = _source_images(root, "val")
    assert {sample["__key__"]: wnids[sample["cls"]] for sample in stored["test"]} == {
        stem: path.parent.name for stem, path in val_images.items()
    }
    for split in ("train", "val", "test"):
        manifest = read_manifest(output / split)
        assert manifest.num_samples == summary.splits[split].num_samples == len(stored[split])
        assert [info.wnid for info in manifest.classes] == wnids
    val_manifest = read_manifest(output / "val")
    assert val_manifest.num_samples + val_manifest.skipped_files == 4 * VAL_PER_CLASS


def test_shards_are_balanced_named_by_split_and_mix_classes(sharded):
    output, _ = sharded
    manifest = read_manifest(output / "train")
    assert [shard.name for shard in manifest.shards] == [f"train-{n:06d}.tar" for n in range(len(manifest.shards))]
    assert max(manifest.shard_counts) <= 7
    for shard in sorted((output / "train").glob("*.tar")):
        assert len({sample["cls"] for sample in read_samples(shard)}) >= 2, shard.name


def test_good_rgb_jpegs_keep_their_original_bytes(source, sharded):
    root, _, outcomes = source
    output, _ = sharded
    odd = {name.split(".")[0] for name in outcomes}
    images = {**_source_images(root, "train"), **_source_images(root, "val")}
    checked = 0
    for split in ("train", "val", "test"):
        for sample in _split_samples(output, split):
            if sample["__key__"] not in odd:
                assert sample["jpg"] == images[sample["__key__"]].read_bytes()
                checked += 1
    assert checked == 4 * 10 + 4 * 3


def test_cmyk_grayscale_and_png_are_converted_to_rgb_jpeg(source, sharded):
    _, odd_class, outcomes = source
    output, summary = sharded
    converted = {entry["file"].split("/")[-1]: entry["reason"] for entry in summary.converted}
    assert set(converted) == {name for name, outcome in outcomes.items() if outcome == "converted"}
    assert "CMYK image converted to RGB" in converted["cmyk.JPEG"]
    assert "L image converted to RGB" in converted["gray.JPEG"]
    assert "PNG data in a .JPEG file" in converted["png_inside.JPEG"]
    stored = {
        sample["__key__"]: sample["jpg"] for split in ("train", "val") for sample in _split_samples(output, split)
    }
    for name in converted:
        with Image.open(io.BytesIO(stored[name.split(".")[0]])) as image, Image.open(odd_class / name) as original:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", original.size)
            # Same picture: the mean colour survives the conversion (CMYK is not inverted, grey stays grey).
            difference = [abs(a - b) for a, b in zip(_mean(image), _mean(original.convert("RGB")))]
            assert max(difference) < 6, (name, difference)
    # The manifest counts them (it stays small at any scale); the report lists them.
    assert sum(read_manifest(output / split).converted_files for split in ("train", "val")) == len(converted)
    assert "converted" not in json.loads((output / "train" / "manifest.json").read_text())


def _mean(image):
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0).tolist()


def test_damaged_and_stray_files_are_skipped_and_reported(source, sharded):
    _, odd_class, outcomes = source
    output, summary = sharded
    expected = {name for name, outcome in outcomes.items() if outcome in ("skipped", "stray")}
    reasons = {entry["file"].split("/")[-1]: entry["reason"] for entry in summary.skipped}
    assert set(reasons) == expected
    assert "cannot be decoded" in reasons["truncated.JPEG"] and "truncated" in reasons["truncated.JPEG"]
    assert reasons["garbage.JPEG"] == reasons["empty.JPEG"] == "cannot be decoded: not a known image format"
    assert "not an image file" in reasons["notes.txt"]
    report = json.loads((output / "report.json").read_text())
    assert {entry["file"].split("/")[-1] for entry in report["skipped"]} == expected
    assert sorted(entry["file"] for entry in report["skipped"] if entry["split"] == "train") == sorted(
        f"train/{odd_class.name}/{name}" for name in expected
    )
    assert sum(read_manifest(output / split).skipped_files for split in ("train", "val")) == len(expected)


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_readable_by_plain_webdataset_and_by_tar(sharded):
    import webdataset

    output, _ = sharded
    shard = output / "test" / "test-000000.tar"
    samples = list(webdataset.WebDataset(str(shard)).decode())
    assert samples and all(isinstance(s["jpg"], bytes) and isinstance(s["cls"], int) for s in samples)
    listing = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listing) == sorted(f"{s['__key__']}.{ext}" for s in samples for ext in ("cls", "jpg"))
    assert all("." not in s["__key__"] for s in samples)


def test_manifest_records_checksums_and_the_options(source, sharded):
    output, _ = sharded
    manifest = read_manifest(output / "train")
    for shard in manifest.shards:
        path = output / "train" / shard.name
        assert (shard.sha256, shard.bytes) == (file_sha256(path), path.stat().st_size)
    assert {
        key: manifest.source[key]
        for key in ("path", "layout", "seed", "val_per_class", "samples_per_shard", "max_side", "quality")
    } == {
        "path": str(source[0]),
        "layout": "folders",
        "seed": 3,
        "val_per_class": 2,
        "samples_per_shard": 7,
        "max_side": None,
        "quality": 90,
    }
    assert not list(output.rglob("*.partial"))


def test_max_side_resizes_keeping_the_aspect_ratio(source, tmp_path):
    summary = shard_imagenet(
        source[0], tmp_path / "small", val_per_class=1, samples_per_shard=100, max_side=32, progress=False
    )
    for sample in _split_samples(tmp_path / "small", "train"):
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 24))
    assert any("resized from 64x48 to 32x24" in entry["reason"] for entry in summary.converted)
    assert read_manifest(tmp_path / "small" / "train").source["max_side"] == 32


def test_two_processes_write_the_same_shards(source, sharded, tmp_path):
    output, _ = sharded
    summary = shard_imagenet(source[0], tmp_path / "parallel", processes=2, **OPTIONS)
    assert summary.shards_written == sum(len(read_manifest(output / s).shards) for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        assert read_manifest(tmp_path / "parallel" / split).shards == read_manifest(output / split).shards


def test_resume_after_a_crash_rewrites_only_what_is_missing(source, sharded, tmp_path):
    output = shutil.copytree(sharded[0], tmp_path / "crashed")
    train = output / "train"
    original = (train / "manifest.json").read_text()
    # The crash: manifest never written, one shard lost, another caught half-written.
    (train / "manifest.json").unlink()
    (train / "train-000001.tar").unlink()
    (train / "train-000002.tar.json").unlink()
    (train / "train-000002.tar").rename(train / "train-000002.tar.partial")
    untouched = {path.name: path.stat().st_mtime_ns for path in train.glob("*.tar")}

    summary = shard_imagenet(source[0], output, resume=True, **OPTIONS)
    assert summary.splits["train"].shards_written == 2
    assert (
        summary.shards_kept
        == summary.splits["train"].num_shards - 2 + summary.splits["val"].num_shards + summary.splits["test"].num_shards
    )
    assert {name: (train / name).stat().st_mtime_ns for name in untouched} == untouched
    assert (train / "manifest.json").read_text() == original
    assert not list(train.glob("*.partial"))


def test_existing_shards_are_never_silently_overwritten(source, sharded, tmp_path):
    output = shutil.copytree(sharded[0], tmp_path / "existing")
    before = {path: path.stat().st_mtime_ns for path in output.rglob("*")}
    with pytest.raises(ValueError, match="already holds shards; pass --resume"):
        shard_imagenet(source[0], output, **OPTIONS)
    with pytest.raises(ValueError, match="cannot resume .* planned from different"):
        shard_imagenet(source[0], output, resume=True, **{**OPTIONS, "samples_per_shard": 5})
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*")} == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"samples_per_shard": 0}, "samples_per_shard = 0 must be at least 1"),
        ({"val_per_class": -1}, "val_per_class = -1"),
        ({"max_side": 0}, "max_side = 0"),
        ({"quality": 0}, "quality = 0"),
        ({"processes": 0}, "processes = 0"),
        ({"max_image_pixels": 0}, "max_image_pixels = 0"),
        ({"val_per_class": 10}, "has 10 training images"),
    ],
)
def test_bad_options_are_value_errors_before_anything_is_written(source, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        shard_imagenet(source[0], tmp_path / "out", **{**OPTIONS, **options})
    assert not (tmp_path / "out").exists()


def test_decompression_bombs_in_the_source_are_skipped_from_their_headers(tmp_path, monkeypatch):
    from PIL import ImageFile

    from tests.data.test_image_header import bomb_jpeg, bomb_png

    root = small_imagenet(tmp_path / "imagenet", num_classes=2, train_per_class=4, val_per_class=1, seed=5)
    first_class = sorted((root / "train").iterdir())[0]
    (first_class / "huge.png").write_bytes(bomb_png())
    (first_class / "huge_frame.JPEG").write_bytes(bomb_jpeg())
    real_load = ImageFile.ImageFile.load

    def load(image):
        assert image.size[0] * image.size[1] < 1_000_000, f"a {image.size} image was decoded"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    summary = shard_imagenet(root, tmp_path / "shards", val_per_class=1, samples_per_shard=4, progress=False)
    reasons = {entry["file"].split("/")[-1]: entry["reason"] for entry in summary.skipped}
    assert set(reasons) == {"huge.png", "huge_frame.JPEG"}
    for reason in reasons.values():
        assert reason.startswith("too large: declares 12000x12000 = 144,000,000 pixels, more than")
    assert summary.splits["train"].num_samples + summary.splits["val"].num_samples == 2 * 4
    # The limit is the caller's: here it refuses the ordinary 64 x 48 images too.
    small = shard_imagenet(
        root, tmp_path / "small", val_per_class=1, samples_per_shard=4, progress=False, max_image_pixels=64 * 48 - 1
    )
    assert len(small.skipped) == 2 * 5 + 2 and all(split.num_samples == 0 for split in small.splits.values())


def test_shard_output_that_is_a_file_is_refused_before_any_work(tmp_path):
    from pipeline.data.sharding import shard_imagenet
    from pipeline.errors import DataError

    target = tmp_path / "shards"
    target.write_text("not a folder")
    with pytest.raises(DataError, match="is a file; give a folder"):
        shard_imagenet(tmp_path / "nowhere", target)
    assert target.read_text() == "not a folder"


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    import fcntl
    import os

    from pipeline.data.sharding import LOCK_FILE, shard_imagenet
    from pipeline.errors import DataError

    source = small_imagenet(tmp_path / "src")
    output = tmp_path / "shards"
    output.mkdir()
    (output / LOCK_FILE).write_text("4242")
    holder = os.open(output, os.O_RDONLY)  # another writer holds the folder's lock
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(DataError, match=r"is being written by another `shard` \(pid 4242\)"):
            shard_imagenet(source, output, val_per_class=1, samples_per_shard=4, progress=False)
    finally:
        os.close(holder)
    assert sorted(path.name for path in output.iterdir()) == [LOCK_FILE]  # nothing written meanwhile
    shard_imagenet(source, output, val_per_class=1, samples_per_shard=4, progress=False)  # lock released: runs
    assert (output / LOCK_FILE).read_text() == str(os.getpid())


@pytest.mark.slow
def test_sigkill_of_shard_stops_its_pool_and_an_immediate_resume_completes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from pipeline.data.verify import verify_dataset

    source = small_imagenet(tmp_path / "src")
    output = tmp_path / "shards"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "shard",
        "--source",
        str(source),
        "--output",
        str(output),
        "--val-per-class",
        "1",
        "--samples-per-shard",
        "2",
        "--processes",
        "2",
        "--max-side",
        "64",
        "--no-progress",
    ]

    def command_line(process: psutil.Process) -> str:
        try:
            return " ".join(process.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a short-lived helper that just exited
            return ""

    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    pool = []
    while time.time() < deadline and not pool:
        pool = [
            child
            for child in psutil.Process(parent.pid).children(recursive=True)
            if "multiprocessing" in command_line(child)
        ]
        time.sleep(0.05)
    assert pool, "the shard run never started its pool"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(pool, timeout=10)
    assert not alive, "pool processes outlived the killed shard run"  # so nothing writes after the kill
    # A resume right away takes the lock and finishes the job.
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(problems == [] for problems in verify_dataset(output, decode=True).values())
