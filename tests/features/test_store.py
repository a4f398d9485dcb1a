"""Embeddings on disk: complete or absent, and read back as data only, every file checked against meta.json."""

import json

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.features import store


def sample(count: int = 4, dim: int = 3, model_source: str = "models:/m/1") -> store.Embeddings:
    """Two shards (count - 1 and 1 samples), two classes, row 2 unreadable."""
    meta = store.EmbeddingMeta(
        model_source=model_source,
        model_version=model_source.rsplit("/", 1)[-1],
        model_run_id=None,
        architecture="resnet18",
        layer="avgpool",
        dim=dim,
        split="val",
        data_root="/d",
        manifest_hash="abc",
        num_samples=count,
        unreadable=1,
        class_names=["a", "b"],
        shard_counts=[count - 1, 1],
        index_sha256="0" * 64,
    )
    vectors = np.eye(count, dim, dtype=np.float32)
    positions = np.array([(0, index) for index in range(count - 1)] + [(1, 0)], dtype=np.int64)
    return store.Embeddings(meta, vectors, np.array([0, 1, -1, 0][:count]), positions, [f"k{i}" for i in range(count)])


def edit_meta(folder, **changes) -> None:
    meta = json.loads((folder / store.META_FILE).read_text())
    (folder / store.META_FILE).write_text(json.dumps({**meta, **changes}))


def test_a_round_trip_keeps_every_array_and_the_meta(tmp_path):
    written = sample()
    store.write_embeddings(tmp_path / "out", written)
    read = store.read_embeddings(tmp_path / "out")
    assert read.meta == written.meta and read.keys == written.keys
    assert np.array_equal(read.vectors, written.vectors) and np.array_equal(read.labels, written.labels)
    assert np.array_equal(read.positions, written.positions)
    assert read.readable.tolist() == [True, True, False, True]


def test_a_failure_while_writing_leaves_the_previous_output_and_no_debris(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    with pytest.raises(RuntimeError, match="disk on fire"):
        with store.staged(tmp_path / "out") as folder:
            (folder / store.EMBEDDINGS_FILE).write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert store.read_embeddings(tmp_path / "out").meta.num_samples == 4


def test_a_pickled_array_is_refused_by_its_header_and_its_payload_never_runs(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    np.save(tmp_path / "out" / store.LABELS_FILE, np.array([Payload()] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"labels.npy: object \(4,\), but meta.json describes int64 \(4,\)"):
        store.read_embeddings(tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[1, 2]", "not an embedding description"),
        ('{"dim": 3}', "not an embedding description"),
        (None, "no meta.json"),
        ("{" * 10, "not an embedding description"),
    ],
)
def test_a_bad_or_missing_meta_is_one_line(tmp_path, content, problem):
    store.write_embeddings(tmp_path / "out", sample())
    if content is None:
        (tmp_path / "out" / store.META_FILE).unlink()
    else:
        (tmp_path / "out" / store.META_FILE).write_text(content)
    with pytest.raises(DataError, match=problem) as caught:
        store.read_embeddings(tmp_path / "out")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"shard_counts": [3, 3]}, "shard_counts are not sample counts adding up to num_samples = 4"),
        ({"index_sha256": "abc"}, "index_sha256 is not a sha256 hex digest"),
        ({"class_names": []}, "class_names is not a non-empty list"),
        ({"unreadable": 4}, "unreadable = 4"),
        ({"model_version": 7}, "model_version is neither null nor a string"),
    ],
)
def test_a_meta_out_of_range_is_refused_naming_the_field(tmp_path, changes, problem):
    store.write_embeddings(tmp_path / "out", sample())
    edit_meta(tmp_path / "out", **changes)
    with pytest.raises(DataError, match=f"meta.json: not an embedding description \\({problem}"):
        store.read_meta(tmp_path / "out")


