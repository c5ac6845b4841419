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
from ..guard.canonical import prepare
from ..guard.features import TEMPLATE, feature_names, image_features, thumbnail
from ..utils.io import atomic_write_text
from .guard_sources import Item, chest_items, other_items
from .guard_transforms import FAMILIES

log = logging.getLogger(__name__)

#: Reduced-size decoding used while fitting, as ``predict`` does for a 224-px model.
READ_MAX_SIDE = 224

# ----------------------------------------------------------------------------- featurise
@dataclass
class Row:
    """Features of one item, with the rule decision.

    Attributes:
        item: the image.
        feats: its features (``None`` when a rule refused it).
        rule: the rule that refused it, or ``None``.
        reason: that rule's reason.
        colour: the reader found it coloured.
    """

    item: Item
    feats: dict[str, float] | None
    rule: str | None
    reason: str | None
    colour: bool = False


def _decode(it: Item) -> tuple[np.ndarray, dict[str, Any]] | None:
    try:
        data, name = it.load()
        return read_image_with_meta(data, max_side=READ_MAX_SIDE, name=name)
    except PneumoscanError as e:
        log.warning("skipping %s: %s", it.source, e)
        return None


def fit_template(items: Iterable[Item]) -> np.ndarray:
    """The mean chest X-ray thumbnail (z-scored ``TEMPLATE``²) of the unaltered fitting
    chest X-rays: the features' polarity reference and layout template.

    Args:
        items: the items; those of category ``cxr_fit`` are used.

    Raises:
        DataError: fewer than 20 such images.
    """
    thumbs = []
    for it in items:
        if it.category == "cxr_fit" and it.split == "fit" and (dec := _decode(it)) is not None:
            thumbs.append(thumbnail(dec[0]))
    if len(thumbs) < 20:
        raise DataError("too few chest X-rays to fit the guard")
    t = np.mean(thumbs, axis=0)
    return np.round((t - t.mean()) / (t.std() + 1e-6), 6)


def featurise(items: Iterable[Item], rules_guard: Guard, template: np.ndarray | None, progress: bool = False) -> list[Row]:
    """Decode every item through the real reader, apply the guard's rules and compute the
    classifier features of the images the rules let through.

    Args:
        items: the images.
        rules_guard: a guard whose rules are applied.
        template: the chest template (:func:`fit_template`).
        progress: show a progress bar.
    """
    from tqdm import tqdm

    items = list(items)
    rows: list[Row] = []
    for it in tqdm(items, desc="guard features", disable=not progress, unit="img"):
        if (dec := _decode(it)) is None:
            continue
        img, meta = dec
        colour = bool(meta.get("colour", False))
        p = prepare(img)
        refusal = rules_guard.rules_check(img, meta, p)
        if refusal is not None:
            rows.append(Row(it, None, refusal[0], refusal[1], colour))
            continue
        rows.append(Row(it, image_features(img, meta, template, p), None, None, colour))
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
    target_transformed: float = 0.985,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the guard's classifier, measure it on held-out images and write its parameters.

    Args:
        data: data root with ``chest_xray_224`` and ``chest_xray_fullres``.
        out: where to write ``guard.json`` (``None``: do not write).
        seed: seed of splits, augmentations and generators.
        fit_fraction: share of ``chest_xray_224/train`` patients used to fit.
        target_acceptance: the threshold is set so that this share of the unaltered fitting
            chest X-rays (cross-validated scores) is accepted...
        target_transformed: ... and this share of their transformed copies.
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
    template = fit_template(items)
    rows = featurise(items, _placeholder_guard(), template, progress)
    report = fit_rows(rows, template, seed=seed, target_acceptance=target_acceptance, target_transformed=target_transformed)
    report.update({"fit_fraction": fit_fraction, "seconds": round(time.time() - t0, 1)})
    params = report["params"]
    params["fit"] = {
        "command": f"pneumoscan guard fit --data {data} --seed {seed}", "seed": seed,
        "cxr_accepted": report["cxr_accepted"], "cxr_n": report["cxr_n"],
        "cxr_transformed_accepted": report["cxr_transformed_accepted"], "cxr_transformed_n": report["cxr_transformed_n"],
        "other_refused": report["other_refused"], "other_n": report["other_n"],
        "per_category": {k: round(v["rate"], 4) for k, v in report["per_category"].items()},
    }
    if out is not None:
        atomic_write_text(out, json.dumps(params, indent=1) + "\n")
        log.info("wrote %s", out)
    return report


