"""How good learned features are, measured exactly: weighted k-NN classification and retrieval metrics.

- k-NN top-1: each query's k most similar gallery items vote for their class with weight exp(similarity / T)
  (cosine similarity, k = 20, T = 0.07: the protocol of Wu et al. 2018 that DINO popularised).
- recall@k: the share of queries with at least one same-class item among their k nearest (queries whose class
  has no other item are left out: they could never score).
- mAP@R (Musgrave et al. 2020): for a query whose class has R other items, the mean over its R nearest of the
  precision at each same-class hit, divided by R. Unlike recall@k it does not flatter a data set with few classes.

Search is exact brute force (chunked matrix products), so the figures never depend on an approximate index.
Plain PyTorch; `distributed_knn_top1` uses `torch.distributed` when a process group exists.

    neighbours = nearest(queries, gallery, k=20)
    top1 = knn_top1(neighbours, gallery_labels, query_labels, num_classes)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from pipeline.errors import DataError

KNN_K = 20
KNN_TEMPERATURE = 0.07
RECALL_AT = (1, 5, 10)
_CHUNK = 1024  # queries per matrix product: bounds memory at chunk x gallery floats


class Neighbours(NamedTuple):
    similarity: torch.Tensor  # (queries, k) float32, most similar first
    index: torch.Tensor  # (queries, k) int64, rows of the gallery


def nearest(queries: torch.Tensor, gallery: torch.Tensor, k: int, leave_one_out: bool = False) -> Neighbours:
    """The `k` most similar gallery rows per query (inner product of unit vectors = cosine similarity).

    `leave_one_out`: queries are the gallery itself, and nobody is their own neighbour.
    """
    if gallery.shape[0] == 0:
        raise DataError("the gallery has no samples: nothing to search")
    k = min(k, gallery.shape[0] - (1 if leave_one_out else 0))
    similarities, indices = [], []
    for start in range(0, queries.shape[0], _CHUNK):
        scores = queries[start : start + _CHUNK].float() @ gallery.float().T
        if leave_one_out:
            rows = torch.arange(scores.shape[0])
            scores[rows, rows + start] = float("-inf")
        top = scores.topk(k, dim=1)
        similarities.append(top.values)
        indices.append(top.indices)
    return Neighbours(torch.cat(similarities), torch.cat(indices))


def knn_scores(
    similarity: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = KNN_TEMPERATURE
) -> torch.Tensor:
    """(queries, classes) vote totals of the weighted k-NN classifier."""
    votes = torch.zeros(similarity.shape[0], num_classes, dtype=torch.float32)
    return votes.scatter_add_(1, neighbour_labels, (similarity.float() / temperature).exp())


def knn_top1(
    neighbours: Neighbours,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Percent of queries whose weighted k-NN vote is their own class."""
    similarity, index = neighbours.similarity[:, :k], neighbours.index[:, :k]
    predicted = knn_scores(similarity, gallery_labels[index], num_classes, temperature).argmax(dim=1)
    return 100.0 * float((predicted == query_labels).float().mean())


def retrieval_metrics(
    features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = RECALL_AT
) -> dict[str, float]:
    """recall@k (percent) for each k and mAP@R (percent), leave-one-out within one labelled set."""
    if features.shape[0] < 2:
        raise DataError(f"retrieval metrics need at least 2 samples, got {features.shape[0]}")
    counts = torch.bincount(labels)
    others = counts[labels] - 1  # R per query: same-class items besides itself
    neighbours = nearest(features, features, max(max(ks), int(others.max())), leave_one_out=True)
    scored = others > 0  # a class with a single item has nothing to retrieve: not a query
    if not bool(scored.any()):
        raise DataError("retrieval metrics need a class with at least 2 samples")
    hits = labels[neighbours.index] == labels.unsqueeze(1)  # (queries, depth) bool
    results = {f"recall_at_{k}": 100.0 * float(hits[scored, :k].any(dim=1).float().mean()) for k in ks}
    depth = torch.arange(1, hits.shape[1] + 1)
    within_r = depth.unsqueeze(0) <= others.unsqueeze(1)
    relevant = hits & within_r
    precision = relevant.cumsum(dim=1) / depth
    average_precision = (precision * relevant).sum(dim=1) / others.clamp(min=1)
    results["map_at_r"] = 100.0 * float(average_precision[scored].mean())
    return results


def distributed_knn_top1(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    num_classes: int,
    world_size: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    device: torch.device | None = None,
) -> float:
    """Exact k-NN top-1 when each rank holds a share of the gallery and of the queries.

    The (small) query set is gathered onto every rank; each rank finds the k best of its own gallery share; the
    per-rank candidates are gathered and merged, so no rank ever holds the whole gallery. `device`: where the
    collectives run (NCCL needs the rank's GPU).
    """
    gathering = world_size > 1 and dist.is_initialized()
    device = device or torch.device("cpu")
    if gathering:
        queries, query_labels = _gather(queries, 0, device), _gather(query_labels, 0, device)
    if gallery.shape[0]:
        local = nearest(queries, gallery, k)
        similarity, labels = local.similarity, gallery_labels[local.index]
    else:  # a rank whose gallery share is empty offers no candidates
        similarity = torch.empty(queries.shape[0], 0)
        labels = torch.empty(queries.shape[0], 0, dtype=torch.int64)
    if gathering:
        similarity, labels = _gather(similarity, 1, device), _gather(labels, 1, device)
    if similarity.shape[1] == 0:
        raise DataError("the k-NN gallery has no samples: nothing to search")
    best = similarity.topk(min(k, similarity.shape[1]), dim=1)
    predicted = knn_scores(best.values, labels.gather(1, best.indices), num_classes, temperature).argmax(dim=1)
    return 100.0 * float((predicted == query_labels).float().mean())


def _gather(tensor: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's tensor along `dim` (sizes may differ along it); the result is on the CPU."""
    size = torch.tensor([tensor.shape[dim]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded_shape = list(tensor.shape)
    padded_shape[dim] = longest
    padded = torch.zeros(padded_shape, dtype=tensor.dtype, device=device)
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part.narrow(dim, 0, int(n)).cpu() for part, n in zip(parts, sizes)], dim=dim)
