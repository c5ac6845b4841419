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


# --------------------------------------------------------------------------- evaluation plots
_CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def plot_confusion_matrix(cm: Sequence[Sequence[int]], path: str | Path, threshold: float | None = None, title: str | None = None) -> None:
    """Confusion matrix (rows: true class, columns: predicted class) with counts and row shares.

    Args:
        cm: ``[[tn, fp], [fn, tp]]``.
        path: PNG file to write.
        threshold: the operating threshold, shown in the title.
        title: overrides the default title.
    """
    import numpy as np

    m = np.asarray(cm, dtype=float)
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(m[i, j])}\n({share[i, j]:.1%})", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=12)
    ax.set_xticks([0, 1], [f"pred {c}" for c in _CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true {c}" for c in _CLASS_NAMES], rotation=90, va="center")
    ax.set_title(title or (f"confusion matrix at threshold {threshold:.3f}" if threshold is not None else "confusion matrix"))
    fig.tight_layout()
    _save(fig, path)


def plot_roc(
    curves: Sequence[tuple[str, Any, Any]],
    path: str | Path,
    operating_points: Sequence[tuple[str, float, float]] = (),
    title: str = "ROC curve",
) -> None:
    """ROC curve(s), several models overlaid, with operating points marked.

    Args:
        curves: ``(name, labels, scores)`` per model; the legend shows the AUC.
        path: PNG file to write.
        operating_points: ``(label, false-positive rate, sensitivity)`` markers.
        title: plot title.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for i, (name, y, s) in enumerate(curves):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=f"C{i}", lw=1.8, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    _finish_curve_plot(fig, ax, path, operating_points, "1 - specificity (false-positive rate)",
                       "sensitivity (true-positive rate)", 1.01, title, "lower right")


def _finish_curve_plot(
    fig: Any, ax: Any, path: str | Path, operating_points: Sequence[tuple[str, float, float]],
    xlabel: str, ylabel: str, ymax: float, title: str, legend_loc: str,
) -> None:
    """Mark the operating points (the first filled), label, frame and save a ROC/PR plot."""
    for k, (label, x, y) in enumerate(operating_points):
        ax.plot([x], [y], marker="o" if k == 0 else "s", ms=8, mfc="none" if k else None, mew=2,
                color="crimson" if k == 0 else "black", ls="none", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, ymax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_precision_recall(
    curves: Sequence[tuple[str, Any, Any]],
    path: str | Path,
    operating_points: Sequence[tuple[str, float, float]] = (),
    title: str = "precision-recall curve",
) -> None:
    """Precision-recall curve(s) with the prevalence baseline and operating points.

    Args:
        curves: ``(name, labels, scores)`` per model; the legend shows the average precision.
        path: PNG file to write.
        operating_points: ``(label, recall, precision)`` markers.
        title: plot title.
    """
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    prevalence = None
    for i, (name, y, s) in enumerate(curves):
        prec, rec, _ = precision_recall_curve(y, s)
        ax.step(rec, prec, where="post", color=f"C{i}", lw=1.8, label=f"{name} (AP {average_precision_score(y, s):.3f})")
        prevalence = float(np.mean(y))
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence {prevalence:.2f}")
    _finish_curve_plot(fig, ax, path, operating_points, "recall (sensitivity)", "precision (PPV)", 1.03, title, "lower left")


def plot_reliability(
    series: Sequence[tuple[str, Any, Any]],
    path: str | Path,
    n_bins: int = 15,
    title: str = "reliability diagram",
) -> None:
    """Reliability diagram: observed PNEUMONIA rate per probability bin against the mean
    predicted probability, with a histogram of the predictions below.

    Args:
        series: ``(name, labels, probabilities)``, e.g. before and after temperature scaling.
        path: PNG file to write.
        n_bins: equal-width bins (those of the reported ECE).
        title: plot title.
    """
    import numpy as np

    from ..core.calibration import reliability_curve
    from ..core.metrics import expected_calibration_error

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.2, 6.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for i, (name, y, p) in enumerate(series):
        rc = reliability_curve(p, y, n_bins)
        ok = rc["count"] > 0
        ece = expected_calibration_error(y, p, n_bins)
        ax.plot(rc["mean_prob"][ok], rc["frac_pos"][ok], "o-", color=f"C{i}", label=f"{name} (ECE {ece:.3f})")
        centers = (rc["edges"][:-1] + rc["edges"][1:]) / 2
        axh.bar(centers + (i - (len(series) - 1) / 2) * 0.9 / n_bins / max(len(series), 1), rc["count"],
                width=0.9 / n_bins / max(len(series), 1), color=f"C{i}", alpha=0.8)
    ax.set_ylabel("observed PNEUMONIA rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    axh.set_xlabel("predicted probability of PNEUMONIA")
    axh.set_ylabel("images")
    axh.grid(alpha=0.3)
    axh.set_yscale("log" if np.max([np.max(reliability_curve(p, y, n_bins)["count"]) for _, y, p in series] or [1]) > 50 else "linear")
    fig.tight_layout()
    _save(fig, path)


def plot_error_grid(
    false_positives: Sequence[tuple[Any, str]],
    false_negatives: Sequence[tuple[Any, str]],
    path: str | Path,
    per_row: int = 6,
) -> None:
    """The most confident mistakes with their images: false positives in the first row,
    false negatives in the second.

    Args:
        false_positives: ``(greyscale image array, caption)`` of NORMAL images predicted
            PNEUMONIA, most confident first.
        false_negatives: the same for PNEUMONIA images predicted NORMAL.
        path: PNG file to write.
        per_row: images per row.
    """
    fig, axes = plt.subplots(2, per_row, figsize=(2.1 * per_row, 5.0), squeeze=False)
    for r, (items, name) in enumerate(((false_positives, "false positives (true NORMAL)"), (false_negatives, "false negatives (true PNEUMONIA)"))):
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(items):
                img, caption = items[c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                ax.set_title(caption, fontsize=7)
            else:
                for s in ax.spines.values():
                    s.set_visible(False)
                if c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=11, color="grey", transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("most confident errors at the operating threshold", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def plot_metric_bars(rows: Sequence[tuple[str, float | None, float | None, float | None]], path: str | Path, title: str) -> None:
    """Horizontal bars with 95% confidence intervals, one per model (model comparison).

    Args:
        rows: ``(model name, value, ci low, ci high)``.
        path: PNG file to write.
        title: plot title (the metric).
    """
    fig, ax = plt.subplots(figsize=(5.6, 0.5 + 0.45 * max(len(rows), 1)))
    for i, (_name, v, lo, hi) in enumerate(rows):
        if v is None:
            continue
        err = [[v - lo], [hi - v]] if lo is not None and hi is not None else None
        ax.barh(i, v, xerr=err, color=f"C{i}", alpha=0.85, capsize=4)
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)
