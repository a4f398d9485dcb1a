"""Learning-rate rule, parameter groups and schedules."""

import math

import pytest
import torch

from pipeline import metrics as m
from pipeline.config import OptimConfig
from pipeline.train.checkpoints import TrainingState, load_checkpoint, save_checkpoint
from pipeline.train.optim import (
    build_optimizer,
    build_scheduler,
    scaled_lr,
    step_after_iteration,
    step_after_validation,
)


def test_sgd_rate_scales_linearly_with_the_global_batch_adamw_does_not():
    assert scaled_lr(OptimConfig(lr=0.1, batch_size=256)) == pytest.approx(0.1)
    assert scaled_lr(OptimConfig(lr=0.1, batch_size=1024)) == pytest.approx(0.4)
    assert scaled_lr(OptimConfig(optimizer="adamw", lr=1e-3, batch_size=1024)) == pytest.approx(1e-3)


def test_no_weight_decay_on_batchnorm_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=5e-4, nesterov=True))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2, 4}  # conv and linear weights only
    assert len(plain["params"]) == 4  # conv bias, BN weight and bias, linear bias
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9


def _rates(optim, steps_per_epoch):
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer(torch.nn.Linear(2, 2), optim)
    optimizer.param_groups[0]["params"] = [parameter]
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    rates = []
    for _ in range(optim.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_then_cosine_per_iteration():
    optim = OptimConfig(lr=0.256, batch_size=256, epochs=4, warmup_epochs=1, schedule="cosine")
    rates = _rates(optim, steps_per_epoch=10)
    assert rates[0] == pytest.approx(0.256 / 10)  # warmup starts small, not at zero
    assert rates[9] == pytest.approx(0.256)  # full rate at the end of warmup
    assert all(b <= a for a, b in zip(rates[10:], rates[11:]))  # cosine only goes down
    middle = 10 + 15
    assert rates[middle] == pytest.approx(0.256 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))


def test_step_decay_divides_by_ten_every_step_epochs_as_in_alexnet():
    optim = OptimConfig(
        lr=0.02, batch_size=128, epochs=6, schedule="step", step_epochs=2, step_gamma=0.1, weight_decay=5e-4
    )
    rates = _rates(optim, steps_per_epoch=5)
    assert rates[0] == pytest.approx(0.01)  # 0.02 per 256 images at batch 128, the paper's 0.01
    assert rates[10] == pytest.approx(0.001) and rates[29] == pytest.approx(0.0001)


def _plateau(**changes):
    # The paper's rate: 0.02 per 256 images is 0.01 at batch 128.
    optim = OptimConfig(
        **{"lr": 0.02, "batch_size": 128, "schedule": "plateau", "plateau_patience": 3, "weight_decay": 5e-4, **changes}
    )
    optimizer = build_optimizer(torch.nn.Linear(2, 2), optim)
    return optimizer, build_scheduler(optimizer, optim, steps_per_epoch=5)


def _epoch(optimizer, scheduler, val_top1):
    """One epoch as the train loop runs it; returns the rate the epoch trained with."""
    used = optimizer.param_groups[0]["lr"]
    for _ in range(5):
        optimizer.step()
        step_after_iteration(scheduler)
    step_after_validation(scheduler, {m.VAL_TOP1: val_top1})
    return used


def test_plateau_divides_by_ten_after_patience_epochs_without_a_new_best_and_not_before():
    optimizer, scheduler = _plateau()
    # Two new bests, then 2 epochs without one (a tie is no improvement): not yet.
    rates = [_epoch(optimizer, scheduler, top1) for top1 in [10.0, 20.0, 20.0, 19.0]]
    assert rates == pytest.approx([0.01] * 4) and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    # The 3rd epoch without one: the next epoch trains at a tenth.
    assert _epoch(optimizer, scheduler, 20.0) == pytest.approx(0.01)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    # Iterations never move it, and the count restarts after a division: 3 more flat epochs before the next.
    rates = [_epoch(optimizer, scheduler, top1) for top1 in [20.0, 20.0, 20.0, 20.0]]
    assert rates == pytest.approx([0.001, 0.001, 0.001, 0.0001])
    # An improvement resets the count.
    rates = [_epoch(optimizer, scheduler, top1) for top1 in [21.0, 21.0, 21.0, 22.0, 22.0, 22.0, 22.0]]
    assert rates == pytest.approx([0.0001] * 7)


def test_plateau_stops_at_min_lr_in_per_256_units():
    # min_lr 0.0002 per 256 images is 0.0001 at batch 128: two divisions, then no more.
    optimizer, scheduler = _plateau(plateau_patience=1, min_lr=0.0002)
    rates = [_epoch(optimizer, scheduler, 50.0) for _ in range(5)]
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.0001, 0.0001])


def test_plateau_state_round_trips_through_a_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    optim = OptimConfig(lr=0.02, batch_size=128, schedule="plateau", plateau_patience=2)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=5)
    for top1 in [30.0, 29.0, 29.0, 31.0, 30.0]:  # divided once; best 31, one epoch without a gain since
        _epoch(optimizer, scheduler, top1)
    save_checkpoint(
        tmp_path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        state=TrainingState(epoch=5),
        meta={},
    )

    restored_model = torch.nn.Linear(2, 2)
    restored_optimizer = build_optimizer(restored_model, optim)
    restored_scheduler = build_scheduler(restored_optimizer, optim, steps_per_epoch=5)
    load_checkpoint(tmp_path, model=restored_model, optimizer=restored_optimizer, scheduler=restored_scheduler)
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    assert restored_scheduler.state_dict() == scheduler.state_dict()
    # The restored schedule remembers best = 31 and the flat epoch: one more divides, as in the original.
    assert _epoch(restored_optimizer, restored_scheduler, 30.0) == pytest.approx(0.001)
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)
