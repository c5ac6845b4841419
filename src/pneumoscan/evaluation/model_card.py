"""``MODEL_CARD.md``: what a trained pneumoscan model is for, what it was trained on, how well
it did on validation (with bootstrap confidence intervals) and where it is known to fail.

Every training run writes one into its run directory (``finalize_run`` calls
:func:`write_model_card`); ``pneumoscan calibrate`` rewrites it when it changes the operating
point of a run's ``best.pt``.
"""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..utils.io import atomic_write_text
from ..core.calibration import calibration_summary, sigmoid
from ..core.metrics import METRIC_KEYS, METRIC_LABELS, bootstrap_metrics, format_value

log = logging.getLogger(__name__)

MODEL_CARD = "MODEL_CARD.md"

DATA_CITATION = (
    "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images "
    "for Classification. Mendeley Data, v2, 2018. doi:10.17632/rscbjbr9sj.2"
)
DATA_LICENSE = "CC BY 4.0 (attribution required wherever the images or models trained on them are redistributed)"

INTENDED_USE = """\
- **Intended use:** a research tool and *screening aid* that flags paediatric anterior-posterior (AP)
  chest X-rays suggestive of pneumonia for priority review by a qualified reader.
- **Not a diagnostic device.** It has no regulatory clearance; it must not be used to rule pneumonia
  in or out for an individual patient, nor to replace a radiologist or clinician.
- **Out of scope:** adults, lateral or PA-only adult protocols, CT, other findings (effusion,
  pneumothorax, tuberculosis, COVID-19), images that are not chest X-rays (the service's guard
  refuses many of them, but not all), and distinguishing bacterial from viral pneumonia."""

LIMITATIONS = """\
- **Age group:** trained on children aged 1–5 years; performance on infants, older children and
  adults is unknown and expected to be worse.
- **Single site:** all images come from one centre (Guangzhou Women and Children's Medical Center)
  and its equipment and acquisition protocol; other hospitals, scanners and post-processing shift the
  input distribution.
- **Test-set shift:** the dataset's official test split has harder NORMAL images than its train
  split. A threshold tuned on train-like validation data therefore loses *specificity* on that test
  set (more false positives) while sensitivity holds up. Re-derive the operating point on data from
  the target site (`pneumoscan calibrate`) before any use there.
- **Validation figures are optimistic:** the temperature and the threshold in this card were fitted on the
  same validation split the metrics are computed on, and that split was also used to pick the best
  epoch. Independent test data give the honest figure (`pneumoscan evaluate`).
- **Labels:** image-level NORMAL / PNEUMONIA labels from clinical grading, without localisation;
  the model can learn shortcuts (markers, positioning, image borders). Check Grad-CAM maps.
- **Images:** inputs are stretched to a square greyscale image; the dataset's images were
  resized the same way."""


def _section_metrics(sec: dict[str, Any]) -> list[str]:
    lines = ["| metric | value [95% CI] |", "|---|---|"]
    for k in METRIC_KEYS:
        if k == "recall":  # identical to sensitivity
            continue
        lines.append(f"| {METRIC_LABELS[k]} | {format_value(sec.get(k))} |")
    cm = sec["confusion_matrix"]["value"]
    lines += [
        "",
        f"Confusion matrix (rows true, columns predicted; n = {sec['n']}: NORMAL {sec['n_per_class']['NORMAL']}, "
        f"PNEUMONIA {sec['n_per_class']['PNEUMONIA']}):",
        "",
        "| | predicted NORMAL | predicted PNEUMONIA |",
        "|---|---|---|",
        f"| **true NORMAL** | {cm[0][0]} | {cm[0][1]} |",
        f"| **true PNEUMONIA** | {cm[1][0]} | {cm[1][1]} |",
    ]
    return lines


