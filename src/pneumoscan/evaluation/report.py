"""``pneumoscan evaluate``: score a labelled data set with a checkpoint (or the shipped
default model) and write a report directory.

Files written (each atomically):

- ``metrics.json`` — every metric with a 95% stratified bootstrap interval, at the model's
  operating threshold and at 0.5, plus calibration before/after temperature scaling;
- ``predictions.csv`` — ``path, true_label, probability, predicted_label, error``;
- ``confusion_matrix.png``, ``roc.png``, ``pr.png``, ``reliability.png``, ``errors.png`` and
  ``training_curves.png`` (when the checkpoint carries its training history);
- ``report.html`` (one self-contained page, images embedded) and ``report.md``.

Predictions go through :class:`pneumoscan.inference.Predictor`, so the preprocessing,
temperature and threshold are exactly those of ``predict`` and the web service.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ..data.datasets import CLASS_NAMES, Sample, load_samples, read_manifest
from ..errors import DataError, PneumoscanError
from ..utils.io import atomic_write_text
from ..core.calibration import calibration_summary, logit, sigmoid
from ..core.metrics import (
    DEFAULT_RESAMPLES, METRIC_KEYS, METRIC_LABELS, bootstrap_metrics, expected_calibration_error, format_value,
)

log = logging.getLogger(__name__)

PLOTS = {
    "confusion_matrix": "confusion_matrix.png",
    "roc": "roc.png",
    "pr": "pr.png",
    "reliability": "reliability.png",
    "errors": "errors.png",
    "training_curves": "training_curves.png",
}


# --------------------------------------------------------------------------- loading
def load_model(checkpoint: str | Path | None = None, **predictor_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The :class:`Predictor` of ``checkpoint`` (``None`` → the shipped default model, as in
    ``load_predictor(None)``) and the checkpoint dict it was built from (for the stored
    validation logits and training history, which the predictor does not keep).

    Args:
        checkpoint: ``.pt`` file, run directory or ``None``.
        **predictor_kwargs: ``device``, ``batch_size``.
    """
    from ..inference.predictor import Predictor
    from ..training.checkpoint import load_checkpoint

    if checkpoint is None:
        from ..inference.default_model import load_default_checkpoint

        ckpt = load_default_checkpoint()
    else:
        ckpt = load_checkpoint(checkpoint)
    return Predictor.from_checkpoint(ckpt, **predictor_kwargs), ckpt


def resolve_samples(data: str | Path, split: str | None) -> tuple[list[Sample], str | None]:
    """Labelled images of a folder data set or CSV manifest.

    Args:
        data: ``ROOT`` with ``ROOT/<split>/{NORMAL,PNEUMONIA}``, a folder that directly holds
            ``NORMAL``/``PNEUMONIA``, or a CSV manifest.
        split: split to evaluate; ``None`` → ``"test"`` for a folder, every row for a manifest.

    Returns:
        The samples and the split actually used (``None`` when the folder or manifest was
        used as a whole).
    """
    p = Path(data)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    if p.suffix.lower() == ".csv":
        return read_manifest(p, split), split
    split = split or "test"
    if (p / split).is_dir():
        return load_samples(p, split), split
    return load_samples(p, split), None


def training_overlap(ckpt: dict[str, Any], samples: Sequence[Sample]) -> dict[str, int] | None:
    """Images and patients of ``samples`` that the checkpoint's run trained on, when the
    run's ``split_train.csv`` sits beside the checkpoint (a leakage check).

    Args:
        ckpt: checkpoint dict (its ``_path`` locates the run directory).
        samples: the images being evaluated.

    Returns:
        ``{"images": int, "patients": int}``, or ``None`` when the training split is unknown.
    """
    path = ckpt.get("_path")
    if not path:
        return None
    train_csv = Path(path).parent / "split_train.csv"
    if not train_csv.is_file():
        return None
    try:
        train = read_manifest(train_csv)
    except PneumoscanError:
        return None
    tr_paths = {str(Path(s.path).resolve()) for s in train}
    tr_patients = {s.patient for s in train}
    return {
        "images": sum(1 for s in samples if str(Path(s.path).resolve()) in tr_paths),
        "patients": len({s.patient for s in samples} & tr_patients),
    }


