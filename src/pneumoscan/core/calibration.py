"""Temperature scaling and operating-point (threshold) selection, fitted on validation."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def fit_temperature(logits: Sequence[float], labels: Sequence[int], max_iter: int = 200) -> float:
    """Temperature ``T > 0`` minimising the validation negative log-likelihood of
    ``sigmoid(logit / T)`` (Guo et al. 2017). Returns 1.0 for degenerate inputs.

    Args:
        logits: raw model logits on the validation split.
        labels: 0/1 labels.
        max_iter: LBFGS iterations.
    """
    import torch

    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if z.numel() < 2 or y.min() == y.max():
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> "torch.Tensor":
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 1e-2 < t < 1e2 else 1.0


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


def recalibrate(
    ckpt: dict, method: str = "youden", target_sensitivity: float = 0.95, refit_temperature: bool = True
) -> dict:
    """Re-derive temperature and operating threshold from a checkpoint's stored validation
    logits (``val_logits``/``val_labels``), without retraining.

    Args:
        ckpt: a checkpoint dict (as from ``load_checkpoint``); not modified.
        method: ``"youden"``, ``"sensitivity"`` or ``"f1"`` (see :func:`select_threshold`).
        target_sensitivity: sensitivity the ``"sensitivity"`` rule must reach.
        refit_temperature: fit the temperature again (otherwise keep the stored one).

    Returns:
        A new checkpoint dict with ``threshold``, ``temperature``, ``threshold_method``,
        ``target_sensitivity`` and ``val_metrics`` replaced.

    Raises:
        CheckpointError: the checkpoint holds no validation logits.
        ConfigError: unknown method or target outside (0, 1].
    """
    from ..errors import CheckpointError, ConfigError
    from .metrics import threshold_metrics, roc_auc

    if method not in ("youden", "sensitivity", "f1"):
        raise ConfigError(f"unknown threshold method '{method}' (youden, sensitivity or f1)")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    z = np.asarray(ckpt.get("val_logits") or [], dtype=np.float64)
    y = np.asarray(ckpt.get("val_labels") or [], dtype=np.int64)
    if z.size == 0 or z.size != y.size:
        raise CheckpointError("the checkpoint stores no validation logits (val_logits/val_labels); retrain or evaluate instead")
    if y.min() == y.max():
        raise CheckpointError("the stored validation split has a single class; no threshold can be derived from it")
    t = fit_temperature(z, y) if refit_temperature else float(ckpt.get("temperature", 1.0))
    probs = sigmoid(z / t)
    thr = select_threshold(probs, y, method, target_sensitivity)
    tm = threshold_metrics(y, probs, thr)
    metrics = {
        "n": int(y.size), "accuracy": tm["accuracy"], "sensitivity": tm["sensitivity"], "specificity": tm["specificity"],
        "roc_auc": roc_auc(y, probs), "threshold": float(thr),
    }
    out = {k: v for k, v in ckpt.items() if k != "_path"}
    out.update({"threshold": float(thr), "temperature": float(t), "threshold_method": method, "val_metrics": metrics})
    if method == "sensitivity":
        out["target_sensitivity"] = float(target_sensitivity)
    else:
        out.pop("target_sensitivity", None)
    return out
