"""The retrieval benchmark's parts (pipeline/bench/retrieval.py): options checked before any work, the clustered
synthetic gallery, and the index comparison's recall against exact search. No timing is asserted; the full
benchmark is run by hand (`imagenet-pipeline bench-retrieval`)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.bench.retrieval import QUERIES, _clustered, index_benchmark, run_retrieval_benchmark
from pipeline.errors import BenchmarkError


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"only": "faiss"}, "--only 'faiss': choose embed, knn or index"),
        ({"only": "index", "kinds": ("flat", "lsh")}, "--kinds 'flat,lsh': choose from flat, ivf, hnsw"),
        ({"only": "index", "kinds": ()}, "--kinds '': choose from flat, ivf, hnsw"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, arguments, named):
    options = {"images": 8, "rounds": 1, "galleries": [(100, 8)], **arguments}
    with pytest.raises(BenchmarkError, match=re.escape(named)):
        run_retrieval_benchmark(tmp_path / "work", **options)
    assert not (tmp_path / "work").exists()


def test_the_synthetic_gallery_and_queries_are_unit_rows_drawn_around_shared_centres():
    gallery, queries = _clustered(3000, 16)
    assert gallery.shape == (3000, 16) and queries.shape == (QUERIES, 16)
    assert gallery.dtype == queries.dtype == np.float32
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    # Clustered, not uniform: a query's nearest gallery row is far closer than a random row is.
    nearest = (queries[:100] @ gallery.T).max(axis=1)
    assert nearest.mean() > 0.5 > abs(float((queries[:100] @ gallery[:100].T).mean()))
    again, _ = _clustered(3000, 16)
    assert np.array_equal(again, gallery)  # seeded: every run measures the same gallery


def test_exact_search_has_recall_one_and_every_kind_is_reported(capsys):
    index_benchmark(2000, 8, 1, ("flat", "hnsw"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("faiss, 2,000 x 8 gallery, 1000 queries, k = 10, 1 rounds")
    recalls = {line.split()[0]: float(line.rsplit(" ", 1)[-1]) for line in lines if "recall@10" in line}
    assert set(recalls) == {"flat", "hnsw"}
    assert recalls["flat"] == 1.0 and 0.5 < recalls["hnsw"] <= 1.0
