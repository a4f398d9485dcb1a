"""The gallery index: faiss over unit-length embeddings, inner product = cosine similarity.

- `flat` (default): exact search, every query compared with every gallery row. Right up to a few hundred
  thousand rows; the k-NN and retrieval metrics always use exact search.
- `ivf`: an inverted file with `nlist` coarse clusters, `nprobe` of them searched per query. For galleries the
  size of ImageNet train (1.28 M x 2048) where exact search costs too much per query.
- `hnsw`: a navigable small-world graph (`M` links per node); no training pass, more memory than ivf.

    index = build_index(vectors, IndexSettings(kind="flat"))
    similarity, rows = search(index, queries, k=10)

`pipeline bench-retrieval` measures latency and the recall of the approximate kinds against exact search.

The file is read back with faiss's own reader (plain arrays, no pickle), and only after its sha256 matches the one
`embed` recorded in meta.json: faiss's parser is not meant for hostile input. What it read is then used only if it
is a kind `build_index` makes (inner product, ids kept by faiss in memory), of the embeddings' width, answering
with exactly the gallery's readable rows: an index whose ids point past the rows, or at an unreadable one, is
refused rather than searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.manifest import file_sha256
from pipeline.errors import DataError

INDEX_FILE = "index.faiss"
INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "flat"
    nlist: int | None = None  # ivf clusters; None: 4 * sqrt(rows), at most rows / 39 (faiss's k-means minimum)
    nprobe: int = 16  # ivf clusters searched per query
    hnsw_m: int = 32  # hnsw links per node
    hnsw_ef_search: int = 128  # hnsw candidates kept while searching


def build_index(vectors: np.ndarray, settings: IndexSettings, rows: np.ndarray | None = None):
    """An index over `vectors` whose search answers with `rows` (default 0..n-1): the embedding rows they came
    from, so unreadable samples can be left out of the gallery without renumbering."""
    import faiss

    if settings.kind not in INDEX_KINDS:
        raise DataError(f"index kind {settings.kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise DataError(f"cannot index {vectors.shape[0] if vectors.ndim == 2 else 0} vectors: the gallery is empty")
    count, dim = vectors.shape
    ids = np.arange(count, dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    if settings.kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    elif settings.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efSearch = settings.hnsw_ef_search
        index = faiss.IndexIDMap(graph)
    else:
        nlist = settings.nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
        nlist = min(nlist, count)  # k-means needs at least one row per cluster
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample of 64 rows per cluster (faiss's default is 256; it advises 39 or more): at ImageNet
        # train's 1.28 M x 2048 training on every row costs more than adding them all, for no measurable recall.
        index.cp.max_points_per_centroid = 64
        index.train(vectors)
        index.nprobe = min(settings.nprobe, nlist)
    index.add_with_ids(vectors, ids)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, row) arrays of shape (queries, k), best first; rows are the ids given to `build_index`."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def save_index(index, path: Path) -> str:
    """Write the index; return the file's sha256, which `load_index` will ask for."""
    import faiss

    faiss.write_index(index, str(path))
    return file_sha256(path)


def load_index(path: Path, dim: int, rows: np.ndarray, sha256: str):
    """The index at `path`, read by faiss only if the file's sha256 is `sha256`, and returned only if it is a kind
    `build_index` makes, `dim` wide, and answers with exactly `rows` (the gallery's readable rows, ascending)."""
    import faiss

    if not path.is_file():
        raise DataError(f"{path}: no gallery index; run `imagenet-pipeline embed` for this split")
    found = file_sha256(path)
    if found != sha256:
        raise DataError(
            f"{path}: sha256 {found[:16]}..., but meta.json records {sha256[:16]}...: not the index "
            "embed built for these rows; embed the split again"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: not a faiss index ({str(error).splitlines()[0][:200]})") from None
    ids = _stored_ids(index)
    if ids is None:
        raise DataError(
            f"{path}: a faiss {type(index).__name__}, not one of the inner-product kinds "
            f"{', '.join(INDEX_KINDS)} that embed builds"
        )
    if index.d != dim or index.ntotal != rows.size:
        raise DataError(
            f"{path}: index of {index.ntotal} x {index.d}, but its embeddings have {rows.size} readable "
            f"rows of width {dim}; embed the split again"
        )
    ids.sort()
    if not np.array_equal(ids, rows):
        unknown = np.setdiff1d(ids, rows)
        if unknown.size:
            raise DataError(
                f"{path}: the index answers with row {unknown[0]}, which is not one of the gallery's "
                f"{rows.size} readable rows (labels.npy); embed the split again"
            )
        raise DataError(
            f"{path}: readable row {np.setdiff1d(rows, ids)[0]} is not in the index (another is in "
            "it twice); embed the split again"
        )
    return index


def _stored_ids(index) -> np.ndarray | None:
    """The row ids a `build_index` kind answers with, or None for any other kind of index."""
    import faiss

    inner_product = faiss.METRIC_INNER_PRODUCT
    if type(index) is faiss.IndexIDMap:
        inner = faiss.downcast_index(index.index)
        if (
            type(inner) not in (faiss.IndexFlatIP, faiss.IndexHNSWFlat)
            or inner.metric_type != inner_product
            or index.metric_type != inner_product
            or inner.ntotal != index.ntotal
        ):
            return None
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if type(index) is faiss.IndexIVFFlat and index.metric_type == inner_product:
        lists = faiss.downcast_InvertedLists(index.invlists)
        if type(lists) is not faiss.ArrayInvertedLists:  # embed keeps the lists in the file, never on disk elsewhere
            return None
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
            for number in range(index.nlist)
            if lists.list_size(number)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return None
