"""Training: the loop (:mod:`.loop`), ``fit`` and its run directory (:mod:`.engine`), runtime
choices (:mod:`.runtime`) and DDP helpers (:mod:`.distributed`). Checkpoints are
:class:`~pneumoscan.models.bundle.ModelBundle` files; calibration, the model card and plots
come after training, in :mod:`pneumoscan.workflows.train`."""
from __future__ import annotations

from .engine import fit
from .loop import evaluate, train_one_epoch

__all__ = ["evaluate", "fit", "train_one_epoch"]
