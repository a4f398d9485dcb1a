"""Optimiser and learning-rate schedule from the config.

Learning-rate rule (Goyal et al. 2017, "linear scaling"): for SGD, `optim.lr` is the rate per 256
images and the rate used is lr x global_batch / 256, so changing the worker count or batch keeps the
recipe. AdamW takes `optim.lr` as the rate used. Warmup ramps linearly from 0 to that rate.
"""

from __future__ import annotations

import math

import torch

from pipeline.config import OptimConfig

REFERENCE_BATCH = 256


def scaled_lr(optim: OptimConfig) -> float:
    if optim.optimizer == "sgd":
        return optim.lr * optim.batch_size / REFERENCE_BATCH
    return optim.lr


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    # Weight decay on BatchNorm scales and biases only shrinks them without regularising anything.
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr = scaled_lr(optim)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A multiplier of the base rate, stepped once per iteration (not per epoch)."""
    warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
    total_steps = optim.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if optim.schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return optim.step_gamma ** (step // (optim.step_epochs * steps_per_epoch))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
