"""Train a model end to end: :func:`~pneumoscan.training.fit` → calibrate the deployed model
on validation (temperature and operating threshold, stored in ``best.pt``) → ``MODEL_CARD.md``
→ ``curves.png``. ``pneumoscan train`` and :func:`pneumoscan.fit` run :func:`train`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..core.calibration import fit_operating_point
from ..data.datasets import read_manifest
from ..data.io import read_image
from ..evaluation.model_card import write_model_card
from ..evaluation.plots import plot_training_curves
from ..inference import load_predictor
from ..models.bundle import ModelBundle, load_bundle, save_bundle
from ..models.seen import record_seen_images
from ..training import fit as fit_model
from ..training.distributed import is_main_process
from ..training.engine import run_log

log = logging.getLogger(__name__)


def train(cfg: TrainConfig | None, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train, calibrate, describe and plot a run (the calibration, card and plot on rank 0 only).

    Args:
        cfg: the run configuration (``None`` with ``resume``: the run's own ``config.yaml``).
        out: the run directory.
        resume: continue an interrupted run in ``out`` from its ``last.pt``.

    Returns:
        The summary of :func:`pneumoscan.training.fit` plus ``threshold``, ``temperature`` and
        ``val_metrics`` (rank 0).

    Raises:
        PneumoscanError: bad configuration or data, or a checkpoint that cannot be read or written.
    """
    summary = fit_model(cfg, out, resume=resume)
    if not is_main_process():
        return summary
    run = Path(out)
    with run_log(run):
        summary.update(finalize_run(run))
        history = load_bundle(run / "last.pt").provenance.get("history") or []  # every epoch (best.pt: up to the best)
        plot_training_curves(history, run / "curves.png")
    return summary


#: The Python API name of :func:`train` (``pneumoscan.fit``).
fit = train


def finalize_run(run_dir: str | Path, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Fit temperature and threshold on the validation logits of the deployed model and store
    them, with the validation metrics and the content digests of the training and validation
    images (:mod:`pneumoscan.models.seen`: ``predict`` and ``evaluate`` then recognise them), in
    ``best.pt``; then write ``MODEL_CARD.md`` (with the data card ``data.card`` when set).

    The logits are recomputed through :class:`~pneumoscan.inference.Predictor` (fp32, the
    reader and preprocessing of ``predict``/``serve``), not taken from training, where they may
    come from bf16 autocast.

    Args:
        run_dir: the run directory.
        cfg: the settings (``calibrate``, ``threshold_method``, ``target_sensitivity``);
            default: the configuration stored in ``best.pt``.

    Returns:
        ``threshold``, ``temperature`` and ``val_metrics``.
    """
    run = Path(run_dir)
    best = load_bundle(run / "best.pt")
    cfg = cfg or TrainConfig.from_dict(best.provenance["config"])
    prov = dict(best.provenance)
    if (run / "split_val.csv").is_file():
        logits, labels = deployed_val_logits(best, run / "split_val.csv")
        prov.update(val_logits=logits.tolist(), val_labels=labels.tolist(), val_logits_source="predictor-fp32")
    op = fit_operating_point(prov.get("val_logits") or [], prov.get("val_labels") or [], cfg.threshold_method,
                             cfg.target_sensitivity, temperature=None if cfg.calibrate else 1.0)
    best = best.replace(threshold=op.threshold, temperature=op.temperature, threshold_method=op.method,
                        val_metrics=op.val_metrics, provenance=prov)
    best = record_seen_images(best, **{role: [s.path for s in read_manifest(f)] for role, f in (
        ("train", run / "split_train.csv"), ("calibration", run / "split_val.csv")) if f.is_file()})
    save_bundle(best, run / "best.pt")
    m = op.val_metrics
    log.info(
        "best epoch %s: val loss %.4f, AUC %.4f; temperature %.3f; threshold %.3f (%s): sensitivity %.3f, specificity %.3f, accuracy %.3f",
        prov.get("best_epoch"), prov.get("best_loss", float("nan")), m["roc_auc"], op.temperature, op.threshold, op.method,
        m["sensitivity"], m["specificity"], m["accuracy"],
    )
    write_model_card(run, best, data_card=cfg.data.card or None)
    return {"threshold": op.threshold, "temperature": op.temperature, "val_metrics": m}


def deployed_val_logits(bundle: ModelBundle, manifest: Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits of a model through :class:`~pneumoscan.inference.Predictor` (fp32, the
    same reader and preprocessing as ``predict``/``serve``), so the fitted temperature and
    threshold hold for the deployed model.

    Args:
        bundle: the model.
        manifest: the run's ``split_val.csv``.
        batch_size: images per forward pass.
    """
    samples = read_manifest(manifest)
    pred = load_predictor(bundle, backend="torch", batch_size=batch_size, guard=False)
    out = [np.zeros(0)]
    for i in range(0, len(samples), batch_size):
        imgs = [read_image(s.path, max_side=pred.input_size) for s in samples[i : i + batch_size]]
        out.append(pred.logits(pred.preprocess(imgs)))
    return np.concatenate(out), np.asarray([s.label for s in samples], dtype=np.int64)
