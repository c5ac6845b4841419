"""Plots (PNG, matplotlib Agg backend), written atomically: the figures of evaluation
reports, model comparisons and training runs."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core.labels import CLASS_NAMES  # noqa: E402
from ..utils.io import atomic_path  # noqa: E402

#: The figures of an evaluation report: ``{key: file name}``.
REPORT_PLOTS = {
    "confusion_matrix": "confusion_matrix.png",
    "roc": "roc.png",
    "pr": "pr.png",
    "reliability": "reliability.png",
    "errors": "errors.png",
    "training_curves": "training_curves.png",
}
#: History columns :func:`plot_training_curves` needs.
TRAINING_CURVE_KEYS = ("epoch", "train_loss", "val_loss", "train_acc", "val_acc", "val_auc")


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
def plot_confusion_matrix(cm: Sequence[Sequence[int]], path: str | Path, threshold: float | None = None, title: str | None = None) -> None:
    """Confusion matrix (rows: true class, columns: predicted class) with counts and row shares.

    Args:
        cm: ``[[tn, fp], [fn, tp]]``.
        path: PNG file to write.
        threshold: the operating threshold, shown in the title.
        title: overrides the default title.
    """
    m = np.asarray(cm, dtype=float)
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(m[i, j])}\n({share[i, j]:.1%})", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=12)
    ax.set_xticks([0, 1], [f"pred {c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASS_NAMES], rotation=90, va="center")
    ax.set_title(title or (f"confusion matrix at threshold {threshold:.3f}" if threshold is not None else "confusion matrix"))
    fig.tight_layout()
    _save(fig, path)


def plot_roc(
    curves: Sequence[tuple[str, Any, Any]],
    path: str | Path,
    operating_points: Sequence[tuple[str, float, float]] = (),
    title: str = "ROC curve",
    threshold_marks: Sequence[tuple[str, float, float]] = (),
) -> None:
    """ROC curve(s), several models overlaid, with operating points marked.

    Args:
        curves: ``(name, labels, scores)`` per model; the legend shows the AUC.
        path: PNG file to write.
        operating_points: ``(label, false-positive rate, sensitivity)`` markers.
        title: plot title.
        threshold_marks: ``(threshold text, false-positive rate, sensitivity)``: small labelled
            dots (points at the same place share one label).
    """
    from sklearn.metrics import roc_curve

    from ..core.metrics import roc_auc

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for i, (name, y, s) in enumerate(curves):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=f"C{i}", lw=1.8, label=f"{name} (AUC {roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    places: dict[tuple[float, float], list[str]] = {}
    for text, x, y in threshold_marks:
        places.setdefault((round(x, 6), round(y, 6)), []).append(text)
    for k, ((x, y), texts) in enumerate(places.items()):
        ax.plot([x], [y], "o", ms=3.5, color="dimgrey", label="thresholds" if k == 0 else None)
        ax.annotate(texts[0] if len(texts) == 1 else f"{texts[0]}–{texts[-1]}", (x, y), xytext=(4, -9),
                    textcoords="offset points", fontsize=7, color="dimgrey")
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
    from sklearn.metrics import precision_recall_curve

    from ..core.metrics import pr_auc

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    prevalence = None
    for i, (name, y, s) in enumerate(curves):
        prec, rec, _ = precision_recall_curve(y, s)
        ax.step(rec, prec, where="post", color=f"C{i}", lw=1.8, label=f"{name} (AP {pr_auc(y, s):.3f})")
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


class ErrorItem(NamedTuple):
    """One misclassified image of the error grid.

    Attributes:
        image: 2-D greyscale array in [0, 1].
        caption: its caption (:func:`error_caption`).
        cam: its Grad-CAM map in [0, 1] (any size), or ``None`` to show the image alone.
    """

    image: np.ndarray
    caption: str
    cam: np.ndarray | None = None


def wrap_name(name: str, width: int = 24, max_lines: int = 2) -> list[str]:
    """A file name in lines of at most ``width`` characters, broken after ``_``, ``-`` or a
    space, or before a ``.``, where possible; a name too long for ``max_lines`` lines loses characters from its
    middle (``…``), never from its end.

    Args:
        name: the file name.
        width: characters per line.
        max_lines: lines at most.
    """
    if len(name) > width * max_lines:  # too long even when wrapped: drop the middle, keep the end
        keep = width * max_lines - 1
        head = keep // 3
        name = name[:head] + "…" + name[len(name) - (keep - head):]
    lines = [""]
    for token in re.findall(r"\.?[^_\-. ]+[_\- ]*|[_\-. ]+", name):
        if len(lines[-1]) + len(token) > width and lines[-1] and len(token) <= width:
            lines.append("")
        while len(lines[-1]) + len(token) > width:  # a token longer than a line: break it
            room = width - len(lines[-1])
            lines[-1] += token[:room]
            token = token[room:]
            lines.append("")
        lines[-1] += token
    if len(lines) > max_lines:  # breaking at separators wasted room: break anywhere
        lines = [name[i : i + width] for i in range(0, len(name), width)]
    return lines


def error_caption(path: str | Path, probability: float, width: int = 30) -> str:
    """The caption of an error: its file name (:func:`wrap_name`) and probability.

    Args:
        path: the image's path (only its name is shown).
        probability: the predicted probability of PNEUMONIA.
        width: characters per line.
    """
    return "\n".join([*wrap_name(Path(path).name, width), f"p = {probability:.3f}"])


def plot_error_grid(
    false_positives: Sequence[ErrorItem | tuple[Any, ...]],
    false_negatives: Sequence[ErrorItem | tuple[Any, ...]],
    path: str | Path,
    per_row: int = 3,
) -> None:
    """The most confident mistakes: false positives first, then false negatives, each image
    with its Grad-CAM overlay beside it when it has one.

    Args:
        false_positives: NORMAL images predicted PNEUMONIA, most confident first, as
            :class:`ErrorItem` or plain ``(image, caption[, cam])`` tuples.
        false_negatives: the same for PNEUMONIA images predicted NORMAL.
        path: PNG file to write.
        per_row: errors per row.

    Raises:
        ValueError: there is no error to show (write no figure then).
    """
    from ..core.imaging import overlay

    blocks = [(name, [ErrorItem(*it) for it in items]) for name, items in (
        ("false positive (true NORMAL)", false_positives), ("false negative (true PNEUMONIA)", false_negatives)) if items]
    if not blocks:
        raise ValueError("no misclassified image to plot")
    panels = 2 if any(it.cam is not None for _, items in blocks for it in items) else 1
    cols = min(per_row, max(len(items) for _, items in blocks))
    n_rows = sum(-(-len(items) // cols) for _, items in blocks)
    fig, axes = plt.subplots(n_rows, cols * panels, figsize=(1.9 * cols * panels, 2.5 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    row = 0
    for name, items in blocks:
        for k, it in enumerate(items):
            r, c = row + k // cols, (k % cols) * panels
            ax = axes[r][c]
            ax.imshow(it.image, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name.split(' (')[0]}\n{it.caption}", fontsize=7)
            if it.cam is not None:
                axes[r][c + 1].imshow(overlay(it.image, it.cam))
                empty = float(np.nanmax(it.cam)) <= 1e-6  # e.g. ReLU removed every contribution
                axes[r][c + 1].set_title("Grad-CAM (predicted class)" + ("\nempty map: no positive evidence" if empty else ""), fontsize=7)
        row += -(-len(items) // cols)
    n_fp, n_fn = len(false_positives), len(false_negatives)
    fig.suptitle(f"most confident errors at the operating threshold: {n_fp} false positive(s) shown, {n_fn} false negative(s) shown",
                 fontsize=10)
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


# --------------------------------------------------------------------------- the evaluation report's figures
def write_report_plots(
    out: Path, y: np.ndarray, p: np.ndarray, raw_p: np.ndarray, threshold: float, temperature: float,
    sections: dict[str, Any], errors: dict[str, Sequence[ErrorItem]], history: Sequence[dict[str, Any]] = (),
    threshold_table: Sequence[dict[str, Any]] = (),
) -> dict[str, Path]:
    """Write the PNG figures of an evaluation report (:data:`REPORT_PLOTS`).

    Args:
        out: report directory.
        y: 0/1 labels of the readable images.
        p: their calibrated probabilities.
        raw_p: their uncalibrated (``T = 1``) probabilities.
        threshold: operating threshold.
        temperature: the model's temperature (``1`` draws a single reliability curve).
        sections: :func:`~pneumoscan.core.metrics.bootstrap_metrics` output with the sections
            ``at_operating_threshold`` and ``at_0.5``.
        errors: ``false_positives`` and ``false_negatives`` to show (``errors.png`` is written
            only when there is at least one).
        history: the run's training history (curves drawn when it has every column).
        threshold_table: rows of :func:`~pneumoscan.evaluation.summaries.threshold_row`; the
            unlabelled grid thresholds are marked on the ROC curve.

    Returns:
        ``{plot key: path}`` of the figures written (no ROC/PR curves for a single class, no
        error grid without errors).
    """
    written: dict[str, Path] = {}
    op, half = sections["at_operating_threshold"], sections["at_0.5"]
    plot_confusion_matrix(op["confusion_matrix"]["value"], out / REPORT_PLOTS["confusion_matrix"], threshold)
    written["confusion_matrix"] = out / REPORT_PLOTS["confusion_matrix"]
    if y.min() != y.max():
        pts = [(f"operating point (t={threshold:.3f})", 1 - op["specificity"]["value"], op["sensitivity"]["value"]),
               ("threshold 0.5", 1 - half["specificity"]["value"], half["sensitivity"]["value"])]
        marks = [(f"{r['threshold']:.1f}", 1 - r["specificity"]["value"], r["sensitivity"]["value"])
                 for r in threshold_table if not r["labels"]]
        plot_roc([("model", y, p)], out / REPORT_PLOTS["roc"], pts, threshold_marks=marks)
        written["roc"] = out / REPORT_PLOTS["roc"]
        pr_pts = [(f"operating point (t={threshold:.3f})", op["recall"]["value"], op["precision"]["value"]),
                  ("threshold 0.5", half["recall"]["value"], half["precision"]["value"])]
        # precision is undefined (None) when nothing is predicted PNEUMONIA: no marker then
        plot_precision_recall([("model", y, p)], out / REPORT_PLOTS["pr"], [pt for pt in pr_pts if pt[2] is not None])
        written["pr"] = out / REPORT_PLOTS["pr"]
    series = ([("calibrated", y, p)] if abs(temperature - 1.0) < 1e-9
              else [("uncalibrated (T=1)", y, raw_p), (f"calibrated (T={temperature:.2f})", y, p)])
    plot_reliability(series, out / REPORT_PLOTS["reliability"])
    written["reliability"] = out / REPORT_PLOTS["reliability"]
    err_path = out / REPORT_PLOTS["errors"]
    if errors.get("false_positives") or errors.get("false_negatives"):
        plot_error_grid(errors.get("false_positives", ()), errors.get("false_negatives", ()), err_path)
        written["errors"] = err_path
    elif err_path.is_file():
        err_path.unlink()  # a stale grid of an earlier report in the same folder
    if history and all(k in history[0] for k in TRAINING_CURVE_KEYS):
        plot_training_curves(history, out / REPORT_PLOTS["training_curves"])
        written["training_curves"] = out / REPORT_PLOTS["training_curves"]
    return written
