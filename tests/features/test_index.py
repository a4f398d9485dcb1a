"""The faiss gallery: exact by default, approximate kinds close to it, ids are embedding rows; a file that is not
the index embed built for the gallery's rows is refused."""

import numpy as np
import pytest

from pipeline.data.manifest import file_sha256
from pipeline.errors import DataError
from pipeline.features.index import IndexSettings, build_index, load_index, save_index, search


def vectors(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    points = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_flat_search_is_exact_and_answers_with_the_given_rows():
    gallery, queries = vectors(300), vectors(20, seed=1)
    rows = np.arange(300) * 2 + 7  # e.g. readable rows of a larger embedding
    similarity, found = search(build_index(gallery, IndexSettings(), rows), queries, 5)
    brute = queries @ gallery.T
    expected = np.argsort(-brute, axis=1)[:, :5]
    assert np.array_equal(found, rows[expected])
    assert np.allclose(similarity, np.take_along_axis(brute, expected, axis=1), atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_most_exact_neighbours(kind):
    gallery, queries = vectors(2000), vectors(50, seed=1)
    exact = search(build_index(gallery, IndexSettings()), queries, 10)[1]
    approximate = search(build_index(gallery, IndexSettings(kind=kind, nlist=20, nprobe=8)), queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall > 0.8


def saved(tmp_path, index, name: str = "index.faiss"):
    path = tmp_path / name
    return path, save_index(index, path)


def test_a_saved_index_loads_back_and_a_mismatched_one_is_refused(tmp_path):
    gallery = vectors(50)
    path, sha256 = saved(tmp_path, build_index(gallery, IndexSettings()))
    assert sha256 == file_sha256(path)
    loaded = load_index(path, dim=16, rows=np.arange(50), sha256=sha256)
    assert np.array_equal(search(loaded, gallery[:3], 1)[1][:, 0], [0, 1, 2])
    with pytest.raises(DataError, match=r"index of 50 x 16, but its embeddings have 50 readable rows of width 32"):
        load_index(path, dim=32, rows=np.arange(50), sha256=sha256)
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(DataError, match="not a faiss index"):
        load_index(tmp_path / "junk.faiss", dim=16, rows=np.arange(50), sha256=file_sha256(tmp_path / "junk.faiss"))
    with pytest.raises(DataError, match="the gallery is empty"):
        build_index(np.zeros((0, 16), dtype=np.float32), IndexSettings())


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_index_whose_ids_point_past_the_gallery_rows_is_refused(tmp_path, kind):
    # 50 readable rows 0..49; the index answers with 1..50: the same count, one row that does not exist
    path, sha256 = saved(tmp_path, build_index(vectors(50), IndexSettings(kind=kind, nlist=2), np.arange(1, 51)))
    with pytest.raises(
        DataError,
        match=r"index.faiss: the index answers with row 50, which is not one of the "
        r"gallery's 50 readable rows",
    ):
        load_index(path, dim=16, rows=np.arange(50), sha256=sha256)


def test_an_index_holding_an_unreadable_row_is_refused(tmp_path):
    # rows 0..3 of which row 2 is unreadable (label -1): its zero vector must never be a neighbour
    path, sha256 = saved(tmp_path, build_index(vectors(3), IndexSettings(), np.array([0, 1, 2])))
    with pytest.raises(DataError, match=r"answers with row 2, which is not one of the gallery's 3 readable rows"):
        load_index(path, dim=16, rows=np.array([0, 1, 3]), sha256=sha256)


def test_an_index_file_not_matching_its_recorded_sha256_is_never_parsed(tmp_path, monkeypatch):
    import faiss

    path, sha256 = saved(tmp_path, build_index(vectors(10), IndexSettings()))
    other, _ = saved(tmp_path, build_index(vectors(10, seed=3), IndexSettings()), "other.faiss")
    parsed = []
    monkeypatch.setattr(faiss, "read_index", lambda *args: parsed.append(args))
    with pytest.raises(
        DataError,
        match=r"other.faiss: sha256 [0-9a-f]{16}\.\.\., but meta.json records "
        rf"{sha256[:16]}\.\.\.: not the index embed built",
    ):
        load_index(other, dim=16, rows=np.arange(10), sha256=sha256)
    assert parsed == []


def test_a_kind_embed_does_not_build_is_refused(tmp_path):
    import faiss

    euclidean = faiss.IndexIDMap(faiss.IndexFlatL2(16))
    euclidean.add_with_ids(vectors(10), np.arange(10))
    path, sha256 = saved(tmp_path, euclidean)
    with pytest.raises(DataError, match="a faiss IndexIDMap, not one of the inner-product kinds flat, ivf, hnsw"):
        load_index(path, dim=16, rows=np.arange(10), sha256=sha256)
    bare = faiss.IndexFlatIP(16)
    bare.add(vectors(10))
    path, sha256 = saved(tmp_path, bare, "bare.faiss")
    with pytest.raises(DataError, match="a faiss IndexFlatIP, not one of the inner-product kinds"):
        load_index(path, dim=16, rows=np.arange(10), sha256=sha256)
