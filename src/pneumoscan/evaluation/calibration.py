"""Temperature scaling and operating-point (threshold) selection, fitted on validation."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


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
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if z.numel() < 2 or y.min() == y.max():
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
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
