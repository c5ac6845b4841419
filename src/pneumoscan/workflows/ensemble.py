"""Ensembles of trained models (``pneumoscan ensemble RUN_OR_BUNDLE... --out BUNDLE``).

The members' logits are averaged (:class:`~pneumoscan.models.ensemble.EnsembleNet`) and the
result ships as one :class:`~pneumoscan.models.bundle.ModelBundle` (``arch="ensemble"``), so
predict, evaluate, serve, export and calibrate take it like any model; its Grad-CAM is the mean
of the members' maps.

Where its temperature and threshold come from (``calibrate``):

* ``"oof"`` — the default when every member is a fold of one cross-validation directory
  (``pneumoscan train --folds K``) holding ``cv/oof.csv``: they are fitted on the pooled
  out-of-fold logits of the member folds. An image's only honest logit is that of the fold model
  that did not train on it (the ensemble's own logit on a training image mixes in K-1 models
  that saw it), so the out-of-fold logits stand in for the ensemble's; the provenance says so.
* a labelled folder or CSV manifest — the ensemble predicts it (fp32, the predict path) and is
  calibrated on those logits;
* ``"member"`` — member 0's temperature, threshold and rule are kept (a warning says they were
  not fitted for the ensemble; the default when neither of the above is available).

The threshold rule (``method``/``target``) is the members' (member 0's) unless given. Members
must share the input side (the only preprocessing outside the networks): anything else is
refused in one line.
"""
from __future__ import annotations

import copy
import functools
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.calibration import fit_operating_point
from ..core.labels import CLASS_NAMES
from ..errors import CheckpointError, ConfigError, DataError, ModelError
from ..evaluation.model_card import render_model_card
from ..data.fingerprints import SeenImages, fingerprint_files
from ..models.bundle import ModelBundle, bundle_ref, load_bundle, save_bundle
from ..models.seen import SEEN_KEY, seen_images
from ..models.ensemble import ENSEMBLE_ARCH, member_state_dict
from ..utils.io import atomic_write_text
from .cv_summary import read_oof

log = logging.getLogger(__name__)

#: A cross-validation directory's out-of-fold predictions, and its folds' folder names.
OOF_FILE = "cv/oof.csv"
_FOLD = re.compile(r"^fold-(\d+)$")


def expand_sources(sources: Sequence[str | Path]) -> list[Path]:
    """The member bundle files of ``pneumoscan ensemble``'s arguments.

    Args:
        sources: bundle files, run directories (their ``best.pt``) or cross-validation
            directories (every ``fold-<k>/best.pt``, in fold order).

    Raises:
        CheckpointError: a missing file, a directory that holds no run, or an unfinished fold.
    """
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        folds = [d for d in p.iterdir() if _FOLD.match(d.name) and d.is_dir()] if p.is_dir() and not (p / "best.pt").exists() else []
        for d in sorted(folds, key=lambda d: int(d.name.split("-")[1])):
            if not (d / "best.pt").is_file():
                raise CheckpointError(f"{d} has no best.pt (an unfinished cross-validation? resume it with pneumoscan train --resume {p})")
            out.append(d / "best.pt")
        if not folds:
            out.append(bundle_ref(p).path)
    return out


def _cv_fold(path: Path) -> tuple[Path, int] | None:
    """``(cross-validation directory, fold)`` of a bundle that is a fold's ``best.pt`` in a
    directory holding :data:`OOF_FILE`, else ``None``."""
    m = _FOLD.match(path.parent.name)
    return (path.parent.parent, int(m.group(1))) if m and (path.parent.parent / OOF_FILE).is_file() else None


