"""The summary of a cross-validation (:mod:`.cv`): out-of-fold predictions, per-fold metrics
with mean ± sd, a pooled operating point, and a ROC figure, in ``OUT/cv/``.

- ``oof.csv``: every training image once, scored by the fold model that did not train on it:
  ``path, patient, label`` (0 = NORMAL, 1 = PNEUMONIA), ``fold``, ``logit`` (fp32, the deployed
  model's) and ``probability`` (``sigmoid(logit / T)`` with that fold's fitted temperature).
- per fold: ROC-AUC, and accuracy, sensitivity and specificity at the fold's own threshold
  (chosen on that same fold: optimistic) and at the common threshold below.
- the **operating point** is chosen on the pooled out-of-fold probabilities with the run's rule
  (``threshold_method``, ``target_sensitivity``): the honest estimate of what that rule gives on
  patients the model has not seen.
- ``cv_summary.json`` (everything), ``cv_summary.md`` (tables), ``cv_roc.png`` (per-fold and pooled ROC).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import TrainConfig
from ..core.calibration import select_threshold, sigmoid
from ..core.labels import CLASS_NAMES
from ..core.metrics import brier_score, expected_calibration_error, roc_auc, threshold_metrics
from ..data.datasets import read_manifest
from ..errors import CheckpointError, DataError
from ..evaluation.plots import plot_roc
from ..models.bundle import load_bundle
from ..models.validation import jsonable
from ..utils.io import atomic_write_text

log = logging.getLogger(__name__)

#: Columns of ``oof.csv``.
OOF_COLUMNS = ("path", "patient", "label", "fold", "logit", "probability")
_AT = ("sensitivity", "specificity", "accuracy")


def write_cv_summary(out: str | Path, cfg: TrainConfig, k: int) -> dict[str, Any]:
    """Collect the folds' validation predictions and write ``OUT/cv/{oof.csv, cv_summary.json,
    cv_summary.md, cv_roc.png}``.

    Args:
        out: the cross-validation directory (holds ``fold-1`` .. ``fold-K``).
        cfg: the shared settings (the threshold rule).
        k: number of folds.

    Returns:
        The content of ``cv_summary.json``: ``folds``, ``n_images``, ``n_patients``,
        ``threshold_method``, ``target_sensitivity``, ``per_fold``, ``mean_sd``, ``oof`` and
        ``summary_file``.

    Raises:
        CheckpointError: a fold whose ``best.pt`` does not match its validation split.
    """
    out = Path(out)
    folds = [_fold_predictions(out / f"fold-{i}", i) for i in range(1, k + 1)]
    y = np.concatenate([f["labels"] for f in folds])
    p = np.concatenate([f["probs"] for f in folds])
    method, target = cfg.threshold_method, cfg.target_sensitivity
    thr = select_threshold(p, y, method, target)
    per_fold = []
    for f in folds:
        per_fold.append({
            "fold": f["fold"], "run_dir": f"fold-{f['fold']}", "n": int(f["labels"].size), "n_patients": len(set(f["patients"])),
            "pneumonia_share": float(f["labels"].mean()), "best_epoch": f["best_epoch"], "temperature": f["temperature"],
            "threshold": f["threshold"], "roc_auc": roc_auc(f["labels"], f["probs"]),
            "at_fold_threshold": _at(f["labels"], f["probs"], f["threshold"]), "at_common_threshold": _at(f["labels"], f["probs"], thr),
            "val_shift_auc": f["val_shift_auc"],
        })
    summary = {
        "folds": k, "n_images": int(y.size), "n_patients": len({pt for f in folds for pt in f["patients"]}),
        "split_seed": cfg.data.split_seed, "threshold_method": method, "target_sensitivity": target if method == "sensitivity" else None,
        "per_fold": per_fold,
        "mean_sd": {
            "roc_auc": _mean_sd([r["roc_auc"] for r in per_fold]),
            "val_shift_auc": _mean_sd([r["val_shift_auc"] for r in per_fold]),
            "at_fold_threshold": {m: _mean_sd([r["at_fold_threshold"][m] for r in per_fold]) for m in _AT},
            "at_common_threshold": {m: _mean_sd([r["at_common_threshold"][m] for r in per_fold]) for m in _AT},
        },
        "oof": {
            "n": int(y.size), "roc_auc": roc_auc(y, p), "brier": brier_score(y, p), "ece": expected_calibration_error(y, p),
            "operating_point": {"method": method, "threshold": float(thr), **_at(y, p, thr)},
        },
        "summary_file": str(out / "cv" / "cv_summary.json"),
    }
    cv = out / "cv"
    _write_oof(folds, cv / "oof.csv")
    atomic_write_text(cv / "cv_summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
    atomic_write_text(cv / "cv_summary.md", render_markdown(summary))
    op = summary["oof"]["operating_point"]
    plot_roc([*((f"fold {f['fold']}", f["labels"], f["probs"]) for f in folds), ("pooled out-of-fold", y, p)], cv / "cv_roc.png",
             operating_points=[(f"out-of-fold operating point ({method}, t={thr:.3f})", 1.0 - op["specificity"], op["sensitivity"])],
             title=f"{k}-fold patient-grouped cross-validation")
    ms = summary["mean_sd"]
    log.info("cross-validation: AUC %.4f ± %.4f over %d folds, pooled out-of-fold AUC %.4f; operating point %.3f (%s): "
             "sensitivity %.3f, specificity %.3f; summary in %s", ms["roc_auc"]["mean"], ms["roc_auc"]["sd"], k,
             summary["oof"]["roc_auc"], thr, method, op["sensitivity"], op["specificity"], cv)
    return summary


def _fold_predictions(run: Path, fold: int) -> dict[str, Any]:
    """A finished fold's validation images, labels, deployed logits and calibrated probabilities."""
    best = load_bundle(run / "best.pt")
    samples = read_manifest(run / "split_val.csv")
    z = np.asarray(best.provenance.get("val_logits") or [], dtype=np.float64)
    y = np.asarray(best.provenance.get("val_labels") or [], dtype=np.int64)
    if z.size != len(samples) or y.tolist() != [s.label for s in samples]:
        raise CheckpointError(f"{run / 'best.pt'}: its validation predictions do not match {run / 'split_val.csv'}")
    history = best.provenance.get("history") or []
    at_best = next((r for r in history if r.get("epoch") == best.provenance.get("best_epoch")), {})
    return {
        "fold": fold, "paths": [s.path for s in samples], "patients": [s.patient for s in samples], "labels": y, "logits": z,
        "probs": sigmoid(z / best.temperature), "temperature": float(best.temperature), "threshold": float(best.threshold),
        "best_epoch": best.provenance.get("best_epoch"), "val_shift_auc": float(at_best.get("val_shift_auc", float("nan"))),
    }


