"""Temperature scaling and operating-point (threshold) selection, fitted on validation
logits (NumPy only)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ConfigError

#: Threshold rules of :func:`select_threshold`.
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "sensitivity", "f1")
#: Fitted temperatures outside this range are treated as a failed fit (T = 1 is kept).
_T_MIN, _T_MAX = 1e-2, 1e2


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def fit_temperature(logits: Sequence[float], labels: Sequence[int], max_iter: int = 100) -> float:
    """Temperature ``T > 0`` minimising the validation negative log-likelihood of
    ``sigmoid(logit / T)`` (Guo et al. 2017). Returns 1.0 for degenerate inputs and when the
    optimum lies outside ``(0.01, 100)`` (separable or anti-correlated logits).

    The likelihood is convex in ``a = 1 / T`` (a one-feature logistic regression without
    intercept), so its optimum is the root of the derivative, bracketed in ``(1/100, 1/0.01)``
    and found by Newton steps that fall back to bisection whenever they leave the bracket.

    Args:
        logits: raw model logits on the validation split.
        labels: 0/1 labels.
        max_iter: iterations at most.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if z.size < 2 or z.size != y.size or y.min() == y.max():
        return 1.0

    def derivatives(a: float) -> tuple[float, float]:
        p = sigmoid(a * z)
        return float(np.mean((p - y) * z)), float(np.mean(p * (1 - p) * z * z))

    lo, hi = 1.0 / _T_MAX, 1.0 / _T_MIN
    if not derivatives(lo)[0] < 0 < derivatives(hi)[0]:
        return 1.0  # the likelihood keeps improving beyond a bound: no usable temperature
    a = 1.0
    for _ in range(max_iter):
        g, h = derivatives(a)
        if g == 0:
            break
        lo, hi = (a, hi) if g < 0 else (lo, a)
        nxt = a - g / h if h > 0 else math.nan
        if not lo < nxt < hi:
            nxt = (lo + hi) / 2
        if abs(nxt - a) <= 1e-12 * a:
            a = nxt
            break
        a = nxt
    return 1.0 / a


