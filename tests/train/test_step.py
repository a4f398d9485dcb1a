"""The pure-PyTorch step: masked samples never become a score or a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loader import IGNORE_LABEL, Batch
from pipeline.data.transforms import normalize_batch
from pipeline.errors import DataError
from pipeline.train.step import RankDevice, Trainee, check_corrupt_share, evaluate, grad_scaler, train_one_epoch
from tests.conftest import write_split

RANK = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)


class ListLoader:
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def batch(labels: list[int], corrupt: int = 0) -> Batch:
    return Batch(
        torch.randint(0, 255, (len(labels), 3, 8, 8), dtype=torch.uint8),
        torch.tensor(labels),
        [""] * len(labels),
        (0,) * corrupt,
    )


def model(size: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 4))


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
    metrics = train_one_epoch(
        Trainee(net, optimizer, scheduler, grad_scaler(RANK)),
        ListLoader([batch([IGNORE_LABEL] * 4, corrupt=4)]),
        config,
        RANK,
    )
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert metrics["train/corrupt_samples"] == 4 and metrics["train/loss"] == 0.0

    # A mixed batch still learns, and its loss is the mean over its valid samples only.
    metrics = train_one_epoch(
        Trainee(net, optimizer, scheduler, grad_scaler(RANK)),
        ListLoader([batch([0, IGNORE_LABEL, 1, 2])]),
        config,
        RANK,
    )
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_a_corrupt_share_above_the_limit_stops_the_run_naming_the_bad_shards(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data.loader import build_loader

    write_split(tmp_path / "val", [6, 6, 6])
    (tmp_path / "val" / "val-000001.tar").write_bytes(b"")  # unreadable: its 6 samples are masked
    data = DataConfig(root=tmp_path, loader_workers=0, eval_image_size=16, train_image_size=16)
    loader = build_loader(data, "val", rank=0, world_size=1, batch_size=4, seed=0)
    metrics = {"epoch": 3, **evaluate(model(size=16), loader, RANK, prefix="val")}
    assert metrics["val/corrupt_samples"] == 6
    check_corrupt_share(metrics, 0.5, {"val": loader}, RANK)  # a third is within a limit of a half
    with pytest.raises(
        DataError,
        match=r"epoch 3: 6 of 18 val samples \(33.33%\) could not be read .* "
        r"bad shards: val-000001.tar \(6\)",
    ):
        check_corrupt_share(metrics, 0.001, {"val": loader}, RANK)


def _ddp_rank(rank: int, init_file: str, labels_by_rank: list[list[int]], results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        config = load_config(overrides=["optim.optimizer=sgd", "scaling.num_workers=0"])
        net = torch.nn.parallel.DistributedDataParallel(model())
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        torch.manual_seed(7 + rank)
        worker = RankDevice(
            rank=rank, world_size=2, device=torch.device("cpu"), autocast_dtype=None, channels_last=False
        )
        loader = ListLoader([batch(labels_by_rank[rank])])
        train_one_epoch(Trainee(net, optimizer, scheduler, grad_scaler(worker)), loader, config, worker)
        weights = [p.detach().clone() for p in net.module.parameters()]
        torch.save((weights, loader.batches[0].images), Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_step(tmp_path, labels_by_rank):
    import torch.multiprocessing as mp

    tmp_path.mkdir()
    # Results come back as files: a multiprocessing Manager would fork this process, Ray's threads included.
    mp.spawn(_ddp_rank, args=(str(tmp_path / "init"), labels_by_rank, str(tmp_path)), nprocs=2)
    return {rank: torch.load(tmp_path / f"{rank}.pt") for rank in range(2)}


def test_ddp_steps_on_the_exact_mean_over_valid_samples_and_not_at_all_when_all_are_masked(tmp_path):
    """Masked slots unevenly spread over two ranks: the step is the one a single process takes on the valid
    samples alone; a global batch with no valid sample leaves every weight (and momentum) untouched."""
    masked = IGNORE_LABEL
    results = _ddp_step(tmp_path / "mixed", [[masked, masked, masked, masked], [0, 1, masked, 3]])
    (weights0, _), (weights1, images1) = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(weights0, weights1))

    single = model()  # the same initial weights, one process, the valid samples only
    optimizer = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    loss = torch.nn.functional.cross_entropy(
        single(normalize_batch(images1[[0, 1, 3]], "cpu")), torch.tensor([0, 1, 3])
    )
    loss.backward()
    optimizer.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights0, single.parameters()))

    results = _ddp_step(tmp_path / "masked", [[masked] * 4, [masked] * 4])
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], model().parameters()))


def _buffer_rank(rank: int, init_file: str, results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from pipeline.train.step import broadcast_buffers_from_rank0

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        net.train()(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(rank)))  # per-rank statistics
        before = net[1].running_mean.clone()
        worker = RankDevice(
            rank=rank, world_size=2, device=torch.device("cpu"), autocast_dtype=None, channels_last=False
        )
        broadcast_buffers_from_rank0(net, worker)
        torch.save((before, net[1].running_mean.clone()), Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_evaluates_with_rank_0s_batchnorm_statistics(tmp_path):
    """Rank 0's buffers are the saved ones, so the val score every rank computes is the checkpoint's score."""
    import torch.multiprocessing as mp

    mp.spawn(_buffer_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    (before0, after0), (before1, after1) = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert not torch.equal(before0, before1)  # they had drifted apart
    assert torch.equal(after0, before0) and torch.equal(after1, before0)


def _per_step_accounting(net, loader, optimizer, device="cpu"):
    """The accounting the step had before it kept its sums on the device: a `.item()` per step."""
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction="sum")
    totals = torch.zeros(3, dtype=torch.float64)
    for data in loader:
        images, labels = normalize_batch(data.images, device), data.labels.to(device)
        valid = int((labels != IGNORE_LABEL).sum())
        if not valid:
            totals[2] += data.corrupt
            continue
        loss = criterion(net(images), labels) * (1 / valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.tensor([loss.item() * valid / 1, valid, data.corrupt], dtype=torch.float64)
    return totals.tolist()


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_device_side_sums_report_exactly_what_per_step_reads_did(device):
    torch.manual_seed(1)
    loader = ListLoader(
        [
            batch([0, 1, 2, 3]),
            batch([1, IGNORE_LABEL, 3, 0], corrupt=1),
            batch([IGNORE_LABEL] * 4, corrupt=4),
            batch([2, 2, 1, 0]),
        ]
    )
    config = load_config(overrides=["optim.weight_decay=0.0", "scaling.num_workers=0"])
    rank = RankDevice(rank=0, world_size=1, device=torch.device(device), autocast_dtype=None, channels_last=False)
    nets, optimizers = [model().to(device), model().to(device)], []
    for net in nets:
        optimizers.append(torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9))
    loss_sum, valid, corrupt = _per_step_accounting(nets[0], loader, optimizers[0], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizers[1], lambda step: 1.0)
    seen = []
    metrics = train_one_epoch(
        Trainee(nets[1], optimizers[1], scheduler, grad_scaler(rank)),
        loader,
        config,
        rank,
        on_step=lambda step, loss, lr, images: seen.append((step, loss, images)),
    )
    assert metrics["train/loss"] == loss_sum / valid  # bit for bit: the same float64 sums in the same order
    assert metrics["train/corrupt_samples"] == corrupt == 5
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    # The hook gets device tensors, read only if it chooses; no step was made for the all-masked batch.
    assert [(step, images) for step, _, images in seen] == [(1, 4), (2, 3), (4, 4)]
    assert all(isinstance(loss, torch.Tensor) and loss.dtype == torch.float64 for _, loss, _ in seen)


def test_the_evaluation_pass_sums_on_the_device_what_it_counted_per_batch():
    torch.manual_seed(2)
    loader = ListLoader(
        [
            batch([0, 1, 2, 3]),
            batch([1, IGNORE_LABEL, 3, IGNORE_LABEL], corrupt=1),
            batch([IGNORE_LABEL] * 2, corrupt=2),
        ]
    )
    net = model()
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction="sum")
    loss_sum = top1 = top5 = valid = 0
    with torch.no_grad():
        for data in loader:
            logits = net(normalize_batch(data.images, "cpu"))
            keep = data.labels >= 0
            valid += int(keep.sum())
            if keep.any():
                loss_sum += criterion(logits, data.labels).item()
                ranked = logits[keep].topk(4, dim=1).indices.eq(data.labels[keep].unsqueeze(1))
                top1 += int(ranked[:, :1].any(dim=1).sum())
                top5 += int(ranked.any(dim=1).sum())
    scores = evaluate(net, loader, RANK, prefix="val")
    assert scores["val/loss"] == pytest.approx(loss_sum / valid, rel=1e-6)
    assert (scores["val/top1"], scores["val/top5"]) == (100.0 * top1 / valid, 100.0 * top5 / valid)
    assert scores["val/corrupt_samples"] == 3 and valid == 6


@pytest.mark.slow
def test_a_compiled_model_trains_the_same_epoch_as_the_eager_one():
    """scaling.compile on CPU (inductor; needs a C++ compiler, which .ci/run installs when absent)."""
    from pipeline.train.step import unwrap

    loader = ListLoader([batch([0, 1, 2, 3]), batch([1, IGNORE_LABEL, 3, 0], corrupt=1), batch([2, 2, 1, 0])])
    config = load_config(overrides=["optim.weight_decay=0.0", "scaling.num_workers=0"])
    results = []
    for compiled in (False, True):
        net = model()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        runner = torch.compile(net) if compiled else net
        metrics = train_one_epoch(Trainee(runner, optimizer, scheduler, grad_scaler(RANK)), loader, config, RANK)
        assert unwrap(runner) is net  # checkpoints and evaluation see the plain module
        results.append((metrics["train/loss"], [p.detach().clone() for p in net.parameters()]))
    (eager_loss, eager_weights), (compiled_loss, compiled_weights) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager_weights, compiled_weights))
