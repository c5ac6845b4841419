"""Tables derived from an evaluation's predictions and metric sections: the candidate operating
thresholds a reader chooses from, the interval method of every figure, and the most confident
errors. Every number comes from :mod:`pneumoscan.core.metrics` /
:mod:`pneumoscan.core.calibration`; this module only selects and arranges.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..core.calibration import select_threshold
from ..core.intervals import CI_METHODS
from ..core.metrics import METRIC_KEYS, METRIC_LABELS

#: The fixed thresholds of the threshold table.
GRID_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))
#: Sensitivities whose thresholds on the evaluated data join the table.
TARGET_SENSITIVITIES: tuple[float, ...] = (0.90, 0.95, 0.98)
#: The metrics of the threshold table (precision is the PPV).
TABLE_METRICS: tuple[str, ...] = ("sensitivity", "specificity", "precision", "npv")
#: A share of images flagged by the distribution-shift check above this is a report warning.
HIGH_SHIFT_SHARE = 0.20


def candidate_thresholds(
    labels: np.ndarray, probs: np.ndarray, operating: float, method: str | None = None,
    grid: Sequence[float] = GRID_THRESHOLDS, targets: Sequence[float] = TARGET_SENSITIVITIES,
) -> list[tuple[float, list[str]]]:
    """The thresholds of the threshold table, ascending, each with what makes it special.

    Args:
        labels: 0/1 labels of the evaluated images.
        probs: their calibrated probabilities.
        operating: the model's stored operating threshold.
        method: the rule that chose it (shown in its label).
        grid: fixed thresholds.
        targets: sensitivities to reach on these data (the highest threshold that does, by
            :func:`~pneumoscan.core.calibration.select_threshold`); left out with a single class.

    Returns:
        ``[(threshold, [label, ...]), ...]``; thresholds closer than 1e-9 are merged.
    """
    cands: list[tuple[float, str]] = [(float(t), "default 0.5" if abs(t - 0.5) < 1e-9 else "") for t in grid]
    cands.append((float(operating), "operating threshold" + (f" ({method})" if method else "")))
    if labels.size and labels.min() != labels.max():
        reached: dict[float, list[float]] = {}
        for s in targets:
            reached.setdefault(select_threshold(probs, labels, "sensitivity", s), []).append(s)
        cands += [(t, "sensitivity ≥ " + " / ".join(f"{s:.2f}" for s in ss) + " on these data") for t, ss in reached.items()]
    merged: list[tuple[float, list[str]]] = []
    for t, label in sorted(cands, key=lambda c: c[0]):
        if not merged or abs(merged[-1][0] - t) > 1e-9:
            merged.append((t, []))
        if label:
            merged[-1][1].append(label)
    return merged


def threshold_row(section: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """One row of the threshold table from a :func:`~pneumoscan.core.metrics.bootstrap_metrics`
    section at that threshold.

    Args:
        section: the section (``threshold``, the metric entries, ``confusion_matrix``).
        labels: what makes the threshold special (:func:`candidate_thresholds`).

    Returns:
        ``threshold``, ``labels``, one entry (``value``, ``ci95``, ``n``, ``ci_method``) per
        :data:`TABLE_METRICS` and the ``counts`` ``tn``, ``fp``, ``fn``, ``tp``.
    """
    (tn, fp), (fn, tp) = section["confusion_matrix"]["value"]
    return {"threshold": section["threshold"], "labels": list(labels), **{k: dict(section[k]) for k in TABLE_METRICS},
            "counts": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}}


def interval_methods(section: Mapping[str, Any]) -> dict[str, str]:
    """``{metric: ci_method}`` of a metric section (recall left out: it is the sensitivity),
    plus ``confusion_matrix``.

    Args:
        section: a :func:`~pneumoscan.core.metrics.bootstrap_metrics` section.
    """
    out = {k: section[k]["ci_method"] for k in METRIC_KEYS if k != "recall" and k in section}
    if "confusion_matrix" in section:
        out["confusion_matrix"] = section["confusion_matrix"]["ci_method"]
    return out


def describe_intervals(methods: Mapping[str, str], n_resamples: int, seed: int) -> str:
    """One sentence per interval method saying which figures use it, e.g. ``"Accuracy, ...:
    Wilson score interval ...; F1, ROC-AUC, ...: stratified percentile bootstrap ..., 2,000
    resamples, seed 0."``

    Args:
        methods: :func:`interval_methods` output.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
    """
    groups: dict[str, list[str]] = {}
    for k, m in methods.items():
        groups.setdefault(m, []).append("confusion-matrix counts" if k == "confusion_matrix" else METRIC_LABELS[k])
    parts = [f"{', '.join(names)}: {CI_METHODS.get(m, m)}" + (f", {n_resamples:,} resamples, seed {seed}" if m == "bootstrap" else "")
             for m, names in groups.items()]
    return "; ".join(parts) + "."


def interval_summary(section: Mapping[str, Any], n_resamples: int, seed: int, ci: float = 0.95) -> dict[str, Any]:
    """The ``bootstrap`` record of ``metrics.json`` and ``compare.json``: how every figure's
    interval was computed.

    Args:
        section: a :func:`~pneumoscan.core.metrics.bootstrap_metrics` section.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
        ci: interval coverage.

    Returns:
        ``resamples``, ``seed``, ``ci``, ``method`` (:func:`describe_intervals`) and
        ``ci_methods`` (:func:`interval_methods`).
    """
    methods = interval_methods(section)
    return {"resamples": n_resamples, "seed": seed, "ci": ci, "method": describe_intervals(methods, n_resamples, seed), "ci_methods": methods}


def most_confident_errors(rows: Sequence[Mapping[str, Any]], threshold: float, n: int) -> dict[str, list[Mapping[str, Any]]]:
    """The ``n`` most confident false positives (highest probability first) and false
    negatives (lowest first) at ``threshold``.

    Args:
        rows: readable prediction rows (``label``, ``probability``, ``path``).
        threshold: operating threshold (PNEUMONIA when ``probability >= threshold``).
        n: errors per kind at most.
    """
    fp = sorted((r for r in rows if r["label"] == 0 and r["probability"] >= threshold), key=lambda r: -r["probability"])
    fn = sorted((r for r in rows if r["label"] == 1 and r["probability"] < threshold), key=lambda r: r["probability"])
    return {"false_positives": fp[:n], "false_negatives": fn[:n]}


def overlap_line(overlap: Mapping[str, Any], n_images: int) -> str:
    """The warning of an evaluation on images the model was built on.

    Args:
        overlap: :func:`~pneumoscan.evaluation.evaluate.training_overlap` output (``images``,
            ``train``, ``calibration``).
        n_images: the images evaluated.
    """
    parts = [f"{overlap[k]} {w}" for k, w in (("train", "training"), ("calibration", "calibration")) if overlap.get(k)]
    return (f"{overlap['images']} of {n_images} images of this data set were among this model's training/calibration images "
            f"({', '.join(parts)}; listed in the report): these figures are optimistic and not a held-out result")
