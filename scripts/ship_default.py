"""Turn a finished training run into the shipped default model (``src/pneumoscan/assets/default``).

    python scripts/ship_default.py RUN_DIR [--name mobilenet_v2-res224-kermany]
    python scripts/ship_default.py --onnx-only      # re-export the shipped model's ONNX file

The weights are rounded to fp16 (the shipped storage) *before* the temperature and operating
threshold are fitted on the run's patient-grouped validation split, so the stored calibration
holds exactly for the file users load. Writes the checkpoint, ``default.json`` (name, sha256,
metrics, preprocessing, licence), ``MODEL_CARD.md`` and the ONNX export that installs without
PyTorch run (``<name>.onnx``, its sha256 in ``default.json``; docs/deploy.md).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

from pneumoscan.config import TrainConfig
from pneumoscan.errors import PneumoscanError
from pneumoscan.inference.onnx_export import export_default_onnx
from pneumoscan.models.bundle import load_bundle, save_bundle, save_default
from pneumoscan.workflows.train import finalize_run

log = logging.getLogger("pneumoscan.ship")
DEST = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "assets" / "default"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--onnx-only", action="store_true", help="only (re)write the ONNX export of the model in --dest")
    ap.add_argument("--name", default="mobilenet_v2-res224-kermany")
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.onnx_only:
            log.info("exported %s", export_default_onnx(args.dest))
            return 0
        if args.run is None:
            ap.error("give RUN_DIR (or --onnx-only)")
        run = args.run
        cfg = TrainConfig.from_yaml(run / "config.yaml")
        best = load_bundle(run / "best.pt")
        sd = {k: (v.half().float() if torch.is_floating_point(v) else v) for k, v in best.state_dict.items()}
        save_bundle(best.replace(state_dict=sd, name=args.name), run / "best.pt")
        summary = finalize_run(run, cfg)
        best = load_bundle(run / "best.pt")
        hist = best.provenance["history"]
        extra = {
            "recipe": "pneumoscan train --preset default --data chest_xray_224",
            "trained_on": f"{sum(1 for _ in open(run / 'split_train.csv')) - 1} images of Kermany train; "
                          f"validation {len(best.provenance['val_labels'])} images of held-out patients (patient-grouped split)",
            "best_epoch": best.provenance["best_epoch"], "epochs": len(hist),
            "train_time_s": round(sum(r["epoch_time"] for r in hist)), "model_card": "MODEL_CARD.md",
        }
        f = save_default(best, args.dest, args.name, extra)
        shutil.copyfile(run / "MODEL_CARD.md", args.dest / "MODEL_CARD.md")
        export_default_onnx(args.dest)
        log.info("shipped %s (%d bytes): %s", f, f.stat().st_size, summary["val_metrics"])
    except PneumoscanError as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
