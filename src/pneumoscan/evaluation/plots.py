"""Plots (PNG, matplotlib Agg backend), written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..utils.io import atomic_path  # noqa: E402


def _save(fig: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Loss, accuracy and AUC per epoch (train vs validation)."""
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
    axes[0].set_title("loss (class-weighted BCE)")
    axes[1].plot(ep, [r["train_acc"] for r in history], "o-", label="train")
    axes[1].plot(ep, [r["val_acc"] for r in history], "o-", label="validation")
    axes[1].set_title("accuracy at 0.5")
    axes[2].plot(ep, [r["val_auc"] for r in history], "o-", color="C2", label="validation")
    axes[2].set_title("ROC-AUC")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
