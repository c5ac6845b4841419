"""``pneumoscan evaluate``: score a labelled data set with a model bundle (or the shipped
default model) and write a report directory.

Files written (each atomically):

- ``metrics.json`` — every metric with a 95% interval (``n`` and ``ci_method`` per entry, the
  warnings of small classes per section), at the model's operating threshold and at 0.5; the
  threshold table (sensitivity, specificity, PPV, NPV at 0.1 … 0.9, the stored threshold and
  the thresholds reaching sensitivity 0.90/0.95/0.98 on these data); calibration before/after
  temperature scaling; ``training_overlap``: the images the model was trained or calibrated on,
  found by content (:func:`training_overlap`), also listed in the report;
- ``predictions.csv`` — ``path, true_label, probability, predicted_label, error, shift_score,
  warnings`` (a flagged image's warning: unlike the images the model was validated on);
- ``confusion_matrix.png``, ``roc.png`` (operating point, 0.5 and the table's thresholds
  marked), ``pr.png``, ``reliability.png``, ``errors.png`` (only when there are errors; with
  Grad-CAM maps) and ``training_curves.png`` (when the bundle carries its training history),
  see :func:`~pneumoscan.evaluation.plots.write_report_plots`;
- ``report.html`` (one self-contained page, images embedded, warnings in a box at the top) and
  ``report.md``, rendered by :mod:`pneumoscan.evaluation.render`.

This module computes; it formats nothing. Predictions go through
:class:`pneumoscan.inference.Predictor`, so the preprocessing, temperature and threshold are
exactly those of ``predict`` and the web service.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..core.calibration import calibration_summary, logit, sigmoid
from ..core.labels import CLASS_NAMES
from ..core.metrics import DEFAULT_RESAMPLES, bootstrap_metrics, expected_calibration_error
from ..data.datasets import Sample, load_samples, read_manifest
from ..data.fingerprints import ROLES
from ..errors import DataError, PneumoscanError
from ..utils.io import atomic_write_text
from .summaries import HIGH_SHIFT_SHARE, candidate_thresholds, interval_summary, most_confident_errors, overlap_line, threshold_row

if TYPE_CHECKING:
    from ..inference import Predictor
    from ..models.bundle import ModelBundle
    from .plots import ErrorItem

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs
def resolve_samples(data: str | Path, split: str | None, columns: str | dict[str, str] | None = None) -> tuple[list[Sample], str | None]:
    """Labelled images of a folder data set or CSV manifest.

    Args:
        data: ``ROOT`` with ``ROOT/<split>/{NORMAL,PNEUMONIA}``, a folder that directly holds
            ``NORMAL``/``PNEUMONIA``, or a CSV manifest.
        split: split to evaluate; ``None`` → ``"test"`` for a folder, every row for a manifest.
        columns: a manifest's own column names (``{"path": "filename", "label": "target"}``).

    Returns:
        The samples and the split actually used (``None`` when the folder or manifest was
        used as a whole).
    """
    p = Path(data)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    if p.suffix.lower() == ".csv":
        return read_manifest(p, split, columns), split
    split = split or "test"
    if (p / split).is_dir():
        return load_samples(p, split), split
    return load_samples(p, split), None


def training_overlap(predictor: Predictor, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluated images that the model was trained or calibrated on, found by content
    (file or pixel digests, whatever their names: :mod:`pneumoscan.data.fingerprints`), as the
    predictor flagged them.

    Args:
        predictor: the predictor that scored them (its ``seen`` record).
        rows: rows of :func:`predict_samples`.

    Returns:
        ``images`` (how many), ``train`` and ``calibration`` (how many of each), ``files`` (each
        ``{"path", "role"}``); ``None`` when the model carries no record of its images (an older
        bundle).
    """
    if predictor.seen is None:
        return None
    flagged = [r for r in rows if r.get("seen_as")]
    return {"images": len(flagged), **{role: sum(1 for r in flagged if r["seen_as"] == role) for role in ROLES},
            "files": [{"path": str(r["path"]), "role": r["seen_as"]} for r in flagged]}