def combine(members: Sequence[ModelBundle], name: str | None = None) -> ModelBundle:
    """One ensemble bundle of trained members (calibration: member 0's, until refitted).

    Args:
        members: the trained models (at least two, one input side, no ensembles).
        name: the ensemble's weights name (default ``ensemble<N>-<arch>-res<size>``).

    Raises:
        ModelError: fewer than two members, an ensemble among them, the same weights twice,
            members without weights or of different input sides.
    """
    if len(members) < 2:
        raise ModelError(f"an ensemble needs at least two members (got {len(members)})")
    labels = [b.name or str(b.path) for b in members]
    nested = [lab for lab, b in zip(labels, members) if b.arch == ENSEMBLE_ARCH]
    if nested:
        raise ModelError(f"{nested[0]} is an ensemble itself; give its members' runs instead")
    shas = [b.sha256 for b in members]
    dup = next((lab for lab, s in zip(labels, shas) if s and shas.count(s) > 1), None)
    if dup:
        raise ModelError(f"the same weights are given twice ({dup})")
    if any(b.state_dict is None for b in members):
        raise ModelError("every ensemble member needs its PyTorch weights (a .pt bundle, not an ONNX file)")
    if len({b.input_size for b in members}) != 1:  # (the resize rule is always "stretch": validate_bundle)
        listed = ", ".join(f"{lab} ({b.input_size} px)" for lab, b in zip(labels, members))
        raise ModelError(f"ensemble members must share their input size: {listed}")
    first = members[0]
    archs = sorted({b.arch for b in members})
    prov = {
        "ensemble": {
            "combination": "mean of the members' logits",
            "members": [{"name": b.name, "sha256": b.sha256, "path": str(b.path) if b.path else None, "arch": b.arch,
                         "temperature": b.temperature, "threshold": b.threshold, "threshold_method": b.threshold_method,
                         "val_metrics": dict(b.val_metrics)} for b in members],
        },
        # the members' shared recipe and data (not member 0's split: the members' runs hold theirs)
        "config": copy.deepcopy(first.provenance.get("config") or {}),
        "data": {k: v for k, v in (first.provenance.get("data") or {}).items() if k in ("root", "train_split")},
    }
    n_params = [b.provenance.get("trainable_parameters") for b in members]
    if all(n is not None for n in n_params):
        prov["trainable_parameters"] = int(sum(n_params))  # type: ignore[arg-type]
    seen = [s for s in (seen_images(b) for b in members) if s is not None]
    if seen:  # every image any member was trained or calibrated on
        prov[SEEN_KEY] = functools.reduce(SeenImages.merged, seen).to_dict()
    return ModelBundle(
        arch=ENSEMBLE_ARCH, preprocessing=first.preprocessing,
        arch_kwargs={"members": [{"arch": b.arch, "arch_kwargs": {**b.arch_kwargs, "input_size": b.input_size}} for b in members]},
        state_dict=member_state_dict([b.state_dict for b in members]),  # type: ignore[misc]
        threshold=first.threshold, threshold_method=first.threshold_method, temperature=first.temperature,
        name=name or f"ensemble{len(members)}-{'+'.join(archs)}-res{first.input_size}", provenance=prov,
    )