def run_history(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """The training history of a checkpoint's run: the run's ``history.csv`` beside the
    checkpoint when present (every epoch, also those after the best one), else the
    ``history`` stored in the checkpoint (epochs up to the checkpoint's).

    Args:
        ckpt: checkpoint dict (its ``_path`` locates the run directory).
    """
    stored = list(ckpt.get("history") or [])
    path = ckpt.get("_path")
    f = Path(path).parent / "history.csv" if path else None
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


def predict_samples(predictor: Any, samples: Sequence[Sample]) -> tuple[list[dict[str, Any]], float]:
    """Predict every sample through ``predictor.predict_paths``; unreadable files are kept
    with their error.

    Args:
        predictor: a :class:`~pneumoscan.inference.Predictor`.
        samples: labelled images.

    Returns:
        One dict per sample (``path``, ``true_label``, ``label``, ``probability``,
        ``predicted_label``, ``error``) and the elapsed seconds.
    """
    t0 = time.perf_counter()
    preds = list(predictor.predict_paths([s.path for s in samples]))
    elapsed = time.perf_counter() - t0
    rows = []
    for s, pr in zip(samples, preds, strict=True):
        rows.append({
            "path": s.path, "true_label": CLASS_NAMES[s.label], "label": s.label, "probability": pr.probability,
            "predicted_label": pr.label, "error": pr.error,
        })
    return rows, elapsed


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
) -> dict[str, Any]:
    """Evaluate a model on a labelled data set and write the report directory.

    Args:
        data: folder data set, class-folder directory or CSV manifest.
        out: report directory.
        checkpoint: checkpoint file or run directory; ``None`` → the shipped default model.
        split: split of a folder data set (default ``test``) or of a manifest's ``split`` column.
        n_resamples: bootstrap resamples for the confidence intervals.
        seed: bootstrap seed.
        device: torch device of the predictor.
        batch_size: images per forward pass.
        summary: include ``pneumoscan data summary`` of ``data`` in the report.
        n_errors: how many confident false positives and false negatives to show.

    Returns:
        The content of ``metrics.json``.
    """
    from ..utils.version import __version__

    out = Path(out)
    samples, used_split = resolve_samples(data, split)
    predictor, ckpt = load_model(checkpoint, device=device, batch_size=batch_size)
    log.info("evaluating %s on %d images of %s%s", predictor.name, len(samples), data, f" (split {used_split})" if used_split else "")
    overlap = training_overlap(ckpt, samples)
    if overlap and (overlap["images"] or overlap["patients"]):
        log.warning("warning: %d image(s) / %d patient(s) of this data set were used to train the model: the figures are optimistic",
                    overlap["images"], overlap["patients"])
    rows, elapsed = predict_samples(predictor, samples)
    failed = [r for r in rows if r["probability"] is None]
    for r in failed:
        log.warning("skipped %s: %s", r["path"], r["error"])
    ok = [r for r in rows if r["probability"] is not None]
    if not ok:
        raise DataError(f"none of the {len(rows)} images could be read")
    y = np.array([r["label"] for r in ok], dtype=np.int64)
    p = np.array([r["probability"] for r in ok], dtype=np.float64)
    thr, temp = predictor.threshold, predictor.temperature
    sections = bootstrap_metrics(y, p, {"at_operating_threshold": thr, "at_0.5": 0.5}, n_resamples=n_resamples, seed=seed)
    if y.min() == y.max():
        log.warning("warning: only %s images: ROC-AUC, PR-AUC and class-conditional metrics are undefined", CLASS_NAMES[int(y[0])])

    val_logits = np.asarray(ckpt.get("val_logits") or [], dtype=np.float64)
    val_labels = np.asarray(ckpt.get("val_labels") or [], dtype=np.int64)
    raw_p = sigmoid(logit(p) * temp)  # the uncalibrated (T = 1) probabilities of the same images
    calib = {
        "temperature": temp,
        "validation": calibration_summary(val_logits, val_labels, temp) if val_logits.size else None,
        "evaluated": {"ece_uncalibrated": expected_calibration_error(y, raw_p), "ece_calibrated": expected_calibration_error(y, p)},
    }
    meta = predictor.metadata
    report: dict[str, Any] = {
        "model": predictor.name,
        "model_name": meta.get("model_name"),
        "checkpoint": str(ckpt.get("_path", "")) if checkpoint is not None else "default model",
        "sha256": meta.get("sha256"),
        "threshold": thr,
        "threshold_method": meta.get("threshold_method"),
        "temperature": temp,
        "data": str(data),
        "split": used_split,
        "n_images": len(rows),
        "n_unreadable": len(failed),
        "at_operating_threshold": sections["at_operating_threshold"],
        "at_0.5": sections["at_0.5"],
        "calibration": calib,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "ci": 0.95, "method": "stratified percentile bootstrap"},
        "training_overlap": overlap,
        "inference": {"seconds": elapsed, "images_per_s": len(rows) / max(elapsed, 1e-9), "device": device, "batch_size": batch_size},
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pneumoscan_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(report), indent=2) + "\n")
    write_predictions_csv(rows, out / "predictions.csv")
    plots = write_plots(out, y, p, raw_p, thr, sections, ckpt, [r for r in ok], n_errors)
    data_summary = _data_summary(data) if summary else None
    ctx = {"report": report, "plots": plots, "data_summary": data_summary, "ckpt": ckpt, "failed": failed}
    atomic_write_text(out / "report.md", render_markdown(ctx))
    atomic_write_text(out / "report.html", render_html(ctx, out))
    log.info("report written to %s", out)
    return report