def validation_report(ckpt: dict[str, Any], n_resamples: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Bootstrapped validation metrics of a checkpoint from its stored validation logits, at
    its operating threshold and at 0.5, plus the calibration before/after temperature scaling.

    Args:
        ckpt: checkpoint dict with ``val_logits``, ``val_labels``, ``temperature``, ``threshold``.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"metrics": {...}, "calibration": {...}}``, or ``None`` when the checkpoint holds no
        validation logits.
    """
    z = np.asarray(ckpt.get("val_logits") or [], dtype=np.float64)
    y = np.asarray(ckpt.get("val_labels") or [], dtype=np.int64)
    if z.size == 0 or z.size != y.size:
        return None
    t = float(ckpt.get("temperature") or 1.0)
    thr = float(ckpt.get("threshold") if ckpt.get("threshold") is not None else 0.5)
    probs = sigmoid(z / t)
    metrics = bootstrap_metrics(y, probs, {"at_operating_threshold": thr, "at_0.5": 0.5}, n_resamples=n_resamples, seed=seed)
    return {"metrics": metrics, "calibration": calibration_summary(z, y, t), "bootstrap": {"resamples": n_resamples, "seed": seed}}


def render_model_card(ckpt: dict[str, Any], run_dir: str | Path | None = None, n_resamples: int = 2000, seed: int = 0) -> str:
    """The model card of a checkpoint as Markdown.

    Args:
        ckpt: a pneumoscan checkpoint dict.
        run_dir: its run directory (for the split files), if any.
        n_resamples: bootstrap resamples of the validation confidence intervals.
        seed: bootstrap seed.
    """
    from ..utils.version import __version__

    cfg = ckpt.get("config") or {}
    mcfg = cfg.get("model") or {}
    name = ckpt.get("weight_name") or (f"{ckpt['model_name']}-res{(ckpt.get('preprocessing') or {}).get('input_size', '?')}"
                                      + (f"-{Path(run_dir).name}" if run_dir else ""))
    prep = ckpt.get("preprocessing") or {}
    from .report import run_history

    hist = run_history(ckpt)
    epoch_times = [float(r["epoch_time"]) for r in hist if r.get("epoch_time") is not None]
    val = validation_report(ckpt, n_resamples, seed)
    thr = ckpt.get("threshold")
    method = ckpt.get("threshold_method")
    target = ckpt.get("target_sensitivity", cfg.get("target_sensitivity"))
    data_root = (cfg.get("data") or {}).get("root", "")

    L: list[str] = [f"# Model card: {name}", ""]
    L += [f"Generated by pneumoscan {__version__} on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."]
    L += ["", "## Model details", ""]
    L += [
        f"- **Architecture:** `{ckpt['model_name']}` (pneumoscan model registry), one logit for PNEUMONIA vs NORMAL.",
        f"- **Input:** greyscale chest X-ray stretched to {prep.get('input_size', '?')}×{prep.get('input_size', '?')} px, "
        f"scaled to [0, 1]; normalisation inside the model ({prep.get('in_channels', '?')}-channel backbone).",
        f"- **Initialisation:** {mcfg.get('weights') or 'random'}"
        + (" (backbone frozen)" if mcfg.get("freeze_backbone") else "") + ".",
        f"- **Trainable parameters:** {int(ckpt['trainable_parameters']):,}" if ckpt.get("trainable_parameters") is not None else "- **Trainable parameters:** unknown",
        f"- **Training:** {len(hist)} epoch(s) run, best epoch {ckpt.get('best_epoch', '?')} "
        f"(lowest validation loss{', from epoch ' + str(cfg.get('min_epoch_for_best')) + ' on' if cfg.get('min_epoch_for_best', 1) > 1 else ''}); "
        f"optimiser {(cfg.get('optim') or {}).get('optimizer', '?')}, lr {(cfg.get('optim') or {}).get('lr', '?')}, "
        f"batch {cfg.get('batch_size', '?')}, class balance {cfg.get('class_balance', '?')}"
        + (f"; {np.mean(epoch_times):.1f} s per epoch on average" if epoch_times else "") + ".",
        "- **Licence of the weights:** derived from CC BY 4.0 data; attribute the dataset (below).",
    ]
    if ckpt.get("sha256"):
        L.append(f"- **sha256:** `{ckpt['sha256']}`")
    L += ["", "## Intended use", "", INTENDED_USE]
    L += ["", "## Training data", ""]
    L += [
        f"- **Dataset:** {DATA_CITATION}.",
        f"- **Licence:** {DATA_LICENSE}.",
        "- **Population:** paediatric (1–5 years) anterior-posterior chest X-rays, one centre; labels NORMAL / "
        "PNEUMONIA (bacterial and viral together).",
        f"- **Data used:** `{data_root}`" + (f", training split `{cfg.get('data', {}).get('train_split', 'train')}`" if data_root else "")
        + f"; validation: {(cfg.get('data') or {}).get('val_source', '?')}"
        + (f" ({100 * float((cfg.get('data') or {}).get('val_fraction', 0)):.0f}% of training patients held out, grouped by patient)"
           if (cfg.get("data") or {}).get("val_source") == "grouped" else "") + ".",
    ]
    if run_dir:
        L.append("- The exact images of each split are listed in `split_train.csv` and `split_val.csv` beside this card.")
    L += ["", "## Operating point", ""]
    if thr is None or method is None:
        L.append(f"- Threshold {float(thr if thr is not None else 0.5):.4f} (not fitted: no validation logits).")
    else:
        rule = {"youden": "maximum Youden index (sensitivity + specificity − 1)",
                "sensitivity": f"highest threshold reaching sensitivity ≥ {float(target or 0.95):.2f}",
                "f1": "maximum F1"}.get(method, method)
        L.append(f"- Predict PNEUMONIA when the calibrated probability ≥ **{float(thr):.4f}**, chosen on validation by the "
                 f"*{method}* rule ({rule}).")
        L.append("- Re-derive it without retraining: `pneumoscan calibrate --checkpoint best.pt --method sensitivity --target 0.95`.")
    L += ["", "## Calibration", ""]
    if val is not None:
        c = val["calibration"]
        L.append(f"- Temperature scaling fitted on validation: T = {c['temperature']:.3f} (probability = sigmoid(logit / T)).")
        L.append(f"- Validation ECE ({15} bins): {c['ece_before']:.4f} before (T = 1) → {c['ece_after']:.4f} after; "
                 f"NLL {c['nll_before']:.4f} → {c['nll_after']:.4f}; Brier {c['brier_before']:.4f} → {c['brier_after']:.4f}.")
    else:
        L.append(f"- Temperature T = {float(ckpt.get('temperature') or 1.0):.3f}; no validation logits stored, so no ECE.")
    L += ["", "## Validation metrics", ""]
    if val is None:
        L.append("No validation logits are stored in this checkpoint.")
    else:
        m = val["metrics"]
        L.append(f"Computed from the {m['at_operating_threshold']['n']} validation images' stored logits after temperature "
                 f"scaling; 95% confidence intervals from a stratified bootstrap ({val['bootstrap']['resamples']:,} resamples, "
                 f"seed {val['bootstrap']['seed']}). See *Limitations*: these figures are optimistic.")
        L += ["", f"### At the operating threshold ({m['at_operating_threshold']['threshold']:.4f})", ""]
        L += _section_metrics(m["at_operating_threshold"])
        L += ["", "### At threshold 0.5", ""]
        L += _section_metrics(m["at_0.5"])
    L += ["", "## Known limitations", "", LIMITATIONS]
    L += ["", "## Ethical considerations", ""]
    L += [
        "- A false negative delays care; a false positive costs a review. Choose the operating point for the setting "
        "(a screening aid favours sensitivity) and monitor both error types after deployment.",
        "- Performance across sex, age within 1–5 years and disease subtype was not assessed (the dataset carries no "
        "such metadata beyond the bacterial/viral file names).",
    ]
    L += ["", "## Training configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(L)


def write_model_card(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write ``MODEL_CARD.md`` for a run (atomically).

    Args:
        run_dir: the run directory.
        checkpoint: the checkpoint to describe (default ``run_dir/best.pt``).

    Returns:
        The path of the card.
    """
    from ..training.checkpoint import load_checkpoint

    run = Path(run_dir)
    ckpt = load_checkpoint(checkpoint or run / "best.pt")
    path = run / MODEL_CARD
    atomic_write_text(path, render_model_card(ckpt, run))
    log.info("model card: %s", path)
    return path
