"""The pure-PyTorch step: masked samples never become a score or a step."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loader import IGNORE_LABEL, Batch
from pipeline.errors import DataError
from pipeline.train.checkpoints import TrainingState
from pipeline.train.step import RankDevice, evaluate, grad_scaler, train_one_epoch

RANK = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)


class ListLoader:
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def batch(labels: list[int], corrupt: int = 0) -> Batch:
    return Batch(torch.randint(0, 255, (len(labels), 3, 8, 8), dtype=torch.uint8), torch.tensor(labels),
                 torch.tensor(corrupt), [""] * len(labels))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


def test_a_validation_pass_with_no_readable_sample_is_an_error_not_a_zero_score():
    unreadable = ListLoader([batch([IGNORE_LABEL] * 4, corrupt=4), batch([IGNORE_LABEL] * 2, corrupt=2)])
    with pytest.raises(DataError, match="the val pass read no valid sample \\(6 corrupt or unreadable\\)"):
        evaluate(model(), unreadable, RANK, prefix="val")


def test_an_all_masked_train_batch_makes_no_step_and_no_nan():
    config = load_config(overrides=["optim.optimizer=sgd", "optim.weight_decay=0.1", "scaling.num_workers=0"])
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [parameter.detach().clone() for parameter in net.parameters()]
    metrics = train_one_epoch(net, ListLoader([batch([IGNORE_LABEL] * 4, corrupt=4)]), optimizer, scheduler,
                              grad_scaler(RANK), config, RANK, 0, TrainingState())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert metrics["train/corrupt_samples"] == 4 and metrics["train/loss"] == 0.0

    # A mixed batch still learns, and its loss is the mean over its valid samples only.
    metrics = train_one_epoch(net, ListLoader([batch([0, IGNORE_LABEL, 1, 2])]), optimizer, scheduler,
                              grad_scaler(RANK), config, RANK, 0, TrainingState())
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