def evaluate_guard(
    data: str | Path, guard: Guard | None = None, *, seed: int | None = None, fit_fraction: float = 0.35,
    per_family: int = 150, n_generated: int = 60, bundled_variants: int = 12, limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure a fitted guard on the held-out images of its fit, without refitting: held-out
    patients' chest X-rays (unaltered, and per transformation family with the ``HELD_OUT``
    profile), ``chest_xray_224/val``, ``chest_xray_fullres/val``, held-out bundled sources
    and generated images with the evaluation seeds (disjoint from the fitting ones).

    Args:
        data: data root with ``chest_xray_224`` and ``chest_xray_fullres``.
        guard: the guard (default: the shipped one).
        seed: the seed of the guard's fit (its patient split); default: the one recorded in
            its parameters, else 0.
        fit_fraction: share of ``chest_xray_224/train`` patients the fit used.
        per_family: held-out chest X-rays transformed by each family.
        n_generated: generated images per category (evaluation seeds).
        bundled_variants: augmented variants of each held-out bundled source image.
        limit: at most this many ``chest_xray_224/train`` images (quick runs; the patient
            split is then not the fit's).
        progress: show a progress bar.

    Returns:
        The report of :func:`measure` (with ``threshold`` and ``seed``).

    Raises:
        DataError: no ``chest_xray_224`` under ``data``.
    """
    guard = guard or Guard.default()
    if seed is None:
        seed = int((guard.params.get("fit") or {}).get("seed", 0))
    data = Path(data)
    if not (data / "chest_xray_224").is_dir():
        raise DataError(f"{data} holds no chest_xray_224/ folder (pass the shared data root)")
    items = chest_items(data, fit_fraction, seed, limit=limit, per_family=per_family)
    items = [it for it in items + other_items(seed, n_eval=n_generated, aug_eval=bundled_variants) if it.split == "eval"]
    rows = featurise(items, guard, guard.template, progress)
    report = measure(rows, guard)
    report.update({"threshold": guard.threshold, "seed": seed})
    return report


def fit_rows(
    rows: list[Row], template: np.ndarray, *, seed: int = 0, target_acceptance: float = 0.995,
    target_transformed: float = 0.985, kind: str = "mlp", hidden: int = 32, members: int = 5, alpha: float = 0.1,
    C: float = 0.3,
) -> dict[str, Any]:
    """Fit the classifier on the ``fit`` rows and measure the whole guard on the ``eval`` rows.

    The threshold is the highest score that accepts ``target_acceptance`` of the unaltered
    fitting chest X-rays and ``target_transformed`` of their transformed copies, in 5-fold
    cross-validation grouped by patient / source image (clipped to [0.02, 0.9]).

    Args:
        rows: featurised items (:func:`featurise`).
        template: the chest template the rows were featurised with.
        seed: random state of the network's initialisation (and recorded in the report).
        target_acceptance: share of unaltered fitting chest X-rays (cross-validated) to accept.
        target_transformed: the same for their transformed copies (``cxr_fit_<family>``).
        kind: ``"mlp"`` (one hidden ReLU layer; the shipped choice: it refuses greyscale
            photographs better at the same acceptance) or ``"logistic"``.
        hidden: hidden units of each MLP.
        members: MLPs fitted from different initialisations whose logits are averaged (one
            MLP with ``members * hidden`` units, as shipped: steadier than any one of them).
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
    if np.shape(template) != (TEMPLATE, TEMPLATE):
        raise ConfigError(f"the chest template must be {TEMPLATE}x{TEMPLATE}")

    def fit_model(Xa: np.ndarray, ya: np.ndarray) -> dict[str, Any]:
        if kind == "logistic":
            m = LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit(Xa, ya)
            return {"coef": m.coef_[0], "intercept": float(m.intercept_[0])}
        nets = [MLPClassifier((hidden,), alpha=alpha, max_iter=2000, random_state=seed + i).fit(Xa, ya) for i in range(members)]
        return {
            "hidden_weights": np.hstack([n.coefs_[0] for n in nets]),
            "hidden_bias": np.concatenate([n.intercepts_[0] for n in nets]),
            "coef": np.concatenate([n.coefs_[1][:, 0] for n in nets]) / members,
            "intercept": float(np.mean([n.intercepts_[1][0] for n in nets])),
        }

    def probability(w: dict[str, Any], Xa: np.ndarray) -> np.ndarray:
        h = np.maximum(Xa @ w["hidden_weights"] + w["hidden_bias"], 0.0) if "hidden_weights" in w else Xa
        return 1.0 / (1.0 + np.exp(-np.clip(h @ w["coef"] + w["intercept"], -50, 50)))

    names = feature_names()
    train = [r for r in rows if r.item.split == "fit" and r.feats is not None]
    if sum(1 for r in train if r.item.category == "cxr_fit") < 20:
        raise DataError("too few chest X-rays to fit the guard")
    X = np.array([[r.feats[n] for n in names] for r in train], np.float64)  # type: ignore[index]
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
            oof[te] = probability(fit_model(Xs[tr], y[tr]), Xs[te])
        model = fit_model(Xs, y)
    plain = np.array([r.item.category == "cxr_fit" for r in train])
    cuts = [np.sort(oof[sel])[int((1 - share) * np.count_nonzero(sel))] for sel, share in
            ((plain, target_acceptance), ((y == 1) & ~plain, target_transformed)) if np.any(sel)]
    threshold = float(np.clip(min(cuts) - 1e-6, 0.02, 0.9))
    pos_oof = oof[y == 1]
    params: dict[str, Any] = {
        "format": FORMAT,
        "classifier": kind,
        "features": names,
        "mean": _rounded(mean),
        "scale": _rounded(scale),
        "threshold": threshold,
        "template": np.asarray(template).tolist(),
        "clip_lo": _rounded(X.min(axis=0)),
        "clip_hi": _rounded(X.max(axis=0)),
        "rules": dict(DEFAULT_RULES),
    }
    params.update({k: _rounded(v) if isinstance(v, np.ndarray) else v for k, v in model.items()})
    report = measure(rows, Guard(params))
    report.update({
        "fit_counts": _counts(r.item.category for r in rows if r.item.split == "fit"),
        "fit_oof_cxr_accepted": float((pos_oof >= threshold).mean()),
        "fit_oof_other_refused": float((oof[y == 0] < threshold).mean()),
        "threshold": threshold,
        "classifier": kind,
        "seed": seed,
        "params": params,
    })
    return report


def _rounded(a: np.ndarray) -> list[Any]:
    """``a`` as nested lists of floats with 7 significant digits (a compact ``guard.json``;
    the report measures the rounded parameters)."""
    return np.vectorize(lambda v: float(f"{v:.7g}"), otypes=[object])(np.asarray(a, dtype=np.float64)).tolist()


def _counts(keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def _rates(outcomes: list[tuple[bool, str | None]]) -> dict[str, Any]:
    correct = [ok for ok, _ in outcomes]
    return {"n": len(correct), "correct": int(sum(correct)), "rate": float(np.mean(correct)) if correct else float("nan"),
            "refused_by": _counts(rule for _, rule in outcomes if rule)}


def measure(rows: list[Row], guard: Guard) -> dict[str, Any]:
    """Rates of a guard on the ``eval`` rows: chest X-rays accepted (unaltered images, and
    transformed ones per family: categories ``cxr_<family>``), other images refused (per
    category, and all colour ones together), with the rule or classifier that refused.

    Args:
        rows: featurised items (:func:`featurise`, with the guard's template).
        guard: the guard whose classifier scores the features (its rules were applied
            by :func:`featurise`).
    """
    per: dict[str, list[tuple[bool, str | None]]] = {}
    unaltered: list[tuple[bool, str | None]] = []
    transformed: list[tuple[bool, str | None]] = []
    other: list[tuple[bool, str | None]] = []
    colour: list[tuple[bool, str | None]] = []
    for r in rows:
        if r.item.split != "eval":
            continue
        rule = r.rule if r.feats is None else None if guard._score(r.feats) >= guard.threshold else "classifier"
        correct = (rule is None) if r.item.label == 1 else (rule is not None)
        outcome = (correct, rule)
        per.setdefault(r.item.category, []).append(outcome)
        if r.item.label == 0:
            other.append(outcome)
            if r.colour:
                colour.append(outcome)
        elif r.item.category.removeprefix("cxr_") in FAMILIES:
            transformed.append(outcome)
        else:
            unaltered.append(outcome)
    rates = {"unaltered": _rates(unaltered), "transformed": _rates(transformed), "other": _rates(other)}
    return {
        "cxr_accepted": rates["unaltered"]["rate"], "cxr_n": rates["unaltered"]["n"],
        "cxr_transformed_accepted": rates["transformed"]["rate"], "cxr_transformed_n": rates["transformed"]["n"],
        "other_refused": rates["other"]["rate"], "other_n": rates["other"]["n"],
        "colour_refused": _rates(colour),
        "per_category": {k: _rates(v) for k, v in sorted(per.items())},
        "refused_by_rule": _counts(rule for _, rule in other if rule and rule != "classifier"),
    }


def format_report(report: dict[str, Any]) -> str:
    """The fit report as text (per-category rates on held-out images, with what refused)."""
    lines = [
        f"held-out chest X-rays accepted: {report['cxr_accepted']:.2%} of {report['cxr_n']} (unaltered images)",
        f"held-out transformed chest X-rays accepted: {report['cxr_transformed_accepted']:.2%} of {report['cxr_transformed_n']}",
        f"held-out other images refused:  {report['other_refused']:.2%} of {report['other_n']}"
        f" (colour ones: {report['colour_refused']['rate']:.2%} of {report['colour_refused']['n']})",
        f"(threshold {report['threshold']:.3f}"
        + (f"; cross-validated on the fit set: {report['fit_oof_cxr_accepted']:.2%} chest accepted, "
           f"{report['fit_oof_other_refused']:.2%} other refused)" if "fit_oof_cxr_accepted" in report else ")"),
        "",
        f"{'category':<24}{'n':>6}  {'correct':>8}           refused by",
    ]
    for k, v in report["per_category"].items():
        what = "accepted" if k.startswith("cxr") else "refused "
        by = ", ".join(f"{r} {n}" for r, n in v["refused_by"].items())
        lines.append(f"{k:<24}{v['n']:>6}  {v['rate']:>8.2%} {what}  {by}")
    return "\n".join(lines)


def default_data_root() -> Path | None:
    """``$PNEUMOSCAN_DATA`` or ``../shared/data`` beside the working directory, if present."""
    for cand in (os.environ.get("PNEUMOSCAN_DATA"), "../shared/data"):
        if cand and (Path(cand) / "chest_xray_224").is_dir():
            return Path(cand)
    return None
