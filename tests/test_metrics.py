"""Metric names and top-k hits: masked slots never count, and the counts stay on the logits' device."""

from __future__ import annotations

import torch

from pipeline import metrics as m


def test_top1_and_top5_hits_count_each_sample_once():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: 5th of 6, a top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: last, no hit
        ]
    )
    hits = m.topk_hits(logits, torch.tensor([0, 1, 5]))
    assert hits.tolist() == [1, 2]


def test_masked_slots_are_never_hits():
    logits = torch.eye(3)
    assert m.topk_hits(logits, torch.tensor([0, -1, 2])).tolist() == [2, 2]


def test_fewer_classes_than_k_means_every_label_is_a_top_k_hit():
    logits = torch.randn(4, 3)
    assert m.topk_hits(logits, torch.tensor([0, 1, 2, 0])).tolist()[1] == 4


def test_selection_maximises_val_top1_and_names_are_distinct():
    assert (m.SELECTION_METRIC, m.SELECTION_MODE) == (m.VAL_TOP1, "max")
    names = [
        value
        for key, value in vars(m).items()
        if key.isupper() and not key.startswith("SELECTION") and isinstance(value, str) and "/" in value
    ]
    assert len(names) == len(set(names))
