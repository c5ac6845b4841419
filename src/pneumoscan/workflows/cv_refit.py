"""The final model of a cross-validated recipe (``pneumoscan train --folds K --refit``).

Cross-validation (:mod:`.cv`) chooses the recipe and the operating point on out-of-fold
predictions; the model that ships is then trained once more with that recipe on **every**
training image (``OUT/final/``), for the recipe's fixed number of epochs (its last epoch is the
checkpoint: nothing is selected on the monitor split), and calibrated on the pooled out-of-fold
logits of the cross-validation (``OUT/cv/oof.csv``): the temperature and the threshold rule are
fitted there, where every image was scored by a model that had not seen it. The final model has
no held-out images of its own, so those out-of-fold logits stand in for its validation; its
bundle and model card say so, and carry the cross-validation table (mean ± sd per metric).

The final run logs its loss on a monitor split, the data's own ``val`` split (Kermany: 16
images of other patients); nothing is chosen on it. Data without a ``val`` split cannot be refitted.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..core.calibration import fit_operating_point
from ..data.datasets import load_samples
from ..errors import ConfigError, DataError, PneumoscanError
from ..evaluation.model_card import write_model_card
from ..models.bundle import ModelBundle, load_bundle, save_bundle
from ..models.validation import jsonable
from ..training.distributed import is_main_process
from ..utils.io import atomic_write_text
from .cv_summary import read_oof
from .train import train

log = logging.getLogger(__name__)

#: The final model's folder inside a cross-validation directory, and its "finished" marker.
FINAL_DIR, FINAL_MARKER = "final", "cv/final.json"
#: What the final model's stored validation logits are.
OOF_NOTE = ("pooled out-of-fold logits of the cross-validation of this recipe (each image scored by the fold model that did "
            "not train on it) stand in for this model's validation: it was trained on every one of these images")


def final_config(cfg: TrainConfig) -> TrainConfig:
    """The settings of the final run: the recipe's, on every training image, for its fixed
    number of epochs (no early stopping; the last epoch is the checkpoint).

    Args:
        cfg: the cross-validated recipe.

    Raises:
        ConfigError: the data has no ``val`` split to monitor the run with.
    """
    try:
        has_val = bool(cfg.data.root) and bool(load_samples(cfg.data.root, "val", cfg.data.columns))
    except PneumoscanError:
        has_val = False
    if not has_val:
        raise ConfigError(f"--refit needs a val split in {cfg.data.root or 'the data'} to monitor the final run on "
                          "(nothing is chosen on it); the final model trains on every training image")
    return cfg.override({
        "data.val_source": "official",
        "min_epoch_for_best": cfg.epochs, "early_stopping_patience": 0,
    })


def refit_final(out: str | Path, cfg: TrainConfig, *, resume: bool = True) -> dict[str, Any]:
    """Train (or resume, or skip when done) the final model of a finished cross-validation and
    calibrate it on the out-of-fold logits.

    Args:
        out: the cross-validation directory (``cv/oof.csv`` and ``cv/cv_summary.json`` written).
        cfg: the cross-validated recipe.
        resume: continue an interrupted final run, skip a finished one.

    Returns:
        ``path`` (the final ``best.pt``), ``sha256``, ``threshold``, ``temperature`` and
        ``val_metrics`` (on the out-of-fold logits).

    Raises:
        DataError: no out-of-fold predictions (the cross-validation has not finished).
    """
    out = Path(out)
    run, marker = out / FINAL_DIR, out / FINAL_MARKER
    summary_file = out / "cv" / "cv_summary.json"
    if not summary_file.is_file():
        raise DataError(f"{out}: no cross-validation summary (cv/cv_summary.json); finish the cross-validation first")
    fcfg = final_config(cfg)
    if resume and marker.is_file() and (run / "best.pt").is_file():
        log.info("final model: finished, skipped (%s)", run)
        return json.loads(marker.read_text(encoding="utf-8"))
    if resume and (run / "last.pt").is_file() and (run / "config.yaml").is_file():
        log.info("final model: resuming %s", run)
        train(None, run, resume=True)
    else:
        log.info("final model: training %s on every training image (%d epochs; monitor: %s)", run, fcfg.epochs, fcfg.data.val_source)
        for old in ("best.pt", "last.pt") if is_main_process() else ():
            (run / old).unlink(missing_ok=True)
        train(fcfg, run)
    if not is_main_process():
        return {}
    cv_summary = json.loads(summary_file.read_text(encoding="utf-8"))
    best = calibrate_on_oof(load_bundle(run / "best.pt"), out / "cv" / "oof.csv", cfg, cv_summary)
    sha = save_bundle(best, run / "best.pt")
    write_model_card(run, data_card=cfg.data.card or None)
    m = best.val_metrics
    log.info("final model %s: temperature %.3f, threshold %.3f (%s) on %d out-of-fold logits: sensitivity %.3f, specificity %.3f",
             run / "best.pt", best.temperature, best.threshold, best.threshold_method, len(best.provenance["val_logits"]),
             m["sensitivity"], m["specificity"])
    result = {"path": str(run / "best.pt"), "sha256": sha, "threshold": best.threshold, "temperature": best.temperature,
              "val_metrics": dict(m)}
    atomic_write_text(marker, json.dumps(jsonable(result), indent=2) + "\n")
    return result


def calibrate_on_oof(bundle: ModelBundle, oof_file: str | Path, cfg: TrainConfig, cv_summary: dict[str, Any] | None = None) -> ModelBundle:
    """A copy of ``bundle`` whose temperature, threshold and validation metrics are fitted on a
    cross-validation's pooled out-of-fold logits with the recipe's rule.

    Args:
        bundle: the model trained on every image of that cross-validation; not modified.
        oof_file: the cross-validation's ``cv/oof.csv``.
        cfg: the recipe (``threshold_method``, ``target_sensitivity``, ``calibrate``).
        cv_summary: the cross-validation's ``cv_summary.json`` content, kept in the provenance
            (``provenance["cv"]``: folds, per-fold metrics, mean ± sd, pooled out-of-fold figures)
            for the model card.

    Raises:
        DataError: an unreadable or single-class ``oof.csv``.
    """
    table = read_oof(oof_file)
    if table.labels.min() == table.labels.max():
        raise DataError(f"{oof_file}: the out-of-fold images are of a single class")
    op = fit_operating_point(table.logits, table.labels, cfg.threshold_method, cfg.target_sensitivity,
                             temperature=None if cfg.calibrate else 1.0)
    cal = {**table.describe(), "method": op.method, "target_sensitivity": op.target_sensitivity,
           "refit_temperature": cfg.calibrate, "note": OOF_NOTE}
    prov = {**bundle.provenance, "calibration": cal, "val_logits": table.logits.tolist(), "val_labels": table.labels.tolist(),
            "val_logits_source": "cv-oof"}
    if cv_summary is not None:
        prov["cv"] = {k: cv_summary[k] for k in ("folds", "n_images", "n_patients", "split_seed", "threshold_method",
                                                  "target_sensitivity", "per_fold", "mean_sd", "oof") if k in cv_summary}
    return bundle.replace(temperature=op.temperature, threshold=op.threshold, threshold_method=op.method,
                          val_metrics=op.val_metrics, provenance=prov)
