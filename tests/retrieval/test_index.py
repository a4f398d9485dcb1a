"""The faiss gallery: exact by default, approximate kinds close to it, ids are embedding rows."""

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.retrieval.index import IndexSettings, build_index, load_index, save_index, search


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


def test_a_saved_index_loads_back_and_a_mismatched_one_is_refused(tmp_path):
    gallery = vectors(50)
    save_index(build_index(gallery, IndexSettings()), tmp_path / "index.faiss")
    loaded = load_index(tmp_path / "index.faiss", dim=16, rows=50)
    assert np.array_equal(search(loaded, gallery[:3], 1)[1][:, 0], [0, 1, 2])
    with pytest.raises(DataError, match=r"index of 50 x 16, but its embeddings are 50 x 32"):
        load_index(tmp_path / "index.faiss", dim=32, rows=50)
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(DataError, match="not a faiss index"):
        load_index(tmp_path / "junk.faiss", dim=16, rows=50)
    with pytest.raises(DataError, match="the gallery is empty"):
        build_index(np.zeros((0, 16), dtype=np.float32), IndexSettings())