def select_threshold(
    probs: Sequence[float], labels: Sequence[int], method: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """Operating threshold on (calibrated) probabilities.

    Args:
        probs: predicted probabilities of pneumonia on the validation split.
        labels: 0/1 labels.
        method: ``"youden"`` (max sensitivity + specificity - 1), ``"sensitivity"`` (the
            highest threshold whose sensitivity is at least ``target_sensitivity``) or ``"f1"``.
        target_sensitivity: used by ``"sensitivity"``.

    Returns:
        A threshold in (0, 1): predict PNEUMONIA when ``prob >= threshold``.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.size == 0 or y.min() == y.max():
        return 0.5
    cands = np.unique(p)
    # midpoints between consecutive distinct scores generalise better than the scores themselves
    thr = np.concatenate([[cands[0] - 1e-6], (cands[:-1] + cands[1:]) / 2, [cands[-1] + 1e-6]])
    pos, neg = y == 1, y == 0
    pred = p[None, :] >= thr[:, None]
    tp = (pred & pos).sum(1)
    fp = (pred & neg).sum(1)
    sens = tp / max(pos.sum(), 1)
    spec = 1 - fp / max(neg.sum(), 1)
    if method == "youden":
        score = sens + spec - 1
        best = np.flatnonzero(score >= score.max() - 1e-12)
        i = best[len(best) // 2]  # middle of a plateau of equally good thresholds
    elif method == "sensitivity":
        ok = np.flatnonzero(sens >= target_sensitivity)
        i = ok.max() if ok.size else 0
    elif method == "f1":
        prec = tp / np.maximum(tp + fp, 1)
        f1 = np.where(tp > 0, 2 * prec * sens / np.maximum(prec + sens, 1e-12), 0)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        i = best[len(best) // 2]
    else:
        raise ValueError(f"unknown threshold method '{method}'")
    return float(np.clip(thr[i], 1e-6, 1 - 1e-6))


def logit(p: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Inverse of :func:`sigmoid` (probabilities clipped away from 0 and 1).

    Args:
        p: probabilities.
        eps: clipping margin.
    """
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(q) - np.log1p(-q)


def reliability_curve(probs: Sequence[float], labels: Sequence[int], n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin statistics of a reliability diagram (equal-width bins on [0, 1], the bins of
    the reported ECE).

    Args:
        probs: predicted probabilities of PNEUMONIA.
        labels: 0/1 labels.
        n_bins: number of bins.

    Returns:
        ``edges`` (n_bins + 1), ``count``, ``mean_prob`` and ``frac_pos`` per bin (NaN for
        empty bins).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    b = np.clip(np.floor(np.clip(p, 0, 1) * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        frac = np.where(count > 0, sum_y / count, np.nan)
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count, "mean_prob": mean_p, "frac_pos": frac}


def calibration_summary(logits: Sequence[float], labels: Sequence[int], temperature: float, n_bins: int = 15) -> dict[str, float | int | None]:
    """ECE, Brier score and negative log-likelihood before (``T = 1``) and after temperature
    scaling, e.g. on a checkpoint's stored validation logits.

    Args:
        logits: raw logits.
        labels: 0/1 labels.
        temperature: the fitted temperature.
        n_bins: ECE bins.

    Returns:
        ``n``, ``temperature``, ``ece_before``, ``ece_after``, ``brier_before``,
        ``brier_after``, ``nll_before``, ``nll_after`` (``None`` when there are no logits).
    """
    from .metrics import brier_score, expected_calibration_error

    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    out: dict[str, float | int | None] = {"n": int(z.size), "temperature": float(temperature)}
    if z.size == 0 or z.size != y.size:
        return out | {k: None for k in ("ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after")}
    for tag, t in (("before", 1.0), ("after", float(temperature))):
        p = sigmoid(z / t)
        out[f"ece_{tag}"] = expected_calibration_error(y, p, n_bins)
        out[f"brier_{tag}"] = brier_score(y, p)
        q = np.clip(p, 1e-12, 1 - 1e-12)
        out[f"nll_{tag}"] = float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))
    return out


def check_threshold_rule(method: str, target_sensitivity: float = 0.95) -> None:
    """Refuse an unknown threshold rule or a target sensitivity outside (0, 1].

    Args:
        method: threshold rule (:data:`THRESHOLD_METHODS`).
        target_sensitivity: sensitivity the ``"sensitivity"`` rule must reach.

    Raises:
        ConfigError: with the allowed values.
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"unknown threshold method '{method}' ({', '.join(THRESHOLD_METHODS[:-1])} or {THRESHOLD_METHODS[-1]})")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")


@dataclass(frozen=True)
class OperatingPoint:
    """Temperature and threshold fitted on validation logits, with the validation metrics at
    that threshold.

    Attributes:
        temperature: ``probability = sigmoid(logit / temperature)``.
        threshold: predict PNEUMONIA when the calibrated probability is ``>= threshold``.
        method: the threshold rule (:data:`THRESHOLD_METHODS`).
        target_sensitivity: the sensitivity the ``"sensitivity"`` rule had to reach (``None``
            for the other rules).
        val_metrics: ``n``, ``accuracy``, ``sensitivity``, ``specificity``, ``roc_auc`` and
            ``threshold`` on the validation logits.
    """

    temperature: float
    threshold: float
    method: str
    target_sensitivity: float | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)


def fit_operating_point(
    logits: Sequence[float], labels: Sequence[int], method: str = "youden", target_sensitivity: float = 0.95,
    temperature: float | None = None,
) -> OperatingPoint:
    """Fit the temperature (unless given) and choose the operating threshold on validation logits.

    Args:
        logits: raw validation logits (at least one).
        labels: their 0/1 labels.
        method: ``"youden"``, ``"sensitivity"`` or ``"f1"`` (see :func:`select_threshold`).
        target_sensitivity: sensitivity the ``"sensitivity"`` rule must reach, in (0, 1].
        temperature: keep this temperature instead of fitting one.

    Raises:
        ConfigError: unknown method or target outside (0, 1].
        DataError: no logits, or logits and labels of different lengths.
    """
    from .metrics import roc_auc, threshold_metrics

    check_threshold_rule(method, target_sensitivity)
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    t = fit_temperature(z, y) if temperature is None else float(temperature)
    probs = sigmoid(z / t)
    thr = select_threshold(probs, y, method, target_sensitivity)
    tm = threshold_metrics(y, probs, thr)
    metrics = {
        "n": int(y.size), "accuracy": tm["accuracy"], "sensitivity": tm["sensitivity"], "specificity": tm["specificity"],
        "roc_auc": roc_auc(y, probs), "threshold": float(thr),
    }
    return OperatingPoint(float(t), float(thr), method, float(target_sensitivity) if method == "sensitivity" else None, metrics)
