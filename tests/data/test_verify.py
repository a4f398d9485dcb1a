"""Verifying shards against their manifest, and indexing shards written elsewhere."""

import shutil

import pytest
import webdataset

from pipeline.data.manifest import ClassInfo, Manifest, ShardInfo, file_sha256, read_manifest, write_manifest
from pipeline.data.sharding import shard_imagenet
from pipeline.data.synthetic import make_jpeg_bytes
from pipeline.data.verify import index_shards, verify_dataset, verify_split
from tests.helpers_data import small_imagenet


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    small_imagenet(base / "source", num_classes=3, train_per_class=8, val_per_class=2, seed=2)
    shard_imagenet(base / "source", base / "shards", val_per_class=2, samples_per_shard=6, progress=False)
    return base / "shards"


@pytest.fixture
def shards(clean_shards, tmp_path):
    """A private copy each test may damage."""
    return shutil.copytree(clean_shards, tmp_path / "shards")


def _write_shard_with_manifest(split_dir, samples, num_classes=3):
    """A one-shard split written by hand, with a manifest that matches the file byte for byte."""
    split_dir.mkdir(parents=True)
    with webdataset.TarWriter(str(split_dir / "train-000000.tar"), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    path = split_dir / "train-000000.tar"
    classes = [ClassInfo(index, f"n{index:08d}", f"class {index}") for index in range(num_classes)]
    shard = ShardInfo(path.name, len(samples), file_sha256(path), path.stat().st_size)
    write_manifest(Manifest(split="train", classes=classes, shards=[shard]), split_dir)


def test_clean_shards_pass(clean_shards):
    assert verify_dataset(clean_shards) == {"train": [], "val": [], "test": []}
    assert verify_dataset(clean_shards / "missing") == {}


def test_one_flipped_byte_is_reported_by_checksum(shards):
    victim = shards / "train" / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = verify_split(shards / "train")
    assert len(problems) == 1 and problems[0].startswith("train-000001.tar: sha256")
    assert verify_split(shards / "val") == []


def test_truncated_and_deleted_shards_are_reported(shards):
    truncated = shards / "train" / "train-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    (shards / "test" / "test-000000.tar").unlink()
    problems = verify_dataset(shards)
    train = "\n".join(problems["train"])
    assert "train-000000.tar: 3000 bytes, the manifest says" in train
    assert "train-000000.tar: sha256" in train
    assert "samples, the manifest says" in train
    assert problems["test"] == ["test-000000.tar: missing (listed in the manifest)"]
    assert problems["val"] == []


def test_missing_manifest_is_reported(shards):
    (shards / "val" / "manifest.json").unlink()
    assert "no manifest.json" in verify_dataset(shards)["val"][0]


def test_undecodable_image_and_bad_labels_are_reported(tmp_path):
    good = make_jpeg_bytes(16, 12, seed=0)
    _write_shard_with_manifest(
        tmp_path / "train",
        [
            {"__key__": "fine", "jpg": good, "cls": b"2"},
            {"__key__": "broken", "jpg": good[: len(good) // 2], "cls": b"1"},
            {"__key__": "out_of_range", "jpg": good, "cls": b"3"},
            {"__key__": "not_a_number", "jpg": good, "cls": b"cat"},
            {"__key__": "no_label", "jpg": good},
        ],
    )
    problems = verify_split(tmp_path / "train")
    assert problems[0].startswith("train-000000.tar: sample broken: image does not decode")
    assert problems[1:] == [
        "train-000000.tar: sample out_of_range: label 3 is outside 0..2",
        "train-000000.tar: sample not_a_number: label b'cat' is not an integer",
        "train-000000.tar: sample no_label has no label (cls); it has jpg",
    ]
    # Without decoding, only the label problems remain.
    assert len(verify_split(tmp_path / "train", decode=False)) == 3


def test_decompression_bombs_and_unexpected_formats_are_reported_without_decoding(tmp_path, monkeypatch):
    import io

    from PIL import Image, ImageFile

    from tests.data.test_image_header import bomb_jpeg, bomb_png

    good = make_jpeg_bytes(16, 12, seed=0)
    tiff = io.BytesIO()
    Image.new("RGB", (16, 12)).save(tiff, format="TIFF")
    _write_shard_with_manifest(
        tmp_path / "train",
        [
            {"__key__": "fine", "jpg": good, "cls": b"0"},
            {"__key__": "bomb_png", "jpg": bomb_png(), "cls": b"1"},
            {"__key__": "bomb_jpeg", "jpg": bomb_jpeg(), "cls": b"2"},
            {"__key__": "tiff", "jpg": tiff.getvalue(), "cls": b"0"},  # PIL reads it; the loader would mask it
        ],
    )
    real_load = ImageFile.ImageFile.load

    def load(image):
        assert image.size[0] * image.size[1] < 1_000_000, f"a {image.size} image was decoded"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    problems = verify_split(tmp_path / "train")
    assert len(problems) == 3 and all("\n" not in problem for problem in problems)
    for key, problem in zip(("bomb_png", "bomb_jpeg"), problems):
        assert problem == (
            f"train-000000.tar: sample {key}: image does not decode (CorruptImageError: declares "
            "12000x12000 = 144,000,000 pixels, more than data.max_image_pixels = 40,000,000; refused "
            "before decoding)"
        )
    assert problems[2] == (
        "train-000000.tar: sample tiff: image does not decode (CorruptImageError: not a JPEG, PNG or WEBP image)"
    )
    # The limit is the caller's, as the loader's is data.max_image_pixels.
    assert len(verify_split(tmp_path / "train", max_image_pixels=16 * 12 - 1)) == 4


def test_index_of_shardwriter_shards_makes_a_correct_manifest(tmp_path):
    images = [make_jpeg_bytes(16, 12, seed=seed) for seed in range(3)]
    with webdataset.ShardWriter(str(tmp_path / "imagenet-train-%06d.tar"), maxcount=4, verbose=0) as writer:
        for number in range(10):
            writer.write({"__key__": f"sample{number:03d}", "jpg": images[number % 3], "cls": number % 5})
    manifest = index_shards(tmp_path, "train", progress=False)
    assert [shard.name for shard in manifest.shards] == [f"imagenet-train-{n:06d}.tar" for n in range(3)]
    assert manifest.shard_counts == [4, 4, 2]
    assert [shard.sha256 for shard in manifest.shards] == [
        file_sha256(tmp_path / shard.name) for shard in manifest.shards
    ]
    assert (manifest.num_classes, manifest.image_key, manifest.label_key) == (5, "jpg", "cls")
    assert read_manifest(tmp_path) == manifest
    assert verify_split(tmp_path) == []

    # A brace range as webdataset URLs use it, a classes file, and a manifest kept elsewhere.
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"n{index:08d} thing {index}\n" for index in range(6)))
    elsewhere = index_shards(
        tmp_path,
        "val",
        pattern="imagenet-train-{000000..000001}.tar",
        classes_file=classes,
        output=tmp_path / "elsewhere",
        progress=False,
    )
    assert elsewhere.shard_counts == [4, 4] and elsewhere.classes[5] == ClassInfo(5, "n00000005", "thing 5")
    # Outside the manifest's folder a shard is a file:// URL, read only where data.shard_url_schemes allows "file".
    assert elsewhere.shards[0].name == (tmp_path / "imagenet-train-000000.tar").resolve().as_uri()
    assert verify_split(tmp_path / "elsewhere") == []


def test_index_rejects_missing_shards_and_keys(tmp_path):
    with pytest.raises(ValueError, match="no shard in .* matches"):
        index_shards(tmp_path, "train", progress=False)
    with pytest.raises(ValueError, match="shards of 'part-{0..3}.tar' are missing"):
        index_shards(tmp_path, "train", pattern="part-{0..3}.tar", progress=False)
    with pytest.raises(ValueError, match="split 'dev'"):
        index_shards(tmp_path, "dev", progress=False)
    with webdataset.TarWriter(str(tmp_path / "unlabelled.tar"), encoder=False) as writer:
        writer.write({"__key__": "a", "jpg": make_jpeg_bytes(8, 8, seed=0)})
    with pytest.raises(ValueError, match="sample a has no label"):
        index_shards(tmp_path, "train", progress=False)
    with webdataset.TarWriter(str(tmp_path / "unlabelled.tar"), encoder=False) as writer:
        writer.write({"__key__": "b", "txt": b"caption", "cls": b"0"})
    with pytest.raises(ValueError, match=r"sample b has no image \(jpg/jpeg/png/webp\); it has cls, txt"):
        index_shards(tmp_path, "train", progress=False)
    assert not (tmp_path / "manifest.json").exists()
