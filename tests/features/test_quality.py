"""k-NN and retrieval metrics: exact, hand-checked, and able to tell learned features from noise."""

from pathlib import Path

import pytest
import torch

from pipeline.errors import DataError
from pipeline.features.quality import distributed_knn_top1, knn_top1, nearest, retrieval_metrics


def unit(rows) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def clusters(num_classes: int, per_class: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 32, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + noise * torch.randn(len(labels), 32, generator=generator)
    return torch.nn.functional.normalize(points, dim=1), labels


def test_leave_one_out_never_returns_the_query_itself():
    features, _ = clusters(3, 5, 0.1)
    neighbours = nearest(features, features, k=4, leave_one_out=True)
    assert not (neighbours.index == torch.arange(15).unsqueeze(1)).any()
    assert (neighbours.similarity[:, :-1] >= neighbours.similarity[:, 1:]).all()  # best first


def test_map_at_r_and_recall_on_a_hand_checked_example():
    # Class 0: a, b, c; class 1: d. On the circle: a=0°, b=8°, d=20°, c=90°.
    import math

    angles = [0, 8, 90, 20]
    features = unit([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    labels = torch.tensor([0, 0, 0, 1])
    metrics = retrieval_metrics(features, labels, ks=(1, 2))
    # a: R=2, neighbours b(+), d(-) -> AP@R = (1/1)/2 = 0.5;  b: a(+), d(-) -> 0.5
    # c: neighbours by angle d(70°,-), b(80°,+) -> precision at 2 = 1/2 -> AP@R = 0.5/2 = 0.25; d has R=0, not scored
    assert metrics["map_at_r"] == pytest.approx(100 * (0.5 + 0.5 + 0.25) / 3)
    # recall@1: a->b yes, b->a yes, c->d no; d's class has no other member, so d is not a query
    assert metrics["recall_at_1"] == pytest.approx(200 / 3)
    assert metrics["recall_at_2"] == pytest.approx(100.0)


def test_clustered_features_score_high_and_random_ones_score_about_chance():
    features, labels = clusters(8, 30, noise=0.3)
    good = retrieval_metrics(features, labels)
    assert good["recall_at_1"] > 95 and good["map_at_r"] > 90
    noise = torch.nn.functional.normalize(torch.randn(240, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    bad = retrieval_metrics(noise, labels)
    assert bad["recall_at_1"] < 30 and bad["map_at_r"] < 25  # chance: 1/8 = 12.5 %
    gallery, gallery_labels = features[::2], labels[::2]
    queries, query_labels = features[1::2], labels[1::2]
    assert knn_top1(nearest(queries, gallery, 20), gallery_labels, query_labels, 8) > 95
    assert knn_top1(nearest(noise[1::2], noise[::2], 20), gallery_labels, query_labels, 8) < 35


def test_weighted_votes_let_close_neighbours_outvote_many_far_ones():
    queries = unit([[1.0, 0.0]])
    gallery = unit([[1.0, 0.05], [0.2, 1.0], [0.25, 1.0], [0.3, 1.0]])  # one close class-0, three far class-1
    labels = torch.tensor([0, 1, 1, 1])
    assert knn_top1(nearest(queries, gallery, 4), labels, torch.tensor([0]), 2, k=4) == 100.0
    # At a high temperature every vote weighs about the same and the majority wins.
    assert knn_top1(nearest(queries, gallery, 4), labels, torch.tensor([0]), 2, k=4, temperature=100.0) == 0.0


def test_an_empty_gallery_is_an_error():
    with pytest.raises(DataError, match="the gallery has no samples"):
        nearest(unit([[1.0, 0.0]]), torch.empty(0, 2), 5)


def _rank(rank: int, init_file: str, results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        features, labels = clusters(5, 20, noise=3.0)
        gallery, gallery_labels = features[::2], labels[::2]
        queries, query_labels = features[1::2], labels[1::2]
        # Uneven shares on purpose: rank 0 holds 30 gallery rows and 20 queries, rank 1 the rest.
        cut_gallery, cut_queries = (slice(0, 30), slice(0, 20)) if rank == 0 else (slice(30, None), slice(20, None))
        top1 = distributed_knn_top1(
            queries[cut_queries],
            query_labels[cut_queries],
            gallery[cut_gallery],
            gallery_labels[cut_gallery],
            5,
            world_size=2,
        )
        torch.save(top1, Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_knn_equals_the_single_process_figure(tmp_path):
    import torch.multiprocessing as mp

    features, labels = clusters(5, 20, noise=3.0)
    expected = knn_top1(nearest(features[1::2], features[::2], 20), labels[::2], labels[1::2], 5)
    assert 25 < expected < 100  # noisy enough that a merging mistake would show
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)] == [pytest.approx(expected)] * 2
