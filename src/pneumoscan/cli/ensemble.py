"""``pneumoscan ensemble``: trained models averaged into one calibrated bundle."""
from __future__ import annotations

import argparse
import json


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from ..workflows.ensemble import make_ensemble

    r = make_ensemble(args.sources, args.out, calibrate=args.calibrate, method=args.method, target=args.target,
                      name=args.name, columns=args.columns, card=not args.no_card)
    if args.json:
        print(json.dumps({k: r[k] for k in ("path", "sha256", "name", "members", "temperature", "threshold", "threshold_method",
                                            "val_metrics", "model_card")} | {"calibration": r["calibration"]}, indent=2, default=str))
        return 0
    cal, vm = r["calibration"], r["val_metrics"]
    print(f"{r['name']}: mean logit of {len(r['members'])} members ({', '.join(r['members'])})")
    if cal["source"] == "member-0":
        print(f"calibration kept from member 0: temperature {r['temperature']:.4f}, threshold {r['threshold']:.4f} "
              f"({r['threshold_method']}); not fitted for the ensemble")
    else:
        where = ("pooled out-of-fold logits of the member folds" if cal["source"] == "cv-oof"
                 else f"the ensemble's logits on {cal['data']['description']}")
        print(f"calibrated on {cal['n']} images ({where}): temperature {r['temperature']:.4f}, threshold {r['threshold']:.4f} "
              f"({r['threshold_method']}); sensitivity {vm['sensitivity']:.3f}, specificity {vm['specificity']:.3f}, "
              f"ROC-AUC {vm['roc_auc']:.4f}")
    print(f"written: {r['path']}" + (f" (model card {r['model_card']})" if r["model_card"] else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ensemble`` sub-command.

    Args:
        sub: the ``pneumoscan`` parser's sub-command action.
    """
    p = sub.add_parser(
        "ensemble", help="average trained models' logits into one calibrated model (one bundle, one ONNX graph)",
        description="Combine runs into one model answering with the mean of their logits. Temperature and threshold are "
                    "fitted on the pooled out-of-fold logits when the runs are the folds of one cross-validation "
                    "(pneumoscan train --folds K), else on --calibrate DIR; the result works with predict, evaluate, "
                    "serve, export and calibrate, and explains with the mean of the members' Grad-CAM maps.",
    )
    p.add_argument("sources", nargs="+", metavar="RUN_OR_BUNDLE",
                   help="run directories, .pt bundles, or a cross-validation directory (all its folds)")
    p.add_argument("--out", required=True, help="the ensemble's .pt file, or a directory (its best.pt and MODEL_CARD.md)")
    p.add_argument("--calibrate", metavar="oof|member|DIR",
                   help="oof: the cross-validation's out-of-fold logits (default when the members are its folds); DIR: "
                        "labelled images (NORMAL/ and PNEUMONIA/, ROOT/val, or a CSV manifest); member: keep member 0's")
    p.add_argument("--method", choices=["youden", "sensitivity", "f1"], help="threshold rule (default: the members')")
    p.add_argument("--target", type=float, help="target sensitivity of --method sensitivity (default: the members')")
    p.add_argument("--name", help="the weights' name shown with every prediction (default ensemble<N>-<arch>-res<size>)")
    p.add_argument("--columns", metavar="NAME=COLUMN,...", help="a CSV manifest's own column names (--calibrate FILE.csv)")
    p.add_argument("--no-card", action="store_true", help="do not write a model card beside the bundle")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_ensemble)
