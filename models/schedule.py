"""Learning-rate schedules: the rate for a step as a pure function of where training
stands (epoch, step), so a run resumed from a checkpoint follows the same curve."""

from __future__ import annotations

import math

from models.config import TrainConfig


def iwae_stage(epoch: int) -> int:
    """The stage i of 0-based `epoch`: stages 0..i-1 end at epoch (3^i - 1) / 2."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    stage = 0
    while (3 ** (stage + 1) - 1) // 2 <= epoch:
        stage += 1
    return stage


def iwae_epochs(stages: int) -> int:
    """Epochs in stages 0..stages-1: (3^stages - 1) / 2 (8 stages: 3,280 epochs)."""
    return (3 ** stages - 1) // 2


def learning_rate(cfg: TrainConfig, epoch: int, step: int, total_steps: int) -> float:
    """The rate for the step about to run: `step` (0-based, of `total_steps`) in 0-based
    `epoch`."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        done = min(1.0, step / max(1, total_steps - 1))
        return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * done)))
    if cfg.lr_schedule == "step":
        passed = sum(1 for m in cfg.lr_milestones if epoch >= m)
        return cfg.lr * cfg.lr_gamma ** passed
    if cfg.lr_schedule == "iwae":
        return cfg.lr * 10.0 ** (-iwae_stage(epoch) / 7)
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")
