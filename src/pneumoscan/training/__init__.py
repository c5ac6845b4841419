"""Training: the loop, checkpoints and distributed helpers."""
from __future__ import annotations

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .engine import evaluate, fit, train_one_epoch

__all__ = ["evaluate", "fit", "load_checkpoint", "model_from_checkpoint", "save_checkpoint", "train_one_epoch"]
