"""Binary classification metrics with confidence intervals, and DeLong's test for paired
ROC-AUCs. Interval methods (each entry's ``ci_method``; details in :mod:`.intervals`):

- accuracy, sensitivity/recall, specificity, precision, NPV (binomial proportions): **Wilson
  score interval** from the counts (``"wilson"``) — near-nominal coverage where Clopper-Pearson is
  conservative, and never ``[1, 1]`` for 8 out of 8 as the percentile bootstrap is.
- F1: stratified percentile bootstrap, or, with a class under ``min_per_class`` images or a
  collapsed bootstrap, the Wilson interval of the Jaccard index mapped to F1 (``"wilson_jaccard"``).
- ROC-AUC, PR-AUC, Brier, ECE: stratified percentile bootstrap; a collapsed one is warned about.

Every metric is computed by one weighted, vectorised routine: a bootstrap resample is a row
of multiplicities ``W[b, i]`` (how often image ``i`` was drawn), and the point estimate is the
row of ones. So the point estimates (checked against scikit-learn in the tests) and the
thousands of bootstrap replicates come from the same code, and 2,000 resamples of ~600
images take a fraction of a second.

Labels are 0 = NORMAL, 1 = PNEUMONIA; a prediction is PNEUMONIA when ``prob >= threshold``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError
from .intervals import (
    MIN_PER_CLASS, as_labels, class_counts, count_interval, f1_interval, normal_quantile, small_class_warnings, wilson_interval,
)
from .labels import CLASS_NAMES

#: Threshold-dependent metrics.
THRESHOLD_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "sensitivity", "specificity", "npv", "f1")
#: Threshold-free metrics (ranking and calibration).
SCORE_METRICS: tuple[str, ...] = ("roc_auc", "pr_auc", "brier", "ece")
#: Every scalar metric reported with a confidence interval, in report order.
METRIC_KEYS: tuple[str, ...] = THRESHOLD_METRICS + SCORE_METRICS
#: Human-readable names.
METRIC_LABELS: dict[str, str] = {
    "accuracy": "Accuracy", "precision": "Precision (PPV)", "recall": "Recall", "sensitivity": "Sensitivity",
    "specificity": "Specificity", "npv": "NPV", "f1": "F1", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC (AP)",
    "brier": "Brier score", "ece": "ECE",
}

DEFAULT_RESAMPLES = 2000
DEFAULT_ECE_BINS = 15
_CHUNK = 256  # bootstrap rows processed at once (bounds memory for large test sets)


# --------------------------------------------------------------------------- input checks
def _as_arrays(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = as_labels(labels)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise DataError(f"labels ({y.size}) and scores ({p.size}) differ in length")
    if y.size == 0:
        raise DataError("no predictions to evaluate")
    if not np.isfinite(p).all():
        raise DataError("scores contain NaN or infinity")
    return y, p


# --------------------------------------------------------------------------- weighted core
@dataclass(frozen=True)
class _Prepared:
    """Per-dataset quantities shared by the point estimate and every resample."""

    y: np.ndarray  # (n,) 0/1
    p: np.ndarray  # (n,) scores
    order: np.ndarray  # ascending score order
    starts: np.ndarray  # first index (in sorted order) of each group of tied scores
    bins: np.ndarray  # (n, K) one-hot reliability bin of each score
    sq_err: np.ndarray  # (p - y)^2


def _prepare(y: np.ndarray, p: np.ndarray, n_bins: int = DEFAULT_ECE_BINS) -> _Prepared:
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    b = np.clip(np.floor(np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)
    onehot = np.zeros((p.size, n_bins))
    onehot[np.arange(p.size), b] = 1.0
    return _Prepared(y, p, order, starts, onehot, (p - y) ** 2)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise ``a / b`` with NaN where ``b == 0`` (an undefined metric, not a zero)."""
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _weighted_auc(W: np.ndarray, pr: _Prepared) -> np.ndarray:
    """ROC-AUC only, for each row of weights ``W`` (the paired AUC bootstrap)."""
    Wp = W * pr.y
    Wn = W - Wp
    pos_g = np.add.reduceat(Wp[:, pr.order], pr.starts, axis=1)
    neg_g = np.add.reduceat(Wn[:, pr.order], pr.starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    return _div((pos_g * (neg_below + 0.5 * neg_g)).sum(1), Wp.sum(1) * Wn.sum(1))


def _score_metrics(W: np.ndarray, pr: _Prepared) -> dict[str, np.ndarray]:
    """ROC-AUC, average precision, Brier score and ECE for each row of weights ``W``."""
    Wp = W * pr.y
    Wn = W - Wp
    P = Wp.sum(1)
    N = Wn.sum(1)
    total = P + N
    # Scores grouped by distinct value (ascending); ties count one half for ROC-AUC.
    pos_g = np.add.reduceat(Wp[:, pr.order], pr.starts, axis=1)
    neg_g = np.add.reduceat(Wn[:, pr.order], pr.starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    auc = _div((pos_g * (neg_below + 0.5 * neg_g)).sum(1), P * N)
    # Average precision: sum over thresholds (descending) of recall increment x precision.
    pos_d, neg_d = pos_g[:, ::-1], neg_g[:, ::-1]
    tp_c = np.cumsum(pos_d, axis=1)
    fp_c = np.cumsum(neg_d, axis=1)
    prec = np.zeros_like(tp_c)
    np.divide(tp_c, tp_c + fp_c, out=prec, where=(tp_c + fp_c) > 0)
    ap = _div((pos_d * prec).sum(1), P)
    brier = _div(W @ pr.sq_err, total)
    # ECE = sum over bins of |observed positives - predicted probability mass| / n.
    ece = _div(np.abs(Wp @ pr.bins - (W * pr.p) @ pr.bins).sum(1), total)
    return {"roc_auc": auc, "pr_auc": ap, "brier": brier, "ece": ece}


def _threshold_metrics(W: np.ndarray, pr: _Prepared, threshold: float) -> dict[str, np.ndarray]:
    """Confusion counts and the threshold metrics for each row of weights ``W``."""
    pred = (pr.p >= threshold).astype(np.float64)
    Wp = W * pr.y
    Wn = W - Wp
    P, N = Wp.sum(1), Wn.sum(1)
    tp = Wp @ pred
    fp = Wn @ pred
    fn = P - tp
    tn = N - fp
    sens = _div(tp, P)
    return {
        "accuracy": _div(tp + tn, P + N),
        "precision": _div(tp, tp + fp),
        "recall": sens,
        "sensitivity": sens,
        "specificity": _div(tn, N),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


# --------------------------------------------------------------------------- point estimates
def confusion_counts(labels: Sequence[int], probs: Sequence[float], threshold: float) -> dict[str, int]:
    """``tn``, ``fp``, ``fn``, ``tp`` at ``threshold``.

    Args:
        labels: 0/1 true labels.
        probs: predicted probabilities of PNEUMONIA.
        threshold: predict PNEUMONIA when ``prob >= threshold``.
    """
    m = _metrics_at(labels, probs, threshold)
    return {k: int(round(float(m[k][0]))) for k in ("tn", "fp", "fn", "tp")}


def threshold_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall/sensitivity, specificity, NPV and F1 at ``threshold``
    (NaN where a metric is undefined, e.g. precision with no positive prediction).

    Args:
        labels: 0/1 true labels.
        probs: predicted probabilities of PNEUMONIA.
        threshold: predict PNEUMONIA when ``prob >= threshold``.
    """
    m = _metrics_at(labels, probs, threshold)
    return {k: float(m[k][0]) for k in THRESHOLD_METRICS}


def _metrics_at(labels: Sequence[int], probs: Sequence[float], threshold: float) -> dict[str, np.ndarray]:
    """The vectorised threshold metrics of the full sample (a single unit-weight replicate)."""
    y, p = _as_arrays(labels, probs)
    return _threshold_metrics(np.ones((1, y.size)), _prepare(y, p), threshold)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (ties count one half); NaN with a single class.

    Args:
        labels: 0/1 true labels.
        scores: any monotone score (probabilities or logits).
    """
    y, p = _as_arrays(labels, scores)
    return float(_score_metrics(np.ones((1, y.size)), _prepare(y, p))["roc_auc"][0])


def pr_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no
    interpolation; scikit-learn's ``average_precision_score``); NaN without positives.

    Args:
        labels: 0/1 true labels.
        scores: any monotone score.
    """
    y, p = _as_arrays(labels, scores)
    return float(_score_metrics(np.ones((1, y.size)), _prepare(y, p))["pr_auc"][0])


def brier_score(labels: Sequence[int], probs: Sequence[float]) -> float:
    """Mean squared error of the probabilities.

    Args:
        labels: 0/1 true labels.
        probs: predicted probabilities of PNEUMONIA.
    """
    y, p = _as_arrays(labels, probs)
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(labels: Sequence[int], probs: Sequence[float], n_bins: int = DEFAULT_ECE_BINS) -> float:
    """Expected calibration error of the PNEUMONIA probability: equal-width bins on [0, 1],
    ``sum_k n_k / n * |observed rate_k - mean probability_k|``.

    Args:
        labels: 0/1 true labels.
        probs: predicted probabilities of PNEUMONIA.
        n_bins: number of equal-width bins.
    """
    y, p = _as_arrays(labels, probs)
    return float(_score_metrics(np.ones((1, y.size)), _prepare(y, p, n_bins))["ece"][0])


# --------------------------------------------------------------------------- bootstrap
def stratified_bootstrap_weights(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicity matrix ``(n_resamples, n)`` of a stratified bootstrap: each class is
    resampled with replacement within itself, so every resample keeps the class sizes.

    Args:
        labels: 0/1 labels.
        n_resamples: rows to draw.
        rng: numpy random generator.
    """
    y = np.asarray(labels).astype(np.int64)
    W = np.zeros((n_resamples, y.size))
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        k = idx.size
        if k == 0:
            continue
        draws = rng.integers(0, k, size=(n_resamples, k)) + (np.arange(n_resamples) * k)[:, None]
        W[:, idx] = np.bincount(draws.ravel(), minlength=n_resamples * k).reshape(n_resamples, k)
    return W


def _interval(samples: np.ndarray, ci: float) -> list[float | None]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [None, None]
    a = (1 - ci) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return [float(lo), float(hi)]


def _num(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _collapsed(lo: float | None, hi: float | None) -> bool:
    """Whether an interval is a single point (every bootstrap resample gave the same value)."""
    return lo is not None and hi is not None and hi - lo < 1e-12


#: Proportion metrics: (counts in the numerator, counts in the denominator ``n``).
_PROPORTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")), "precision": (("tp",), ("tp", "fp")), "recall": (("tp",), ("tp", "fn")),
    "sensitivity": (("tp",), ("tp", "fn")), "specificity": (("tn",), ("tn", "fp")), "npv": (("tn",), ("tn", "fn"))}


def _f1_entry(value: float, boot: np.ndarray, c: Mapping[str, int], ci: float, small: bool) -> dict[str, Any]:
    """F1 with its bootstrap interval, or the Wilson-Jaccard interval when the classes are small
    or the bootstrap interval collapsed to a point."""
    (lo, hi), method = _interval(boot, ci), "bootstrap"
    if small or _collapsed(lo, hi):
        (lo, hi), method = f1_interval(c["tp"], c["fp"], c["fn"], ci), "wilson_jaccard"
    return {"value": _num(value), "ci95": [lo, hi], "n": c["tp"] + c["fp"] + c["fn"], "ci_method": method}


def bootstrap_metrics(
    labels: Sequence[int],
    probs: Sequence[float],
    thresholds: Mapping[str, float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    ci: float = 0.95,
    n_bins: int = DEFAULT_ECE_BINS,
    min_per_class: int = MIN_PER_CLASS,
) -> dict[str, dict[str, Any]]:
    """Every metric with a confidence interval, at one or more thresholds: Wilson intervals for
    the proportions, the stratified percentile bootstrap (the same resamples for all thresholds)
    for F1 and the threshold-free metrics (see the module docstring).

    Args:
        labels: 0/1 true labels.
        probs: calibrated probabilities of PNEUMONIA.
        thresholds: ``{"at_operating_threshold": 0.43, "at_0.5": 0.5}`` → one section each.
        n_resamples: bootstrap resamples (>= 1,000 for reported intervals).
        seed: seed of the resampling (same seed → same intervals).
        ci: interval coverage.
        n_bins: reliability bins of the ECE.
        min_per_class: classes smaller than this are warned about, and F1 avoids the bootstrap.

    Returns:
        ``{section: {"threshold", "n", "n_per_class", "warnings", <metric>: {"value", "ci95", "n",
        "ci_method"}, ..., "confusion_matrix": {"labels", "rows", "columns", "value", "ci95",
        "ci_method"}}}``; undefined values are ``None``. A metric's ``n`` is its denominator: all
        images (accuracy, threshold-free metrics), positives (sensitivity/recall), negatives
        (specificity), predicted positives (precision), predicted negatives (NPV), ``tp + fp + fn``
        (F1). ``warnings``: small classes (:func:`small_class_warnings`), collapsed bootstraps.
    """
    y, p = _as_arrays(labels, probs)
    if n_resamples < 1:
        raise DataError("n_resamples must be >= 1")
    pr = _prepare(y, p, n_bins)
    ones = np.ones((1, y.size))
    point_scores = _score_metrics(ones, pr)
    point_thr = {name: _threshold_metrics(ones, pr, t) for name, t in thresholds.items()}
    rng = np.random.default_rng(seed)
    boot_scores: dict[str, list[np.ndarray]] = {k: [] for k in SCORE_METRICS}
    boot_f1: dict[str, list[np.ndarray]] = {name: [] for name in thresholds}
    done = 0
    while done < n_resamples:
        b = min(_CHUNK, n_resamples - done)
        W = stratified_bootstrap_weights(y, b, rng)
        for k, v in _score_metrics(W, pr).items():
            boot_scores[k].append(v)
        for name, t in thresholds.items():
            boot_f1[name].append(_threshold_metrics(W, pr, t)["f1"])
        done += b
    n_per_class = class_counts(y)
    small = min(n_per_class.values()) < min_per_class
    scores = {k: {"value": _num(point_scores[k][0]), "ci95": _interval(np.concatenate(boot_scores[k]), ci), "n": int(y.size),
                  "ci_method": "bootstrap"} for k in SCORE_METRICS}
    warnings = small_class_warnings(y, min_per_class) + [
        f"{METRIC_LABELS[k]}: every bootstrap resample gave {e['ci95'][0]:.3f}, so its interval [{e['ci95'][0]:.3f}, "
        f"{e['ci95'][1]:.3f}] understates the uncertainty at this sample size" for k, e in scores.items() if _collapsed(*e["ci95"])]
    out: dict[str, dict[str, Any]] = {}
    for name, t in thresholds.items():
        c = {k: int(round(float(point_thr[name][k][0]))) for k in ("tn", "fp", "fn", "tp")}
        sec: dict[str, Any] = {"threshold": float(t), "n": int(y.size), "n_per_class": n_per_class, "warnings": list(warnings)}
        for k in THRESHOLD_METRICS:
            if k == "f1":
                sec[k] = _f1_entry(point_thr[name]["f1"][0], np.concatenate(boot_f1[name]), c, ci, small)
                continue
            num, den = _PROPORTIONS[k]
            x, n = sum(c[i] for i in num), sum(c[i] for i in den)
            sec[k] = {"value": _num(point_thr[name][k][0]), "ci95": list(wilson_interval(x, n, ci)), "n": n, "ci_method": "wilson"}
        sec.update({k: dict(e) for k, e in scores.items()})
        cells = (("tn", "fp"), ("fn", "tp"))  # rows are the true classes, of fixed size
        sec["confusion_matrix"] = {
            "labels": list(CLASS_NAMES), "rows": "true class", "columns": "predicted class",
            "value": [[c[k] for k in row] for row in cells],
            "ci95": [[count_interval(c[k], c[row[0]] + c[row[1]], ci) for k in row] for row in cells], "ci_method": "wilson",
        }
        out[name] = sec
    return out


# --------------------------------------------------------------------------- DeLong
def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def delong_components(labels: Sequence[int], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components of ``k`` score vectors on the same images
    (Sun & Xu 2014's fast midrank algorithm).

    Args:
        labels: 0/1 labels (both classes present).
        scores: ``(k, n)`` scores of ``k`` models.

    Returns:
        ``(aucs (k,), V10 (k, m positives), V01 (k, n negatives))``.
    """
    y = np.asarray(labels).astype(np.int64)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise DataError("DeLong's test needs both classes")
    aucs, v10, v01 = [], [], []
    for k in range(s.shape[0]):
        tz = _midranks(np.concatenate([pos[k], neg[k]]))
        tx, ty = _midranks(pos[k]), _midranks(neg[k])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    return np.asarray(aucs), np.asarray(v10), np.asarray(v01)


def delong_test(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float], ci: float = 0.95) -> dict[str, float | list[float]]:
    """DeLong's test of two correlated ROC-AUCs measured on the same images (DeLong, DeLong
    & Clarke-Pearson 1988).

    Args:
        labels: 0/1 labels.
        scores_a: model A's scores.
        scores_b: model B's scores, same images and order.
        ci: coverage of the normal-approximation interval of ``auc_a - auc_b``.

    Returns:
        ``auc_a``, ``auc_b``, ``diff`` (A - B), ``se`` of the difference, ``z``, two-sided
        ``p_value`` and ``ci95``. Identical score vectors give ``p_value`` 1.
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    if a.shape != b.shape:
        raise DataError("both models must score the same images")
    aucs, v10, v01 = delong_components(y, np.stack([a, b]))
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    if se < 1e-12:
        z, p = 0.0, 1.0 if abs(diff) < 1e-12 else 0.0
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2))
    zq = normal_quantile(0.5 + ci / 2)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se, "z": float(z),
            "p_value": float(min(max(p, 0.0), 1.0)), "ci95": [diff - zq * se, diff + zq * se]}


def paired_bootstrap_auc(
    labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float], *,
    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, ci: float = 0.95,
) -> dict[str, float | list[float] | None]:
    """Paired stratified bootstrap of ``AUC_a - AUC_b`` (both models scored on each resample).

    Args:
        labels: 0/1 labels.
        scores_a: model A's scores.
        scores_b: model B's scores, same images and order.
        n_resamples: bootstrap resamples.
        seed: resampling seed.
        ci: interval coverage.

    Returns:
        ``diff``, bootstrap ``se``, percentile ``ci95`` and a two-sided ``p_value``
        (twice the smaller tail of resamples on either side of 0, as ``(count + 1) / (B + 1)``).
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    pa, pb = _prepare(y, a, 1), _prepare(y, b, 1)
    ones = np.ones((1, y.size))
    diff = float(_weighted_auc(ones, pa)[0] - _weighted_auc(ones, pb)[0])
    rng = np.random.default_rng(seed)
    parts, done = [], 0
    while done < n_resamples:
        k = min(_CHUNK, n_resamples - done)
        W = stratified_bootstrap_weights(y, k, rng)
        parts.append(_weighted_auc(W, pa) - _weighted_auc(W, pb))
        done += k
    d = np.concatenate(parts)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"diff": _num(diff), "se": None, "ci95": [None, None], "p_value": None, "resamples": n_resamples}
    # (count + 1) / (B + 1): never exactly 0 from a finite number of resamples
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = float(min(1.0, 2 * (tail + 1) / (d.size + 1)))
    return {"diff": diff, "se": float(d.std(ddof=1)) if d.size > 1 else 0.0, "ci95": _interval(d, ci), "p_value": p, "resamples": n_resamples}


# --------------------------------------------------------------------------- formatting
def format_value(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``1.000 [0.676, 1.000] (n=8)`` from a ``{"value", "ci95", "n"}`` entry (``n/a`` where
    undefined; the ``(n=…)`` suffix only when the entry carries ``n``).

    Args:
        entry: a metric entry of :func:`bootstrap_metrics`.
        digits: decimals.
    """
    if not entry or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.{digits}f}"
    lo, hi = entry.get("ci95") or [None, None]
    if lo is not None and hi is not None:
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    if entry.get("n") is not None:
        text += f" (n={entry['n']})"
    return text
