"""Fitting and measuring the not-a-chest-X-ray guard (``pneumoscan guard fit``).

The images come from :mod:`pneumoscan.workflows.guard_sources` (chest X-rays split by
patient; bundled and generated images that are not chest X-rays, whole sources held out).
Every image goes through the real reader (:func:`pneumoscan.data.io.read_image_with_meta` on
encoded bytes), as in ``predict``; the guard's rules refuse some, and a small classifier on
:mod:`pneumoscan.guard.features` is fitted on the rest. Evaluation uses only images not used
to fit. The result is the ``guard.json`` that :class:`pneumoscan.guard.Guard` loads.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..data.io import read_image_with_meta
from ..data.patients import parse_patient_id
from ..errors import ConfigError, DataError, PneumoscanError
from ..guard.core import DEFAULT_RULES, FORMAT, Guard
from ..guard.features import feature_names, image_features, template_features, thumbnail
from ..utils.io import atomic_write_text
from .guard_sources import Item, chest_items, other_items

log = logging.getLogger(__name__)

#: Reduced-size decoding used while fitting, as ``predict`` does for a 224-px model.
READ_MAX_SIDE = 224

# ----------------------------------------------------------------------------- featurise
@dataclass
class Row:
    """Features of one item, with the rule decision."""

    item: Item
    feats: dict[str, float] | None
    thumb: np.ndarray | None
    rule: str | None
    reason: str | None


def featurise(items: Iterable[Item], rules_guard: Guard, progress: bool = False) -> list[Row]:
    """Decode every item through the real reader, apply the guard's rules and compute the
    classifier features of the images the rules let through."""
    from tqdm import tqdm

    items = list(items)
    rows: list[Row] = []
    for it in tqdm(items, desc="guard features", disable=not progress, unit="img"):
        try:
            data, name = it.load()
            img, meta = read_image_with_meta(data, max_side=READ_MAX_SIDE, name=name)
        except PneumoscanError as e:
            log.warning("skipping %s: %s", it.source, e)
            continue
        refusal = rules_guard._rules(img, meta)
        if refusal is not None:
            rows.append(Row(it, None, None, refusal[0], refusal[1]))
            continue
        rows.append(Row(it, image_features(img, meta, None), thumbnail(img), None, None))
    return rows


# ----------------------------------------------------------------------------- fit
def _placeholder_guard() -> Guard:
    """A guard whose classifier accepts everything: only its rules are used while fitting."""
    return Guard({"format": FORMAT, "features": [], "mean": [], "scale": [], "coef": [], "intercept": 10.0, "threshold": 0.5})


def fit_guard(
    data: str | Path,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    fit_fraction: float = 0.35,
    target_acceptance: float = 0.995,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the guard's classifier, measure it on held-out images and write its parameters.

    Args:
        data: data root with ``chest_xray_224`` and ``chest_xray_fullres``.
        out: where to write ``guard.json`` (``None``: do not write).
        seed: seed of splits, augmentations and generators.
        fit_fraction: share of ``chest_xray_224/train`` patients used to fit.
        target_acceptance: the threshold is set so that this share of the fitting chest
            X-rays (cross-validated scores) is accepted.
        limit: at most this many ``chest_xray_224/train`` images (quick runs).
        progress: show progress bars.

    Returns:
        The report: acceptance of held-out chest X-rays and refusal of held-out other images,
        overall and per category, and the parameters.
    """
    t0 = time.time()
    data = Path(data)
    if not (data / "chest_xray_224").is_dir():
        raise DataError(f"{data} holds no chest_xray_224/ folder (pass the shared data root)")
    items = chest_items(data, fit_fraction, seed, limit=limit) + other_items(seed)
    rows = featurise(items, _placeholder_guard(), progress)
    report = fit_rows(rows, seed=seed, target_acceptance=target_acceptance)
    report.update({"fit_fraction": fit_fraction, "seconds": round(time.time() - t0, 1)})
    params = report["params"]
    params["fit"] = {
        "command": f"pneumoscan guard fit --data {data} --seed {seed}",
        "cxr_accepted": report["cxr_accepted"], "cxr_n": report["cxr_n"],
        "other_refused": report["other_refused"], "other_n": report["other_n"],
        "per_category": {k: round(v["rate"], 4) for k, v in report["per_category"].items()},
    }
    if out is not None:
        atomic_write_text(out, json.dumps(params, indent=1) + "\n")
        log.info("wrote %s", out)
    return report