def oof_logits(members: Sequence[ModelBundle]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """The pooled out-of-fold logits and labels of the member folds, when every member is a
    fold of one cross-validation directory holding :data:`OOF_FILE`; else ``None``.

    Each fold's rows must be that fold's stored validation logits (the file is checked against
    the members, so a fold retrained since is noticed).

    Returns:
        ``(logits, labels, source)``: ``source`` describes the file (path, sha256, folds, counts).

    Raises:
        DataError: an unreadable ``oof.csv``, or one that does not match the members.
    """
    where = [_cv_fold(Path(b.path)) if b.path else None for b in members]
    if any(w is None for w in where) or len({w[0].resolve() for w in where}) != 1:  # type: ignore[index]
        return None
    cv_dir = where[0][0]  # type: ignore[index]
    folds = [w[1] for w in where]  # type: ignore[index]
    table = read_oof(cv_dir / OOF_FILE)
    z, y = [], []
    for fold, b in zip(folds, members):
        fz = table.logits[table.folds == fold]
        stored = np.asarray(b.provenance.get("val_logits") or [], dtype=np.float64)
        if fz.size == 0 or (stored.size and (stored.size != fz.size or not np.allclose(fz, stored, rtol=1e-4, atol=1e-4))):
            raise DataError(f"{table.path} does not hold the validation logits of fold-{fold}/best.pt (retrained since?); "
                            "rerun the cross-validation summary or give --calibrate DIR")
        z.append(fz)
        y.append(table.labels[table.folds == fold])
    logits, labels = np.concatenate(z), np.concatenate(y)
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{table.path}: the member folds' out-of-fold images are of a single class; give --calibrate DIR")
    source = {
        "source": "cv-oof", "file": str(table.path), "sha256": table.sha256, "folds": folds,
        "n": int(labels.size), "n_per_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
        "rows_left_out": int(table.labels.size - labels.size),
        "note": "pooled out-of-fold logits of the member folds (each image scored by the fold model that did not "
                "train on it) stand in for the ensemble's own logits, which are not out-of-sample on these images",
    }
    return logits, labels, source


def _site_calibrated(
    ens: ModelBundle, members: Sequence[ModelBundle], data: str | Path, method: str, target: float, fit_t: bool, columns: str | None,
) -> ModelBundle:
    """The ensemble calibrated on its own logits on labelled images
    (:func:`~pneumoscan.evaluation.recalibrate.site_calibrate`), with a warning when members
    were trained or calibrated on some of them (found by content: their records of the images
    they saw)."""
    from ..evaluation.evaluate import resolve_samples
    from ..evaluation.recalibrate import site_calibrate

    samples, _ = resolve_samples(data, "val", columns)
    records = [(b.name, s) for b in members if (s := seen_images(b)) is not None]
    digests = fingerprint_files([s.path for s in samples]) if records else []
    overlap = {name: n for name, rec in records if (n := sum(rec.match(d) is not None for d in digests))}
    for member, n in overlap.items():
        log.warning("%d of the %d calibration images were among the training/calibration images of %s: the fitted operating point "
                    "is optimistic", n, len(samples), member)
    res = site_calibrate(ens if fit_t else ens.replace(temperature=1.0), data, split="val", columns=columns, method=method,
                         target_sensitivity=target, refit_temperature=fit_t)
    for w in res.warnings:
        log.warning("%s", w)
    cal = {**res.bundle.provenance["calibration"], "source": "folder", "n": res.data["n"], "training_overlap": overlap}
    return res.bundle.replace(provenance={**res.bundle.provenance, "calibration": cal})


def _rule(first: ModelBundle, method: str | None, target: float | None) -> tuple[str, float, bool]:
    """The threshold rule, target sensitivity and whether to fit a temperature: given, else
    member 0's (its training config, then its stored calibration)."""
    cfg = first.provenance.get("config") or {}
    cal = first.provenance.get("calibration") or {}
    m = method or first.threshold_method or cfg.get("threshold_method") or "youden"
    t = target if target is not None else cal.get("target_sensitivity") or cfg.get("target_sensitivity") or 0.95
    return str(m), float(t), bool(cfg.get("calibrate", True))


def _calibration_words(cal: dict[str, Any]) -> str:
    """Where the ensemble's operating point comes from, in words (its model card's validation)."""
    if cal["source"] == "cv-oof":
        return f"pooled out-of-fold predictions of folds {', '.join(map(str, cal['folds']))} ({OOF_FILE}) of the member folds"
    if cal["source"] == "folder":
        return f"the ensemble's predictions on {cal['data']['description']}"
    return f"kept from member 0 ({cal.get('member')}): not fitted for the ensemble"


def make_ensemble(
    sources: Sequence[str | Path], out: str | Path, *, calibrate: str | None = None, method: str | None = None,
    target: float | None = None, name: str | None = None, columns: str | None = None, card: bool = True,
) -> dict[str, Any]:
    """Combine trained models into one calibrated ensemble bundle (and its model card).

    Args:
        sources: bundle files, run directories or cross-validation directories (their folds).
        out: the ensemble's ``.pt`` file, or a directory (its ``best.pt`` and ``MODEL_CARD.md``).
        calibrate: ``"oof"``, ``"member"``, or a labelled folder / CSV manifest (see the
            module's description); ``None``: ``"oof"`` when possible, else ``"member"``.
        method: threshold rule (``youden``, ``sensitivity``, ``f1``; default: member 0's).
        target: target sensitivity of the ``sensitivity`` rule (default: member 0's).
        name: the weights' name (default ``ensemble<N>-<arch>-res<size>``).
        columns: a CSV manifest's own column names (``--calibrate FILE.csv``).
        card: also write a model card beside the bundle.

    Returns:
        ``path``, ``sha256``, ``name``, ``members`` (names), ``calibration`` (source and counts),
        ``temperature``, ``threshold``, ``threshold_method``, ``val_metrics`` and ``model_card``.

    Raises:
        ModelError: members that cannot form an ensemble (see :func:`combine`).
        ConfigError: ``calibrate="oof"`` without a cross-validation, a bad threshold rule.
        CheckpointError, DataError: unreadable members or calibration data.
    """
    members = [load_bundle(p) for p in expand_sources(sources)]
    ens = combine(members, name)
    ens.build_model()  # the weights fit the architecture: refused now, not at the first prediction
    m, t, fit_t = _rule(members[0], method, target)
    found = oof_logits(members) if calibrate in (None, "oof") else None
    if calibrate == "oof" and found is None:
        raise ConfigError("--calibrate oof needs members that are folds of one cross-validation directory with "
                          f"{OOF_FILE} (pneumoscan train --folds K); give --calibrate DIR or member")
    if found is not None:
        logits, labels, cal = found
        op = fit_operating_point(logits, labels, m, t, temperature=None if fit_t else 1.0)
        cal = {**cal, "method": op.method, "target_sensitivity": op.target_sensitivity, "refit_temperature": fit_t}
        ens = ens.replace(temperature=op.temperature, threshold=op.threshold, threshold_method=op.method, val_metrics=op.val_metrics,
                          provenance={**ens.provenance, "calibration": cal, "val_logits": logits.tolist(), "val_labels": labels.tolist(),
                                      "val_logits_source": cal["source"]})
    elif calibrate not in (None, "oof", "member"):
        ens = _site_calibrated(ens, members, calibrate, m, t, fit_t, columns)  # type: ignore[arg-type]
    elif method is not None or target is not None:
        raise ConfigError("--method/--target need calibration data: members from one cross-validation (cv/oof.csv) "
                          "or --calibrate DIR")
    else:
        log.warning("the ensemble keeps member 0's calibration (temperature %.3f, threshold %.3f, %s): it was not fitted "
                    "for the ensemble; give --calibrate DIR (labelled images) to fit it", ens.temperature, ens.threshold,
                    ens.threshold_method)
        ens.provenance["calibration"] = {"source": "member-0", "member": members[0].name, "n": 0}
    cal = ens.provenance["calibration"]
    if ens.provenance["config"]:
        ens.provenance["config"].setdefault("data", {})["val_source"] = _calibration_words(cal)
    out = Path(out)
    path = out if out.suffix == ".pt" else out / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(ens, path)
    saved = load_bundle(path)  # round trip: what predict, serve and export will read
    card_path = None
    if card:
        card_path = path.with_suffix(".MODEL_CARD.md") if out.suffix == ".pt" else path.parent / "MODEL_CARD.md"
        atomic_write_text(card_path, render_model_card(saved))
    log.info("ensemble of %d: %s; temperature %.3f, threshold %.3f (%s) from %s (n=%d); written %s", len(members),
             ", ".join(b.name for b in members), saved.temperature, saved.threshold, saved.threshold_method, cal["source"],
             cal.get("n", 0), path)
    return {
        "path": str(path), "sha256": saved.sha256, "name": saved.name, "members": [b.name for b in members], "calibration": cal,
        "temperature": saved.temperature, "threshold": saved.threshold, "threshold_method": saved.threshold_method,
        "val_metrics": dict(saved.val_metrics), "model_card": str(card_path) if card_path else None,
    }

