"""``pneumoscan benchmark precision-parity``: does bf16 autocast change what a model learns?

Trains the same small experiment in each precision (e.g. fp32 and bf16) for a few seeds
(paired: a seed fixes the image subset, the split, the initial weights and the shuffling)
and compares validation ROC-AUC: one row per run and the mean paired difference.
"""
from __future__ import annotations

import csv
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .common import format_machine, machine_info

log = logging.getLogger(__name__)


def run_precision_parity(
    data: str, images: int, epochs: int, seeds: Sequence[int], precisions: Sequence[str], model: str, batch_size: int,
) -> list[dict[str, Any]]:
    """Train every (seed, precision) pair; return one result dict per run.

    Args:
        data: dataset folder (its train split; patient-grouped validation carved from it).
        images: training images drawn (per seed) from the train split.
        epochs: epochs per run (no early stopping).
        seeds: seeds; each seed is run once per precision.
        precisions: e.g. ``("fp32", "bf16")``.
        model: registered model name.
        batch_size: images per step.
    """
    from ..config import TrainConfig
    from ..workflows.train import train

    rows = []
    with tempfile.TemporaryDirectory(prefix="pneumoscan-parity-") as tmp:
        for seed in seeds:
            for prec in precisions:
                cfg = TrainConfig().override({
                    "data.root": data, "data.limit": images, "model.name": model, "epochs": epochs, "batch_size": batch_size,
                    "seed": seed, "precision": prec, "progress": False, "early_stopping_patience": 0, "min_epoch_for_best": 1,
                })
                t0 = time.perf_counter()
                summary = train(cfg, Path(tmp) / f"{prec}-{seed}")
                hist = _history(Path(tmp) / f"{prec}-{seed}")
                rows.append({
                    "seed": seed, "precision": prec, "val_auc_last_epoch": hist[-1]["val_auc"],
                    "val_auc_best_epoch": summary["val_metrics"]["roc_auc"], "best_epoch": summary["best_epoch"],
                    "n_val": summary["val_metrics"]["n"], "train_img_per_s": statistics.mean(h["train_images_per_s"] for h in hist),
                    "seconds": time.perf_counter() - t0,
                })
                log.info("seed %d %s: val AUC %.4f (last epoch), %.4f (best epoch)", seed, prec, rows[-1]["val_auc_last_epoch"], rows[-1]["val_auc_best_epoch"])
    return rows


def _history(run_dir: Path) -> list[dict[str, float]]:
    """history.csv of a run as floats."""
    with open(run_dir / "history.csv", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def format_precision_parity(rows: list[dict[str, Any]], model: str, images: int, epochs: int) -> str:
    """The machine, one row per run and, for two precisions, the paired AUC differences.

    Args:
        rows: what :func:`run_precision_parity` returned.
        model: registered model name (for the settings line).
        images: training images per run (for the settings line).
        epochs: epochs per run (for the settings line).
    """
    lines = [
        format_machine(machine_info()),
        f"{model}, {images} images, {epochs} epochs, patient-grouped validation",
        f"{'seed':>4} {'precision':>9} {'val AUC (last epoch)':>21} {'val AUC (best-loss epoch)':>25} {'n val':>6} {'train img/s':>12}",
    ]
    for r in rows:
        best = f"{r['val_auc_best_epoch']:.4f} (epoch {r['best_epoch']})"
        lines.append(f"{r['seed']:>4} {r['precision']:>9} {r['val_auc_last_epoch']:>21.4f} {best:>25} {r['n_val']:>6} {r['train_img_per_s']:>12.1f}")
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    precs = list(dict.fromkeys(r["precision"] for r in rows))
    if len(precs) == 2:
        a, b = precs
        by = {(r["seed"], r["precision"]): r for r in rows}
        diffs = [by[(s, b)]["val_auc_last_epoch"] - by[(s, a)]["val_auc_last_epoch"] for s in seeds]
        spread = statistics.pstdev([by[(s, a)]["val_auc_last_epoch"] for s in seeds]) if len(seeds) > 1 else float("nan")
        lines.append(f"paired {b} - {a} val AUC (last epoch): " + ", ".join(f"{d:+.4f}" for d in diffs)
                     + f"; mean {statistics.mean(diffs):+.4f}; seed-to-seed std of {a}: {spread:.4f}")
    return "\n".join(lines)
