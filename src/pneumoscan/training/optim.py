"""The optimizer and learning-rate schedule of a run (``cfg.optim``)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer (``cfg.optim``), without weight decay on biases and norm parameters.

    Args:
        cfg: the run configuration.
        model: the (unwrapped) model.
    """
    o = cfg.optim
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.Adam(groups, lr=o.lr)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule: reduce-on-plateau, cosine with linear warm-up, or none.

    Args:
        cfg: the run configuration.
        optimizer: the optimizer it drives.
    """
    o = cfg.optim
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=o.plateau_factor, patience=o.plateau_patience)
    if o.scheduler == "cosine":
        warm, total = o.warmup_epochs, cfg.epochs

        def f(e: int) -> float:  # e = epochs completed
            if e < warm:
                return (e + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * min(e - warm, total - warm) / max(total - warm, 1)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    return None
