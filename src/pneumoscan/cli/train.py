"""``pneumoscan train``: train a registered model (also under torchrun for DDP), or one run per
fold of a patient-grouped cross-validation (``--folds K``)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError, PneumoscanError

if TYPE_CHECKING:
    from ..config import TrainConfig

log = logging.getLogger(__name__)


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    """Preset or YAML file, then explicit flags, then ``--set key=value`` overrides.

    Args:
        args: parsed ``pneumoscan train`` arguments.

    Returns:
        The validated training configuration.
    """
    from ..config import TrainConfig, load_preset

    if args.config:
        cfg = TrainConfig.from_yaml(args.config)
    elif args.preset:
        cfg = load_preset(args.preset)
    else:
        cfg = TrainConfig()
    flags = {
        "data.root": args.data, "model.name": args.model, "epochs": args.epochs, "optim.lr": args.lr,
        "batch_size": args.batch_size, "optim.optimizer": args.optimizer, "optim.weight_decay": args.weight_decay,
        "model.weights": args.weights, "model.input_size": args.input_size, "precision": args.precision,
        "device": args.device, "data.val_source": args.val_source, "data.val_fraction": args.val_fraction,
        "seed": args.seed, "data.num_workers": args.workers, "data.limit": args.limit,
        "threshold_method": args.threshold_method, "early_stopping_patience": args.patience,
        "class_balance": args.class_balance, "data.columns": args.columns, "data.card": args.data_card,
    }
    over = {k: v for k, v in flags.items() if v is not None}
    if args.freeze_backbone:
        over["model.freeze_backbone"] = True
    if args.deterministic:
        over["deterministic"] = True
    if args.no_progress:
        over["progress"] = False
    if args.sync_bn:
        over["sync_bn"] = True
    for item in args.set or []:
        if "=" not in item:
            raise PneumoscanError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        over[k.strip()] = v
    cfg = cfg.override(over)
    cfg.validate()
    if cfg.data.card:  # a missing or malformed card: one error now, not after training
        from ..evaluation.data_card import load_data_card

        if not Path(cfg.data.card).is_file():
            raise DataError(f"data card not found: {cfg.data.card}")
        load_data_card(cfg.data.card)
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from ..workflows.cv import cross_validate, is_cv_run
    from ..workflows.train import train

    if args.resume:
        if is_cv_run(args.resume):
            return _report_cv(cross_validate(None, args.resume, resume=True, refit=args.refit))
        summary = train(None, args.resume, resume=True)
    else:
        if not args.out:
            raise PneumoscanError("train needs --out RUN_DIR (or --resume RUN_DIR)")
        if args.folds is not None and args.folds < 2:
            raise PneumoscanError(f"--folds must be >= 2, got {args.folds}")
        if args.refit and args.folds is None:
            raise PneumoscanError("--refit needs --folds K (it refits a cross-validated recipe on every image)")
        cfg = build_train_config(args)
        out = Path(args.out)
        if args.folds is not None:
            return _report_cv(cross_validate(cfg, out, args.folds, overwrite=args.overwrite, refit=args.refit))
        if ((out / "last.pt").exists() or is_cv_run(out)) and not args.overwrite:
            raise PneumoscanError(f"{out} already holds a run; use --resume {out} to continue it or --overwrite to start again")
        summary = train(cfg, out)
    if int(os.environ.get("RANK", "0")) == 0:
        vm = summary.get("val_metrics") or {}
        if vm:
            log.info(
                "done: %s — validation AUC %.4f, sensitivity %.3f, specificity %.3f at threshold %.3f",
                summary["run_dir"], vm.get("roc_auc", float("nan")), vm.get("sensitivity", float("nan")),
                vm.get("specificity", float("nan")), summary.get("threshold", float("nan")),
            )
    return 0


def _report_cv(summary: dict) -> int:
    """Log the one-line result of a cross-validation (rank 0)."""
    if summary.get("final"):
        f = summary["final"]
        log.info("final model: %s (sha256 %s) — threshold %.3f, temperature %.3f from the out-of-fold predictions",
                 f["path"], f["sha256"][:12], f["threshold"], f["temperature"])
    if summary.get("oof"):
        op, auc = summary["oof"]["operating_point"], summary["mean_sd"]["roc_auc"]
        log.info(
            "done: %s — %d folds, AUC %.4f ± %.4f, pooled out-of-fold AUC %.4f; operating point %.3f (%s): sensitivity %.3f, "
            "specificity %.3f; summary in %s", summary["run_dir"], summary["folds"], auc["mean"], auc["sd"], summary["oof"]["roc_auc"],
            op["threshold"], op["method"], op["sensitivity"], op["specificity"], summary["summary_file"],
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command.

    Args:
        subparsers: the ``pneumoscan`` parser's sub-command action.
    """
    p = subparsers.add_parser("train", help="train a model (also under torchrun for DDP)", description="Train a registered model. "
                              "Settings: --preset or --config FILE.yaml, then flags, then --set key=value (e.g. --set optim.scheduler=cosine).")
    p.add_argument("--data", help="dataset folder (ROOT/{train,val}/{NORMAL,PNEUMONIA}) or CSV manifest")
    p.add_argument("--columns", metavar="NAME=COLUMN,...", help="a CSV manifest's own column names, e.g. path=filename,label=target (names: path, label, patient_id, split)")
    p.add_argument("--data-card", metavar="FILE", help="data card for the model card (YAML, or Markdown with front matter: "
                   "name, source, license, citation, population); default: the data folder's data card or README")
    p.add_argument("--model", help="registered model name (see 'pneumoscan models')")
    p.add_argument("--out", help="run directory")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help="shipped preset (default, study_seed_cnn, study_vgg16, study_resnet50, ...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (or cross-validation)")
    p.add_argument("--folds", type=int, nargs="?", const=5, metavar="K",
                   help="patient-grouped K-fold cross-validation of the training data (K >= 2; 5 when --folds is given without a "
                        "value): one run per fold in OUT/fold-<k>/, out-of-fold predictions and summary in OUT/cv/")
    p.add_argument("--refit", action="store_true",
                   help="with --folds: then train the recipe once more on every training image (OUT/final/), calibrated on the "
                        "out-of-fold predictions: the model to ship")
    p.add_argument("--overwrite", action="store_true", help="start again in a run directory that holds a run")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--weights", help="none, imagenet or a path to a state dict")
    p.add_argument("--input-size", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--val-source", help="grouped (default), official, a manifest CSV, or fold:I/K")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--class-balance", choices=["weighted_loss", "sampler", "none"])
    p.add_argument("--threshold-method", choices=["youden", "sensitivity", "f1"])
    p.add_argument("--patience", type=int, help="early-stopping patience (0 = off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers")
    p.add_argument("--limit", type=int, help="use at most N training images")
    p.add_argument("--freeze-backbone", action="store_true")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    p.set_defaults(func=_cmd_train)
