"""Does bf16 autocast change what a model learns? Train the same small experiment in fp32
and in bf16 for a few seeds (paired: a seed fixes the image subset, the split, the initial
weights and the shuffling) and compare validation ROC-AUC.

    python -m benchmarks.precision_parity --data ../shared/data/chest_xray_224 \
        --images 600 --epochs 3 --seeds 0,1,2

Prints one row per run and the mean paired difference; ``--json FILE`` keeps the numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("pneumoscan.benchmarks.precision_parity")


def run(data: str, images: int, epochs: int, seeds: Sequence[int], precisions: Sequence[str], model: str, batch_size: int) -> list[dict[str, Any]]:
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
    from pneumoscan.config import TrainConfig
    from pneumoscan.training import fit

    rows = []
    with tempfile.TemporaryDirectory(prefix="pneumoscan-parity-") as tmp:
        for seed in seeds:
            for prec in precisions:
                cfg = TrainConfig().override({
                    "data.root": data, "data.limit": images, "model.name": model, "epochs": epochs, "batch_size": batch_size,
                    "seed": seed, "precision": prec, "progress": False, "early_stopping_patience": 0, "min_epoch_for_best": 1,
                })
                t0 = time.perf_counter()
                summary = fit(cfg, Path(tmp) / f"{prec}-{seed}")
                hist = summary_history(Path(tmp) / f"{prec}-{seed}")
                rows.append({
                    "seed": seed, "precision": prec, "val_auc_last_epoch": hist[-1]["val_auc"],
                    "val_auc_best_epoch": summary["val_metrics"]["roc_auc"], "best_epoch": summary["best_epoch"],
                    "n_val": summary["val_metrics"]["n"], "train_img_per_s": statistics.mean(h["train_images_per_s"] for h in hist),
                    "seconds": time.perf_counter() - t0,
                })
                log.info("seed %d %s: val AUC %.4f (last epoch), %.4f (best epoch)", seed, prec, rows[-1]["val_auc_last_epoch"], rows[-1]["val_auc_best_epoch"])
    return rows


def summary_history(run_dir: Path) -> list[dict[str, float]]:
    """history.csv of a run as floats."""
    import csv

    with open(run_dir / "history.csv", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.precision_parity", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--model", default="seed_cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pneumoscan").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    seeds = [int(s) for s in args.seeds.split(",")]
    precs = [p.strip() for p in args.precisions.split(",")]
    rows = run(args.data, args.images, args.epochs, seeds, precs, args.model, args.batch_size)
    from pneumoscan.bench.common import format_machine, machine_info

    print(format_machine(machine_info()))
    print(f"{args.model}, {args.images} images, {args.epochs} epochs, patient-grouped validation")
    print(f"{'seed':>4} {'precision':>9} {'val AUC (last epoch)':>21} {'val AUC (best-loss epoch)':>25} {'n val':>6} {'train img/s':>12}")
    for r in rows:
        best = f"{r['val_auc_best_epoch']:.4f} (epoch {r['best_epoch']})"
        print(f"{r['seed']:>4} {r['precision']:>9} {r['val_auc_last_epoch']:>21.4f} {best:>25} {r['n_val']:>6} {r['train_img_per_s']:>12.1f}")
    if len(precs) == 2:
        a, b = precs
        by = {(r["seed"], r["precision"]): r for r in rows}
        diffs = [by[(s, b)]["val_auc_last_epoch"] - by[(s, a)]["val_auc_last_epoch"] for s in seeds]
        spread = [statistics.pstdev([by[(s2, a)]["val_auc_last_epoch"] for s2 in seeds]) if len(seeds) > 1 else float("nan")]
        print(f"paired {b} - {a} val AUC (last epoch): " + ", ".join(f"{d:+.4f}" for d in diffs)
              + f"; mean {statistics.mean(diffs):+.4f}; seed-to-seed std of {a}: {spread[0]:.4f}")
    if args.json:
        from pneumoscan.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