def write_predictions_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``predictions.csv``: one row per image (atomic).

    Args:
        rows: rows from :func:`predict_samples`.
        path: destination file.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", "probability", "predicted_label", "error"])
    for r in rows:
        prob = "" if r["probability"] is None else f"{r['probability']:.6f}"
        w.writerow([r["path"], r["true_label"], prob, r["predicted_label"] or "", r["error"] or ""])
    atomic_write_text(path, buf.getvalue())


def write_plots(
    out: Path, y: np.ndarray, p: np.ndarray, raw_p: np.ndarray, thr: float, sections: dict[str, Any],
    ckpt: dict[str, Any], rows: Sequence[dict[str, Any]], n_errors: int = 6,
) -> dict[str, Path]:
    """Write the report's PNG plots.

    Args:
        out: report directory.
        y: 0/1 labels of the readable images.
        p: their calibrated probabilities.
        raw_p: their uncalibrated (``T = 1``) probabilities.
        thr: operating threshold.
        sections: :func:`~pneumoscan.core.metrics.bootstrap_metrics` output.
        ckpt: checkpoint dict (temperature, training history).
        rows: readable prediction rows (for the error grid's images).
        n_errors: images per row of the error grid.

    Returns:
        ``{plot key: path}`` of the plots written.
    """
    from ..data.io import read_image
    from .plots import (
        plot_confusion_matrix, plot_error_grid, plot_precision_recall, plot_reliability, plot_roc, plot_training_curves,
    )

    written: dict[str, Path] = {}
    op, half = sections["at_operating_threshold"], sections["at_0.5"]
    plot_confusion_matrix(op["confusion_matrix"]["value"], out / PLOTS["confusion_matrix"], thr)
    written["confusion_matrix"] = out / PLOTS["confusion_matrix"]
    both = y.min() != y.max()
    if both:
        pts = [(f"operating point (t={thr:.3f})", 1 - op["specificity"]["value"], op["sensitivity"]["value"]),
               ("threshold 0.5", 1 - half["specificity"]["value"], half["sensitivity"]["value"])]
        plot_roc([("model", y, p)], out / PLOTS["roc"], pts)
        written["roc"] = out / PLOTS["roc"]
        pr_pts = [(f"operating point (t={thr:.3f})", op["recall"]["value"], op["precision"]["value"]),
                  ("threshold 0.5", half["recall"]["value"], half["precision"]["value"])]
        # precision is undefined (None) when nothing is predicted PNEUMONIA: no marker then
        plot_precision_recall([("model", y, p)], out / PLOTS["pr"], [pt for pt in pr_pts if pt[2] is not None])
        written["pr"] = out / PLOTS["pr"]
    temp = float(ckpt.get("temperature") or 1.0)
    series = [("calibrated", y, p)] if abs(temp - 1.0) < 1e-9 else [("uncalibrated (T=1)", y, raw_p), (f"calibrated (T={temp:.2f})", y, p)]
    plot_reliability(series, out / PLOTS["reliability"])
    written["reliability"] = out / PLOTS["reliability"]
    # most confident errors
    fp = sorted((r for r in rows if r["label"] == 0 and r["probability"] >= thr), key=lambda r: -r["probability"])[:n_errors]
    fn = sorted((r for r in rows if r["label"] == 1 and r["probability"] < thr), key=lambda r: r["probability"])[:n_errors]

    def load(items: list[dict[str, Any]]) -> list[tuple[np.ndarray, str]]:
        res = []
        for r in items:
            try:
                img = read_image(r["path"], max_side=256)
            except PneumoscanError:
                continue
            res.append((img, f"{Path(r['path']).name[:24]}\np={r['probability']:.3f}"))
        return res

    plot_error_grid(load(fp), load(fn), out / PLOTS["errors"], per_row=max(n_errors, 1))
    written["errors"] = out / PLOTS["errors"]
    hist = run_history(ckpt)
    if hist and all(k in hist[0] for k in ("epoch", "train_loss", "val_loss", "train_acc", "val_acc", "val_auc")):
        plot_training_curves(hist, out / PLOTS["training_curves"])
        written["training_curves"] = out / PLOTS["training_curves"]
    return written


