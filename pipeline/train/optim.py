"""Optimiser and learning-rate schedule from the config.

Learning-rate rule (Goyal et al. 2017, "linear scaling"): for SGD, `optim.lr` is the rate per 256
images and the rate used is lr x global_batch / 256, so changing the worker count or batch keeps the
recipe. AdamW takes `optim.lr` as the rate used. Warmup ramps linearly from 0 to that rate.

Schedules: `cosine` and `step` are functions of the iteration and advance after every optimiser step;
`plateau` (AlexNet 2012: "divide the learning rate by 10 when the validation error rate stopped improving")
advances once per epoch, after validation, on val top-1. The train loop calls `step_after_iteration` and
`step_after_validation` and each does nothing for the schedules it does not drive.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from pipeline import metrics as m
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


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int) -> LRScheduler:
    """Cosine and step: a multiplier of the base rate per iteration (not per epoch). Plateau: per epoch."""
    if optim.schedule == "plateau":
        # Our plateau_patience counts epochs without improvement up to and including the one that divides
        # (as optim.patience does for early stopping); torch's patience counts the epochs it tolerates first.
        # threshold 0 in "abs" mode: any higher val top-1 is an improvement, the rule early stopping uses.
        # optim.min_lr is in optim.lr's units (per 256 images for SGD), so it scales by the same factor.
        return ReduceLROnPlateau(
            optimizer,
            mode=m.SELECTION_MODE,
            factor=optim.step_gamma,
            patience=optim.plateau_patience - 1,
            threshold=0.0,
            threshold_mode="abs",
            min_lr=optim.min_lr * scaled_lr(optim) / optim.lr,
        )
    warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
    total_steps = optim.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if optim.schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return optim.step_gamma ** (step // (optim.step_epochs * steps_per_epoch))

    return LambdaLR(optimizer, factor)


def step_after_iteration(scheduler: LRScheduler) -> None:
    """After every optimiser step: cosine and step advance; plateau waits for the epoch's validation."""
    if not isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step()


def step_after_validation(scheduler: LRScheduler, val_metrics: dict[str, float]) -> None:
    """After each epoch's validation: plateau compares val top-1 with its best and divides when it is stuck.

    Every rank passes the same all-reduced val top-1, so the ranks' rates stay equal without communication. A
    refit has no validation (empty `val_metrics`); the config allows it no plateau schedule, so nothing steps.
    """
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_metrics[m.SELECTION_METRIC])
