"""Turn a finished training run into the shipped default model (``src/pneumoscan/assets/default``).

    python scripts/ship_default.py CV_DIR/final --name NAME --recipe "pneumoscan train ..."
    python scripts/ship_default.py RUN_DIR [--name NAME]    # a run with its own validation split
    python scripts/ship_default.py --onnx-only              # re-export the shipped model's ONNX file

The weights are rounded to fp16 (the shipped storage) *before* the temperature and operating
threshold are fitted, so the stored calibration holds exactly for the file users load: on the
pooled out-of-fold logits of the cross-validation for a ``train --folds K --refit`` model
(``CV_DIR/final``), else on the run's own validation split. Every absolute path is reduced to
its last part (nothing shipped names a developer's machine). Writes the checkpoint,
``default.json`` (name, sha256, metrics, preprocessing, licence), ``MODEL_CARD.md`` (rendered
from the shipped file), the distribution-shift sidecar ``shift.npz`` and the ONNX export that a
PyTorch-free install runs (``<name>.onnx``); every file's sha256 is in ``default.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from pneumoscan.config import TrainConfig
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluation.model_card import portable_paths, render_model_card
from pneumoscan.inference.onnx_export import export_default_onnx
from pneumoscan.models.bundle import ModelBundle, load_bundle, save_bundle, save_default
from pneumoscan.models.seen import SEEN_KEY, seen_images
from pneumoscan.utils.io import atomic_write_text
from pneumoscan.workflows.cv_refit import calibrate_on_oof
from pneumoscan.workflows.shift_fit import fit_default
from pneumoscan.workflows.train import finalize_run

log = logging.getLogger("pneumoscan.ship")
ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "pneumoscan" / "assets" / "default"
SAMPLES = ROOT / "src" / "pneumoscan" / "assets" / "samples"
PINS = ROOT / "tests" / "fixtures" / "pinned_default.json"


def calibrated(run: Path, name: str) -> tuple[ModelBundle, str]:
    """The run's best model with fp16-rounded weights, calibrated for those weights, and where
    the calibration came from."""
    best = load_bundle(run / "best.pt")
    sd = {k: (v.half().float() if torch.is_floating_point(v) else v) for k, v in best.state_dict.items()}
    best = best.replace(state_dict=sd, name=name)
    cfg = TrainConfig.from_dict(best.provenance["config"])
    cv_dir = run.parent
    if (best.provenance.get("calibration") or {}).get("source") == "cv-oof":
        summary = json.loads((cv_dir / "cv" / "cv_summary.json").read_text(encoding="utf-8"))
        return calibrate_on_oof(best, cv_dir / "cv" / "oof.csv", cfg, summary), "oof"
    save_bundle(best, run / "best.pt")
    finalize_run(run, cfg)
    return load_bundle(run / "best.pt"), "validation"


def pin(dest: Path, shipped: ModelBundle, out: Path) -> None:
    """Record the shipped model's probabilities (PyTorch backend) on the bundled sample X-rays:
    the behaviour every backend and later refactor must reproduce."""
    from pneumoscan.inference import load_predictor

    files = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpeg", ".dcm"))
    preds = load_predictor(dest / f"{shipped.name}.pt", backend="torch").predict_paths(files, guard=False)
    samples = {Path(p.path).name: {"probability": p.probability, "label": p.label} for p in preds}
    atomic_write_text(out, json.dumps({"model": shipped.name, "sha256": shipped.sha256, "samples": samples}, indent=2) + "\n")
    log.info("pinned %d sample answers in %s", len(samples), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--onnx-only", action="store_true", help="only (re)write the ONNX export of the model in --dest")
    ap.add_argument("--name", default="mobilenet_v2-res224-kermany")
    ap.add_argument("--recipe", default="pneumoscan train --preset default --data chest_xray_224",
                    help="the command that trained the run (recorded in default.json)")
    ap.add_argument("--dest", type=Path, default=DEST)
    ap.add_argument("--pins", default=str(PINS), help="where to record the shipped model's answers on the bundled samples "
                    "(tests/test_pinned_default.py); an empty value skips it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.onnx_only:
            log.info("exported %s", export_default_onnx(args.dest))
            return 0
        if args.run is None:
            ap.error("give RUN_DIR (or --onnx-only)")
        run = args.run
        best, source = calibrated(run, args.name)
        root = str((best.provenance.get("config") or {}).get("data", {}).get("root") or "")
        best = best.replace(provenance={k: v if k == SEEN_KEY else portable_paths(v, None) for k, v in best.provenance.items()})
        hist = best.provenance.get("history") or []
        n_train = sum(1 for _ in open(run / "split_train.csv", encoding="utf-8")) - 1
        trained_on = (f"{n_train} images of Kermany train (every one); operating point from the pooled out-of-fold predictions "
                      f"of the {best.provenance['cv']['folds']}-fold patient-grouped cross-validation"
                      if source == "oof" else
                      f"{n_train} images of Kermany train; validation {len(best.provenance['val_labels'])} images of held-out "
                      "patients (patient-grouped split)")
        extra = {
            "recipe": args.recipe, "trained_on": trained_on, "best_epoch": best.provenance.get("best_epoch"), "epochs": len(hist),
            "train_time_s": round(sum(r["epoch_time"] for r in hist)), "model_card": "MODEL_CARD.md",
        }
        for old in args.dest.glob("*.pt"):
            if old.name != f"{args.name}.pt":
                old.unlink()
        for old in args.dest.glob("*.onnx"):
            old.unlink()
        f = save_default(best, args.dest, args.name, extra)
        shipped = load_bundle(f)
        seen = seen_images(shipped)
        if seen is None:
            raise PneumoscanError(f"{run / 'best.pt'} records no training images (made before content digests): retrain or record them")
        shift = fit_default(dest=args.dest, cv_dir=run.parent if source == "oof" else None)
        described = shipped.replace(provenance={**shipped.provenance, "shift": {"threshold": shift["threshold"], "stats": shift}},
                                    sha256=shipped.sha256)
        atomic_write_text(args.dest / "MODEL_CARD.md", render_model_card(described, data_card=Path(root) if root else None))
        export_default_onnx(args.dest)
        if args.pins:
            pin(args.dest, shipped, Path(args.pins))
        log.info("shipped %s (%d bytes, sha256 %s): %s", f, f.stat().st_size, shipped.sha256, shipped.val_metrics)
    except PneumoscanError as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