def _data_summary(data: str | Path) -> dict[str, Any] | None:
    from ..data.summary import summarize

    try:
        return summarize(data)
    except (PneumoscanError, OSError) as e:
        log.warning("data summary unavailable: %s", e)
        return None


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


# --------------------------------------------------------------------------- rendering helpers
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 8px rgba(0,0,0,.06)}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #e3e7ee;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 8px}.sub{color:#5a6474;margin:0 0 18px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:14px;display:block;overflow-x:auto;max-width:100%}th,td{border:1px solid #d9dee7;padding:5px 10px;text-align:right}
th{background:#eef1f6}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:14px}.grid figure{margin:0;flex:1 1 320px}
figure img{max-width:100%;border:1px solid #e3e7ee}figcaption{font-size:13px;color:#5a6474}
.kpi{display:flex;gap:14px;flex-wrap:wrap;margin:10px 0}.kpi div{background:#eef4ff;border-radius:6px;padding:10px 14px;min-width:150px}
.kpi b{display:block;font-size:22px}.kpi span{font-size:12px;color:#5a6474}
pre{background:#f3f5f8;padding:10px;overflow:auto;font-size:12px}.warn{background:#fff4e0;border-left:4px solid #f0a020;padding:8px 12px}
.note{font-size:13px;color:#5a6474}
"""


def img_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:`` URI (base64) for a self-contained page.

    Args:
        path: PNG file.
    """
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table with escaped cells.

    Args:
        header: column titles.
        rows: cell values.
    """
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes in cells escaped).

    Args:
        header: column titles.
        rows: cell values.
    """
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML page (inline CSS, no external resources).

    Args:
        title: page title.
        body: HTML of the page body.
    """
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width,initial-scale=1\"><title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def _metric_rows(report: dict[str, Any]) -> list[list[str]]:
    op, half = report["at_operating_threshold"], report["at_0.5"]
    return [[METRIC_LABELS[k], format_value(op.get(k)), format_value(half.get(k))] for k in METRIC_KEYS if k != "recall"]


def _cm_rows(sec: dict[str, Any]) -> list[list[Any]]:
    cm, ci = sec["confusion_matrix"]["value"], sec["confusion_matrix"]["ci95"]
    f = lambda v, c: f"{v} [{c[0]}, {c[1]}]" if c[0] is not None else str(v)  # noqa: E731
    return [["true NORMAL", f(cm[0][0], ci[0][0]), f(cm[0][1], ci[0][1])], ["true PNEUMONIA", f(cm[1][0], ci[1][0]), f(cm[1][1], ci[1][1])]]


def _summary_rows(s: dict[str, Any]) -> list[list[Any]]:
    return [[name, d["images"], d["per_class"]["NORMAL"], d["per_class"]["PNEUMONIA"], f"{100 * d['pneumonia_share']:.1f}%",
             d["patients"], f"{d['width']['median']:.0f}×{d['height']['median']:.0f}", d["unreadable"]] for name, d in s["splits"].items()]


_SUMMARY_HEADER = ["split", "images", "NORMAL", "PNEUMONIA", "% pneumonia", "patients", "median size", "unreadable"]


def _model_rows(report: dict[str, Any], ckpt: dict[str, Any]) -> list[list[Any]]:
    prep = ckpt.get("preprocessing") or {}
    rows = [
        ["weights", report["model"]], ["architecture", report.get("model_name")], ["checkpoint", report["checkpoint"]],
        ["input", f"{prep.get('input_size', '?')}² greyscale → {prep.get('in_channels', '?')}-channel backbone"],
        ["trainable parameters", f"{int(ckpt['trainable_parameters']):,}" if ckpt.get("trainable_parameters") is not None else "?"],
        ["epochs run / best epoch", f"{len(run_history(ckpt))} / {ckpt.get('best_epoch', '?')}"],
        ["operating threshold", f"{report['threshold']:.4f} ({report.get('threshold_method') or 'not fitted'})"],
        ["temperature", f"{report['temperature']:.4f}"],
    ]
    if report.get("sha256"):
        rows.append(["sha256", report["sha256"]])
    return rows


def _calibration_lines(report: dict[str, Any]) -> list[str]:
    c = report["calibration"]
    lines = []
    v = c.get("validation")
    if v and v.get("ece_before") is not None:
        lines.append(f"Validation split stored in the checkpoint (n = {v['n']}): ECE {v['ece_before']:.4f} at T = 1 → "
                     f"{v['ece_after']:.4f} with the fitted T = {v['temperature']:.3f} (NLL {v['nll_before']:.4f} → {v['nll_after']:.4f}).")
    else:
        lines.append("The checkpoint stores no validation logits, so the validation calibration cannot be shown.")
    e = c["evaluated"]
    lines.append(f"This data set: ECE {e['ece_uncalibrated']:.4f} uncalibrated (T = 1) → {e['ece_calibrated']:.4f} calibrated.")
    return lines


def _intro_lines(report: dict[str, Any]) -> list[str]:
    op = report["at_operating_threshold"]
    lines = [f"{op['n']} images evaluated (NORMAL {op['n_per_class']['NORMAL']}, PNEUMONIA {op['n_per_class']['PNEUMONIA']})"
             + (f"; {report['n_unreadable']} unreadable file(s) skipped" if report["n_unreadable"] else "") + "."]
    lines.append(f"95% confidence intervals: {report['bootstrap']['method']}, {report['bootstrap']['resamples']:,} resamples, "
                 f"seed {report['bootstrap']['seed']}.")
    return lines


def _overlap_warning(report: dict[str, Any]) -> str | None:
    ov = report.get("training_overlap")
    if ov and (ov["images"] or ov["patients"]):
        return (f"{ov['images']} image(s) and {ov['patients']} patient(s) of this data set were in the model's training split: "
                "these figures are optimistic and not a held-out result.")
    return None


def render_markdown(ctx: dict[str, Any]) -> str:
    """``report.md`` (plots referenced by file name, next to the report).

    Args:
        ctx: ``report`` (metrics.json content), ``plots``, ``data_summary``, ``ckpt``, ``failed``.
    """
    r, plots = ctx["report"], ctx["plots"]
    L = [f"# Evaluation of {r['model']}", "", f"Data: `{r['data']}`" + (f" (split `{r['split']}`)" if r["split"] else "")
         + f" · generated {r['generated']} · pneumoscan {r['pneumoscan_version']}", ""]
    L += _intro_lines(r)
    if (w := _overlap_warning(r)):
        L += ["", f"> **Warning:** {w}"]
    L += ["", "## Metrics", "", md_table(["metric", f"at operating threshold {r['threshold']:.4f}", "at 0.5"], _metric_rows(r))]
    L += ["", "Confusion matrix at the operating threshold (counts [95% CI]):", "",
          md_table(["", "predicted NORMAL", "predicted PNEUMONIA"], _cm_rows(r["at_operating_threshold"]))]
    L += ["", "Confusion matrix at 0.5:", "", md_table(["", "predicted NORMAL", "predicted PNEUMONIA"], _cm_rows(r["at_0.5"]))]
    L += ["", "## Calibration", ""] + [f"- {x}" for x in _calibration_lines(r)]
    L += ["", "## Plots", ""]
    for key, title in (("confusion_matrix", "Confusion matrix"), ("roc", "ROC curve"), ("pr", "Precision-recall curve"),
                       ("reliability", "Reliability diagram"), ("training_curves", "Training curves"), ("errors", "Most confident errors")):
        if key in plots:
            L.append(f"![{title}]({plots[key].name})")
            L.append("")
    if ctx["failed"]:
        L += ["## Unreadable files", ""] + [f"- `{f['path']}`: {f['error']}" for f in ctx["failed"]] + [""]
    if ctx["data_summary"]:
        s = ctx["data_summary"]
        L += ["## Data summary", "", md_table(_SUMMARY_HEADER, _summary_rows(s)), "",
              f"Exact duplicates (sha256): {s['duplicates']['groups']} groups, {s['duplicates']['cross_split_groups']} across splits."]
        L += [f"Patients shared {k}: {v}." for k, v in s["patients_shared_between_splits"].items()] + [""]
    L += ["## Model", "", md_table(["", ""], _model_rows(r, ctx["ckpt"])), ""]
    cfg = ctx["ckpt"].get("config")
    if cfg:
        L += ["### Training configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(L)


def render_html(ctx: dict[str, Any], out: Path) -> str:
    """``report.html``: one page with every plot embedded as base64.

    Args:
        ctx: as for :func:`render_markdown`.
        out: report directory.
    """
    r, plots = ctx["report"], ctx["plots"]
    op = r["at_operating_threshold"]
    esc = html.escape
    B = [f"<h1>Evaluation of {esc(r['model'])}</h1>",
         f"<p class='sub'>Data <code>{esc(r['data'])}</code>{' (split ' + esc(r['split']) + ')' if r['split'] else ''} · "
         f"generated {esc(r['generated'])} · pneumoscan {esc(r['pneumoscan_version'])}</p>"]
    B += [f"<p>{esc(x)}</p>" for x in _intro_lines(r)]
    if (w := _overlap_warning(r)):
        B.append(f"<p class='warn'><b>Warning:</b> {esc(w)}</p>")
    kpis = [("ROC-AUC", op["roc_auc"]), ("sensitivity", op["sensitivity"]), ("specificity", op["specificity"]), ("accuracy", op["accuracy"])]
    B.append("<div class='kpi'>" + "".join(
        f"<div><b>{esc(format_value(v).split(' ')[0])}</b><span>{esc(k)} · 95% CI {esc(' '.join(format_value(v).split(' ')[1:]) or 'n/a')}</span></div>"
        for k, v in kpis) + "</div>")
    B.append(f"<p class='note'>Operating threshold {r['threshold']:.4f} ({esc(str(r.get('threshold_method') or 'not fitted'))}), "
             f"temperature {r['temperature']:.3f}.</p>")
    B += ["<h2>Metrics</h2>", html_table(["metric", f"at operating threshold {r['threshold']:.4f}", "at 0.5"], _metric_rows(r))]
    B += ["<h3>Confusion matrix at the operating threshold (counts [95% CI])</h3>",
          html_table(["", "predicted NORMAL", "predicted PNEUMONIA"], _cm_rows(op)),
          "<h3>Confusion matrix at 0.5</h3>", html_table(["", "predicted NORMAL", "predicted PNEUMONIA"], _cm_rows(r["at_0.5"]))]

    def fig(key: str, caption: str) -> str:
        if key not in plots:
            return ""
        return f"<figure><img alt='{esc(caption)}' src='{img_data_uri(plots[key])}'><figcaption>{esc(caption)}</figcaption></figure>"

    B += ["<h2>Discrimination</h2><div class='grid'>", fig("confusion_matrix", "Confusion matrix at the operating threshold"),
          fig("roc", "ROC curve; circle: operating point, square: threshold 0.5"),
          fig("pr", "Precision-recall curve"), "</div>"]
    B += ["<h2>Calibration</h2>"] + [f"<p>{esc(x)}</p>" for x in _calibration_lines(r)]
    B += ["<div class='grid'>", fig("reliability", "Reliability diagram (equal-width bins, those of the ECE)"), "</div>"]
    B += ["<h2>Most confident errors</h2>", fig("errors", "Top row: NORMAL images predicted PNEUMONIA with the highest probability; "
                                                          "bottom row: PNEUMONIA images predicted NORMAL with the lowest.")]
    if ctx["failed"]:
        B += ["<h3>Unreadable files</h3>", html_table(["file", "reason"], [[f["path"], f["error"]] for f in ctx["failed"]])]
    if "training_curves" in plots:
        B += ["<h2>Training</h2>", fig("training_curves", "Training history stored in the checkpoint")]
    s = ctx["data_summary"]
    if s:
        B += ["<h2>Data summary</h2>", html_table(_SUMMARY_HEADER, _summary_rows(s)),
              f"<p>Exact duplicates (sha256): {s['duplicates']['groups']} groups, {s['duplicates']['cross_split_groups']} across splits. "
              + " ".join(f"Patients shared {esc(k)}: {v}." for k, v in s["patients_shared_between_splits"].items()) + "</p>"]
    B += ["<h2>Model</h2>", html_table(["", ""], _model_rows(r, ctx["ckpt"]))]
    cfg = ctx["ckpt"].get("config")
    if cfg:
        B += ["<h3>Training configuration</h3>", f"<pre>{esc(yaml.safe_dump(cfg, sort_keys=False))}</pre>"]
    return html_page(f"pneumoscan evaluation — {r['model']}", "\n".join(B))