def fit_rows(
    rows: list[Row], *, seed: int = 0, target_acceptance: float = 0.995, kind: str = "mlp", hidden: int = 16,
    alpha: float = 1e-2, C: float = 0.3,
) -> dict[str, Any]:
    """Fit the classifier on the ``fit`` rows and measure the whole guard on the ``eval`` rows.

    The threshold is the score that accepts ``target_acceptance`` of the fitting chest X-rays
    in 5-fold cross-validation grouped by patient / source image (clipped to [0.02, 0.9]).

    Args:
        rows: featurised items (:func:`featurise`).
        seed: random state of the network's initialisation (and recorded in the report).
        target_acceptance: share of fitting chest X-rays (cross-validated) to accept.
        kind: ``"mlp"`` (one hidden ReLU layer; the shipped choice: it refuses greyscale
            photographs better at the same acceptance) or ``"logistic"``.
        hidden: hidden units of the MLP.
        alpha: L2 penalty of the MLP.
        C: inverse L2 regularisation strength of the logistic regression.

    Returns:
        The report (see :func:`fit_guard`) with the parameters under ``params``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPClassifier

    if kind not in ("mlp", "logistic"):
        raise ConfigError(f"unknown guard classifier '{kind}' (mlp or logistic)")

    def make() -> Any:
        if kind == "mlp":
            return MLPClassifier((hidden,), alpha=alpha, max_iter=2000, random_state=seed)
        return LogisticRegression(C=C, class_weight="balanced", max_iter=5000)

    names = feature_names()
    train = [r for r in rows if r.item.split == "fit" and r.feats is not None]
    cxr_fit = [r for r in train if r.item.label == 1 and r.item.category == "cxr_fit"]
    if len(cxr_fit) < 20:
        raise DataError("too few chest X-rays to fit the guard")
    template = np.mean([r.thumb for r in cxr_fit], axis=0)
    template = (template - template.mean()) / (template.std() + 1e-6)

    def matrix(rs: list[Row]) -> np.ndarray:
        out_ = np.empty((len(rs), len(names)), np.float64)
        for i, r in enumerate(rs):
            f = {**r.feats, **template_features(r.thumb, template)}  # type: ignore[arg-type]
            out_[i] = [f[n] for n in names]
        return out_

    X = matrix(train)
    y = np.array([r.item.label for r in train])
    groups = np.array([parse_patient_id(r.item.source) if r.item.label else r.item.source for r in train])
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    Xs = (X - mean) / scale
    oof = np.zeros(len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of small folds
        for tr, te in GroupKFold(n_splits=5).split(Xs, y, groups):
            oof[te] = make().fit(Xs[tr], y[tr]).predict_proba(Xs[te])[:, 1]
        model = make().fit(Xs, y)
    pos_oof = np.sort(oof[y == 1])
    threshold = float(np.clip(pos_oof[int((1 - target_acceptance) * len(pos_oof))] - 1e-6, 0.02, 0.9))
    params: dict[str, Any] = {
        "format": FORMAT,
        "classifier": kind,
        "features": names,
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "threshold": threshold,
        "template": np.round(template, 6).tolist(),
        "rules": dict(DEFAULT_RULES),
    }
    if kind == "mlp":
        params.update({
            "hidden_weights": model.coefs_[0].tolist(), "hidden_bias": model.intercepts_[0].tolist(),
            "coef": model.coefs_[1][:, 0].tolist(), "intercept": float(model.intercepts_[1][0]),
        })
    else:
        params.update({"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0])})
    guard = Guard(params)

    # ---------------------------------------------------------------- measure on held-out images
    ev: dict[str, list[int]] = {}
    acc_cxr: list[int] = []
    ref_other: list[int] = []
    by_rule: dict[str, int] = {}
    for r in rows:
        if r.item.split != "eval":
            continue
        if r.feats is None:
            ok = False
            if r.item.label == 0:
                by_rule[r.rule or "?"] = by_rule.get(r.rule or "?", 0) + 1
        else:
            f = {**r.feats, **template_features(r.thumb, template)}  # type: ignore[arg-type]
            ok = guard._score(f) >= threshold
        correct = int(ok) if r.item.label == 1 else int(not ok)
        ev.setdefault(r.item.category, []).append(correct)
        if r.item.category.endswith("_augmented"):
            continue  # altered chest X-rays: reported per category, not in the headline rate
        (acc_cxr if r.item.label == 1 else ref_other).append(correct)
    per_cat = {k: {"n": len(v), "correct": int(sum(v)), "rate": float(np.mean(v))} for k, v in sorted(ev.items())}
    fit_counts: dict[str, int] = {}
    for r in rows:
        if r.item.split == "fit":
            fit_counts[r.item.category] = fit_counts.get(r.item.category, 0) + 1
    report = {
        "cxr_accepted": float(np.mean(acc_cxr)) if acc_cxr else float("nan"),
        "cxr_n": len(acc_cxr),
        "other_refused": float(np.mean(ref_other)) if ref_other else float("nan"),
        "other_n": len(ref_other),
        "per_category": per_cat,
        "refused_by_rule": by_rule,
        "fit_counts": fit_counts,
        "fit_oof_cxr_accepted": float((pos_oof >= threshold).mean()),
        "fit_oof_other_refused": float((oof[y == 0] < threshold).mean()),
        "threshold": threshold,
        "classifier": kind,
        "seed": seed,
        "params": params,
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """The fit report as text (per-category rates on held-out images)."""
    lines = [
        f"held-out chest X-rays accepted: {report['cxr_accepted']:.2%} of {report['cxr_n']} (unaltered images)",
        f"held-out other images refused:  {report['other_refused']:.2%} of {report['other_n']}",
        f"(threshold {report['threshold']:.3f}; cross-validated on the fit set: "
        f"{report['fit_oof_cxr_accepted']:.2%} chest accepted, {report['fit_oof_other_refused']:.2%} other refused)",
        "",
        f"{'category':<22}{'n':>6}  {'correct':>8}",
    ]
    for k, v in report["per_category"].items():
        what = "accepted" if k.startswith("cxr") else "refused"
        lines.append(f"{k:<22}{v['n']:>6}  {v['rate']:>8.2%} {what}")
    rules = report.get("refused_by_rule") or {}
    if rules:
        lines.append("")
        lines.append("held-out other images refused by a rule before the classifier: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())))
    return "\n".join(lines)


def default_data_root() -> Path | None:
    """``$PNEUMOSCAN_DATA`` or ``../shared/data`` beside the working directory, if present."""
    for cand in (os.environ.get("PNEUMOSCAN_DATA"), "../shared/data"):
        if cand and (Path(cand) / "chest_xray_224").is_dir():
            return Path(cand)
    return None
