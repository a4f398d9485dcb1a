"""Learning-rate rule, parameter groups and schedules."""

import math

import pytest
import torch

from pipeline.config import OptimConfig
from pipeline.optim import build_optimizer, build_scheduler, scaled_lr


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
    optim = OptimConfig(lr=0.02, batch_size=128, epochs=6, schedule="step", step_epochs=2, step_gamma=0.1,
                        weight_decay=5e-4)
    rates = _rates(optim, steps_per_epoch=5)
    assert rates[0] == pytest.approx(0.01)  # 0.02 per 256 images at batch 128, the paper's 0.01
    assert rates[10] == pytest.approx(0.001) and rates[29] == pytest.approx(0.0001)