def _at(y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, float]:
    m = threshold_metrics(y, p, thr)
    return {k: float(m[k]) for k in _AT}


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if v.size > 1 else 0.0}


@dataclass(frozen=True)
class OofTable:
    """The rows of an ``oof.csv`` (:func:`read_oof`), in file order.

    Attributes:
        path: the file.
        sha256: hash of its bytes (recorded by whatever is calibrated on it).
        folds: each row's fold (1-based).
        logits: each row's out-of-fold logit.
        labels: each row's label (0 = NORMAL, 1 = PNEUMONIA).
    """

    path: Path
    sha256: str
    folds: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    def describe(self) -> dict[str, Any]:
        """Where a calibration on these rows came from: file name, hash, folds and counts."""
        return {"source": "cv-oof", "file": f"{self.path.parent.name}/{self.path.name}", "sha256": self.sha256,
                "folds": sorted({int(f) for f in self.folds.tolist()}), "n": int(self.labels.size),
                "n_per_class": {c: int((self.labels == i).sum()) for i, c in enumerate(CLASS_NAMES)}}


def read_oof(path: str | Path) -> OofTable:
    """Read a cross-validation's out-of-fold predictions (``OUT/cv/oof.csv``).

    Args:
        path: the file.

    Raises:
        DataError: an unreadable file or one without rows.
    """
    f = Path(path)
    try:
        data = f.read_bytes()
        rows = list(csv.DictReader(data.decode("utf-8").splitlines()))
        table = [(int(r["fold"]), float(r["logit"]), int(r["label"])) for r in rows]
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{f}: unreadable out-of-fold predictions ({e.__class__.__name__}: {e})") from e
    if not table:
        raise DataError(f"{f}: no out-of-fold predictions")
    cols = list(zip(*table))
    return OofTable(f, hashlib.sha256(data).hexdigest(), np.asarray(cols[0], dtype=np.int64), np.asarray(cols[1], dtype=np.float64),
                    np.asarray(cols[2], dtype=np.int64))


