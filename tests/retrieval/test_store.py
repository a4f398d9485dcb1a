"""Embeddings on disk: complete or absent, and read back as data only."""

import json

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.retrieval import store


def sample(count: int = 4, dim: int = 3) -> store.Embeddings:
    meta = store.EmbeddingMeta(model_source="models:/m/1", model_version="1", model_run_id=None,
                               architecture="resnet18", layer="avgpool", dim=dim, split="val", data_root="/d",
                               manifest_hash="abc", num_samples=count, unreadable=1, class_names=["a", "b"])
    vectors = np.eye(count, dim, dtype=np.float32)
    return store.Embeddings(meta, vectors, np.array([0, 1, -1, 0][:count]), np.zeros((count, 2), dtype=np.int64),
                            [f"k{i}" for i in range(count)])


def test_a_round_trip_keeps_every_array_and_the_meta(tmp_path):
    written = sample()
    store.write_embeddings(tmp_path / "out", written)
    read = store.read_embeddings(tmp_path / "out")
    assert read.meta == written.meta and read.keys == written.keys
    assert np.array_equal(read.vectors, written.vectors) and np.array_equal(read.labels, written.labels)
    assert read.readable.tolist() == [True, True, False, True]


def test_a_failure_while_writing_leaves_the_previous_output_and_no_debris(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    with pytest.raises(RuntimeError, match="disk on fire"):
        with store.staged(tmp_path / "out") as folder:
            (folder / store.EMBEDDINGS_FILE).write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert store.read_embeddings(tmp_path / "out").meta.num_samples == 4


def test_a_pickled_array_is_refused_and_its_payload_never_runs(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    np.save(tmp_path / "out" / store.LABELS_FILE, np.array([Payload()] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="unreadable embedding files .*allow_pickle"):
        store.read_embeddings(tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize(("content", "problem"), [
    ("[1, 2]", "not an embedding description"), ('{"dim": 3}', "not an embedding description"),
    (None, "no meta.json"),
])
def test_a_bad_or_missing_meta_is_one_line(tmp_path, content, problem):
    store.write_embeddings(tmp_path / "out", sample())
    if content is None:
        (tmp_path / "out" / store.META_FILE).unlink()
    else:
        (tmp_path / "out" / store.META_FILE).write_text(content)
    with pytest.raises(DataError, match=problem):
        store.read_embeddings(tmp_path / "out")


def test_arrays_that_disagree_with_the_meta_are_refused(tmp_path):
    store.write_embeddings(tmp_path / "out", sample())
    meta = json.loads((tmp_path / "out" / store.META_FILE).read_text())
    (tmp_path / "out" / store.META_FILE).write_text(json.dumps({**meta, "dim": 5}))
    with pytest.raises(DataError, match=r"inconsistent embedding files: embeddings float32 \(4, 3\), expected"):
        store.read_embeddings(tmp_path / "out")


def test_the_replica_pool_leaves_room_for_the_tasks_that_feed_it():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.retrieval.embed import replicas_that_fit

    config = load_config(overrides=["retrieval.embed_workers=4", "scaling.num_workers=0"])
    assert replicas_that_fit(config, {"CPU": 2.0}) == 1  # 2 replicas would take both CPUs: nothing would decode
    assert replicas_that_fit(config, {"CPU": 16.0}) == 4
    with pytest.raises(ConfigError, match="the Ray cluster has 1 CPUs"):
        replicas_that_fit(config, {"CPU": 1.0})