def test_a_folder_of_the_format_without_the_index_checksum_is_refused_with_a_hint(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    meta = json.loads((tmp_path / "out" / store.META_FILE).read_text())
    del meta["index_sha256"], meta["shard_counts"]
    (tmp_path / "out" / store.META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(DataError, match="format version 1, this pipeline reads 2 .*; embed the split again"):
        store.read_rows(tmp_path / "out")


def test_arrays_that_disagree_with_the_meta_are_refused(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    edit_meta(tmp_path / "out", dim=5)
    with pytest.raises(DataError, match=r"embeddings.npy: float32 \(4, 3\), but meta.json describes float32 \(4, 5\)"):
        store.read_embeddings(tmp_path / "out")


def test_string_labels_are_refused_by_their_header(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    np.save(tmp_path / "out" / store.LABELS_FILE, np.array(["0", "1", "-1", "0"]))
    with pytest.raises(DataError, match=r"labels.npy: <U2 \(4,\), but meta.json describes int64 \(4,\)"):
        store.read_rows(tmp_path / "out")


def plant_header(path, shape: tuple[int, ...], data_bytes: int = 32) -> None:
    """A .npy header declaring `shape` int64, followed by a few bytes: what np.load would try to allocate."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<i8", "fortran_order": False, "shape": shape})
        file.write(b"\0" * data_bytes)


def test_a_header_declaring_2_40_rows_is_refused_before_any_allocation(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    plant_header(tmp_path / "out" / store.LABELS_FILE, (2**40,))
    with pytest.raises(DataError, match=rf"labels.npy: int64 \({2**40},\), but meta.json describes int64 \(4,\)"):
        store.read_rows(tmp_path / "out")
    # meta.json agreeing with the header: the file's size gives it away
    edit_meta(tmp_path / "out", num_samples=2**40, shard_counts=[2**40])
    with pytest.raises(
        DataError,
        match=rf"labels.npy: \d+ bytes, but its header declares int64 \({2**40},\) "
        r"\(\d+ bytes\)",
    ):
        store.read_rows(tmp_path / "out")


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ([0, 1, -1, 2], r"label 2 at row 3; a label is -1 \(unreadable\) or a class index below 2"),
        ([0, -5, -1, 0], r"label -5 at row 1"),
        ([0, 1, -1, -1], r"2 rows labelled -1 \(unreadable\), but meta.json counts 1"),
    ],
)
def test_labels_outside_the_class_list_are_refused(tmp_path, labels, problem):
    store.write_embeddings(tmp_path / "out", sample())
    np.save(tmp_path / "out" / store.LABELS_FILE, np.array(labels, dtype=np.int64))
    with pytest.raises(DataError, match=f"labels.npy: {problem}"):
        store.read_rows(tmp_path / "out")


@pytest.mark.parametrize(
    ("positions", "problem"),
    [
        ([(0, 0), (0, 1), (0, 2), (7, 0)], r"shard 7 at row 3, but the gallery has 2 shards"),
        ([(0, 0), (-1, 1), (0, 2), (1, 0)], r"shard -1 at row 1"),
        ([(0, 0), (0, -1), (0, 2), (1, 0)], r"sample -1 of shard 0 at row 1, but that shard holds 3 samples"),
        ([(0, 0), (0, 1), (0, 2), (1, 1)], r"sample 1 of shard 1 at row 3, but that shard holds 1 samples"),
        ([(0, 1), (0, 0), (0, 2), (1, 0)], r"row 0 is sample 1 of shard 0, but rows follow the manifest order"),
    ],
)
def test_positions_outside_the_gallerys_shards_or_out_of_order_are_refused(tmp_path, positions, problem):
    store.write_embeddings(tmp_path / "out", sample())
    np.save(tmp_path / "out" / store.POSITIONS_FILE, np.array(positions, dtype=np.int64))
    with pytest.raises(DataError, match=f"positions.npy: {problem}"):
        store.read_rows(tmp_path / "out")


@pytest.mark.parametrize("keys", ['["k0", "k1", "k2"]', '["k0", "k1", "k2", 3]', '{"k": 1}'])
def test_keys_that_are_not_one_string_a_row_are_refused(tmp_path, keys):
    store.write_embeddings(tmp_path / "out", sample())
    (tmp_path / "out" / store.KEYS_FILE).write_text(keys)
    with pytest.raises(DataError, match=r"keys.json: expected a JSON list of 4 strings"):
        store.read_rows(tmp_path / "out")


def test_the_replica_pool_leaves_room_for_the_tasks_that_feed_it():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.retrieval.embed import replicas_that_fit

    config = load_config(overrides=["retrieval.embed_workers=4", "scaling.num_workers=0"])
    assert replicas_that_fit(config, {"CPU": 2.0}) == 1  # 2 replicas would take both CPUs: nothing would decode
    assert replicas_that_fit(config, {"CPU": 16.0}) == 4
    with pytest.raises(ConfigError, match="the Ray cluster has 1 CPUs"):
        replicas_that_fit(config, {"CPU": 1.0})