def _write_oof(folds: Sequence[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(OOF_COLUMNS)
    for f in folds:
        for row in zip(f["paths"], f["patients"], f["labels"].tolist(), f["logits"].tolist(), f["probs"].tolist()):
            w.writerow([row[0], row[1], row[2], f["fold"], f"{row[3]:.6g}", f"{row[4]:.6g}"])
    atomic_write_text(path, buf.getvalue())


def render_markdown(summary: dict[str, Any]) -> str:
    """``cv_summary.md``: per-fold table, mean ± sd, and the pooled out-of-fold operating point.

    Args:
        summary: the content of ``cv_summary.json``.
    """
    s, ms, oof = summary, summary["mean_sd"], summary["oof"]
    op = oof["operating_point"]
    rule = op["method"] + (f" (sensitivity >= {s['target_sensitivity']:g})" if s.get("target_sensitivity") else "")
    lines = [
        f"# {s['folds']}-fold patient-grouped cross-validation", "",
        f"{s['n_images']} training images of {s['n_patients']} patients; folds stratified by class and grouped by patient "
        f"(seed {s['split_seed']}). The test split is not used.", "",
        "Sensitivity / specificity / accuracy at the fold's own threshold (chosen on that fold: optimistic) and at the "
        f"common threshold {op['threshold']:.3f} chosen on the pooled out-of-fold predictions ({rule}).", "",
        "| fold | images | patients | PNEUMONIA | best epoch | AUC | shifted AUC | threshold | sens / spec / acc (own) | sens / spec / acc (common) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["per_fold"]:
        lines.append(f"| {r['fold']} | {r['n']} | {r['n_patients']} | {r['pneumonia_share']:.1%} | {r['best_epoch']} | {_f(r['roc_auc'])} "
                     f"| {_f(r['val_shift_auc'])} | {r['threshold']:.3f} | {_triple(r['at_fold_threshold'])} | {_triple(r['at_common_threshold'])} |")
    own, common = ms["at_fold_threshold"], ms["at_common_threshold"]
    lines += [
        f"| **mean ± sd** | | | | | {_pm(ms['roc_auc'])} | {_pm(ms['val_shift_auc'])} | | "
        f"{' / '.join(_pm(own[m]) for m in _AT)} | {' / '.join(_pm(common[m]) for m in _AT)} |", "",
        "## Pooled out-of-fold predictions", "",
        f"- images: {oof['n']}; ROC-AUC {_f(oof['roc_auc'])}; Brier {_f(oof['brier'])}; ECE {_f(oof['ece'])}",
        f"- operating point ({rule}): threshold {op['threshold']:.3f} on the calibrated probability; sensitivity "
        f"{_f(op['sensitivity'])}, specificity {_f(op['specificity'])}, accuracy {_f(op['accuracy'])}",
        "", "Files: `oof.csv` (every training image once), `cv_summary.json`, `cv_roc.png`.", "",
    ]
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _pm(d: dict[str, float]) -> str:
    return f"{_f(d['mean'])} ± {_f(d['sd'])}"


def _triple(d: dict[str, float]) -> str:
    return " / ".join(_f(d[m]) for m in _AT)