def run_history(bundle: ModelBundle) -> list[dict[str, Any]]:
    """The training history of a bundle's run: the run's ``history.csv`` beside the bundle
    file when present (every epoch, also those after the best one), else the history stored in
    the bundle's provenance (epochs up to the bundle's).

    Args:
        bundle: the model (its ``path`` locates the run directory).
    """
    stored = list(bundle.provenance.get("history") or [])
    f = Path(bundle.path).parent / "history.csv" if bundle.path is not None else None
    if f is None or not f.is_file():
        return stored
    try:
        with open(f, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return stored
    parsed = []
    for r in rows:
        d: dict[str, Any] = {}
        for k, v in r.items():
            if k is None or v in (None, ""):
                continue
            try:
                d[k] = int(v) if k in ("epoch", "world_size") else float(v)
            except ValueError:
                d[k] = v
        parsed.append(d)
    return parsed if len(parsed) >= len(stored) else stored


def best_epoch(bundle: ModelBundle) -> int | None:
    """The epoch whose weights the bundle holds (provenance of a deployable bundle, or the
    training state of a resumable one); ``None`` when unknown.

    Args:
        bundle: the model.
    """
    e = bundle.provenance.get("best_epoch", bundle.training.get("best_epoch"))
    return None if e is None else int(e)


def model_facts(bundle: ModelBundle) -> dict[str, Any]:
    """What the reports show about a model beyond its name, threshold and temperature.

    Args:
        bundle: the model.

    Returns:
        ``arch``, ``input_size``, ``in_channels``, ``trainable_parameters``, ``epochs_run``
        and ``best_epoch`` (``None`` where unknown).
    """
    n = bundle.provenance.get("trainable_parameters")
    return {
        "arch": bundle.arch, "input_size": bundle.preprocessing.input_size, "in_channels": bundle.preprocessing.in_channels,
        "trainable_parameters": None if n is None else int(n), "epochs_run": len(run_history(bundle)),
        "best_epoch": best_epoch(bundle),
    }


# --------------------------------------------------------------------------- predictions
def predict_samples(predictor: Predictor, samples: Sequence[Sample]) -> tuple[list[dict[str, Any]], float]:
    """Predict every sample through ``predictor.predict_paths``; unreadable files are kept
    with their error.

    Args:
        predictor: a :class:`~pneumoscan.inference.Predictor`.
        samples: labelled images.

    Returns:
        One dict per sample (``path``, ``true_label``, ``label``, ``probability``,
        ``predicted_label``, ``error``, ``shift_score``, ``warnings``, ``seen_as``: ``"train"`` or
        ``"calibration"`` for an image the model was built on) and the elapsed seconds.
    """
    t0 = time.perf_counter()
    preds = list(predictor.predict_paths([s.path for s in samples]))
    elapsed = time.perf_counter() - t0
    rows = []
    for s, pr in zip(samples, preds, strict=True):
        rows.append({
            "path": s.path, "true_label": CLASS_NAMES[s.label], "label": s.label, "probability": pr.probability,
            "predicted_label": pr.label, "error": pr.error, "shift_score": pr.extra.get("shift_score"), "warnings": list(pr.warnings),
            "seen_as": pr.extra.get("seen_as"),
        })
    return rows, elapsed


def shift_summary(predictor: Predictor, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How many predicted images the distribution-shift check flagged (``None`` when the
    predictor has no check: :mod:`pneumoscan.inference.shift`).

    Args:
        predictor: the predictor that scored them.
        rows: rows of :func:`predict_samples` (those with a probability).

    Returns:
        ``threshold``, ``n_scored``, ``n_flagged``, ``share``, ``validation_share`` (the share of
        the model's own validation images flagged) and ``population``.
    """
    if predictor.shift is None:
        return None
    det = predictor.shift.detector
    scored = [r["shift_score"] for r in rows if r.get("shift_score") is not None]
    flagged = sum(1 for s in scored if s > det.threshold)
    return {"threshold": det.threshold, "n_scored": len(scored), "n_flagged": flagged, "share": flagged / len(scored) if scored else None,
            "validation_share": det.stats.get("val_flag_rate"), "population": det.population}


def write_predictions_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``predictions.csv``: one row per image (atomic).

    Args:
        rows: rows from :func:`predict_samples`.
        path: destination file.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", "probability", "predicted_label", "error", "shift_score", "warnings"])
    for r in rows:
        prob = "" if r["probability"] is None else f"{r['probability']:.6f}"
        shift = "" if r.get("shift_score") is None else f"{r['shift_score']:.3f}"
        w.writerow([r["path"], r["true_label"], prob, r["predicted_label"] or "", r["error"] or "", shift, "; ".join(r.get("warnings") or [])])
    atomic_write_text(path, buf.getvalue())


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON (NumPy scalars as numbers, NaN/inf as ``null``), atomically.

    Args:
        obj: dicts, lists and scalars.
        path: destination file.
    """
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def error_panels(predictor: Predictor, errors: dict[str, list[dict[str, Any]]]) -> dict[str, list[ErrorItem]]:
    """The images of the most confident errors (at most 256 px), each with its Grad-CAM map when
    the predictor can explain (``predictor.explain_arrays``), else without; unreadable files are
    left out.

    Args:
        predictor: the predictor that made the errors.
        errors: :func:`~pneumoscan.evaluation.summaries.most_confident_errors` output.

    Returns:
        The same keys, each a list of :class:`~pneumoscan.evaluation.plots.ErrorItem`.
    """
    from ..data.io import read_image
    from .plots import ErrorItem, error_caption

    out: dict[str, list[ErrorItem]] = {}
    for kind, rows in errors.items():
        shown = []
        for r in rows:
            try:
                shown.append((r, read_image(r["path"], max_side=256)))
            except PneumoscanError as e:
                log.warning("error grid: %s left out: %s", Path(r["path"]).name, e)
        cams: list[np.ndarray | None] = [None] * len(shown)
        if shown:
            try:
                cams = list(predictor.explain_arrays([img for _, img in shown]))
            except PneumoscanError as e:
                log.warning("error grid without Grad-CAM: %s", e)
        out[kind] = [ErrorItem(img, error_caption(r["path"], r["probability"]), cam) for (r, img), cam in zip(shown, cams, strict=True)]
    return out


# --------------------------------------------------------------------------- the report
def evaluate_model(
    data: str | Path,
    out: str | Path,
    checkpoint: str | Path | None = None,
    *,
    split: str | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    summary: bool = True,
    n_errors: int = 6,
    columns: str | dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on a labelled data set and write the report directory.

    Args:
        data: folder data set, class-folder directory or CSV manifest.
        out: report directory.
        checkpoint: bundle file or run directory; ``None`` → the shipped default model.
        split: split of a folder data set (default ``test``) or of a manifest's ``split`` column.
        n_resamples: bootstrap resamples for the confidence intervals.
        seed: bootstrap seed.
        device: torch device of the predictor.
        batch_size: images per forward pass.
        summary: include ``pneumoscan data summary`` of ``data`` in the report.
        n_errors: how many confident false positives and false negatives to show.
        columns: a manifest's own column names (see :func:`pneumoscan.data.datasets.read_manifest`).

    Returns:
        The content of ``metrics.json``.
    """
    from ..inference import load_predictor
    from ..utils.version import __version__
    from .plots import write_report_plots
    from .render import render_report_html, render_report_markdown

    out = Path(out)
    samples, used_split = resolve_samples(data, split, columns)
    predictor = load_predictor(checkpoint, backend="torch", device=device, batch_size=batch_size, guard=False)  # every image counts
    bundle = predictor.bundle
    log.info("evaluating %s on %d images of %s%s", bundle.name, len(samples), data, f" (split {used_split})" if used_split else "")
    rows, elapsed = predict_samples(predictor, samples)
    overlap = training_overlap(predictor, rows)
    if overlap and overlap["images"]:
        log.warning("warning: %s", overlap_line(overlap, len(rows)))
    failed = [r for r in rows if r["probability"] is None]
    for r in failed:
        log.warning("skipped %s: %s", r["path"], r["error"])
    ok = [r for r in rows if r["probability"] is not None]
    if not ok:
        raise DataError(f"none of the {len(rows)} images could be read")
    y = np.array([r["label"] for r in ok], dtype=np.int64)
    p = np.array([r["probability"] for r in ok], dtype=np.float64)
    thr, temp = bundle.threshold, bundle.temperature
    candidates = candidate_thresholds(y, p, thr, bundle.threshold_method)
    keys = {f"candidate_{i}": t for i, (t, _) in enumerate(candidates)}
    sections = bootstrap_metrics(y, p, {"at_operating_threshold": thr, "at_0.5": 0.5, **keys}, n_resamples=n_resamples, seed=seed)
    table = [threshold_row(sections.pop(k), labels) for k, (_, labels) in zip(keys, candidates, strict=True)]
    for w in sections["at_operating_threshold"]["warnings"]:  # small or missing classes, collapsed bootstraps
        log.warning("warning: %s", w)

    val_logits = np.asarray(bundle.provenance.get("val_logits") or [], dtype=np.float64)
    val_labels = np.asarray(bundle.provenance.get("val_labels") or [], dtype=np.int64)
    raw_p = sigmoid(logit(p) * temp)  # the uncalibrated (T = 1) probabilities of the same images
    calib = {
        "temperature": temp,
        "validation": calibration_summary(val_logits, val_labels, temp) if val_logits.size else None,
        "evaluated": {"ece_uncalibrated": expected_calibration_error(y, raw_p), "ece_calibrated": expected_calibration_error(y, p)},
    }
    report: dict[str, Any] = {
        "model": bundle.name,
        "model_name": bundle.arch,
        "checkpoint": str(bundle.path) if checkpoint is not None else "default model",
        "sha256": bundle.sha256 or None,
        "threshold": thr,
        "threshold_method": bundle.threshold_method,
        "temperature": temp,
        "data": str(data),
        "split": used_split,
        "n_images": len(rows),
        "n_unreadable": len(failed),
        "at_operating_threshold": sections["at_operating_threshold"],
        "at_0.5": sections["at_0.5"],
        "calibration": calib,
        "threshold_table": table,
        "bootstrap": interval_summary(sections["at_operating_threshold"], n_resamples, seed),
        "training_overlap": overlap,
        "shift": shift_summary(predictor, ok),
        "inference": {"seconds": elapsed, "images_per_s": len(rows) / max(elapsed, 1e-9), "device": device, "batch_size": batch_size},
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pneumoscan_version": __version__,
    }
    if report["shift"] and (report["shift"]["share"] or 0) > HIGH_SHIFT_SHARE:
        log.warning("warning: %d of %d images (%.0f %%) are unlike the images the model was validated on",
                    report["shift"]["n_flagged"], report["shift"]["n_scored"], 100 * report["shift"]["share"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "metrics.json")
    write_predictions_csv(rows, out / "predictions.csv")
    errors = most_confident_errors(ok, thr, n_errors)
    plots = write_report_plots(out, y, p, raw_p, thr, temp, sections, error_panels(predictor, errors), run_history(bundle), table)
    ctx = {
        "report": report, "plots": plots, "data_summary": _data_summary(data) if summary else None, "failed": failed, "errors": errors,
        "model": model_facts(bundle), "config": bundle.provenance.get("config"),
    }
    atomic_write_text(out / "report.md", render_report_markdown(ctx))
    atomic_write_text(out / "report.html", render_report_html(ctx))
    log.info("report written to %s", out)
    return report


def _data_summary(data: str | Path) -> dict[str, Any] | None:
    from ..data.summary import summarize

    try:
        return summarize(data)
    except (PneumoscanError, OSError) as e:
        log.warning("data summary unavailable: %s", e)
        return None
