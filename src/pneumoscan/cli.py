"""The ``pneumoscan`` command: a thin layer over the Python API.

Each feature module contributes its sub-commands through a ``register(subparsers)``
function listed in :data:`COMMAND_MODULES`. Errors on bad input become one line on stderr
and a non-zero exit code; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .utils.version import __version__
from .errors import PneumoscanError
from .utils.runtime import tune_malloc

log = logging.getLogger("pneumoscan")

#: Modules whose ``register(subparsers)`` adds sub-commands (imported when the CLI starts).
COMMAND_MODULES: tuple[str, ...] = ("pneumoscan.serving.cli", "pneumoscan.evaluation.cli", "pneumoscan.bench.cli", "pneumoscan.inference.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: INFO by default, DEBUG with -v, WARNING with -q. Only rank 0 of a
    torchrun job logs at INFO."""
    level = logging.INFO - 10 * verbosity if verbosity >= 0 else logging.WARNING
    if int(os.environ.get("RANK", "0")) != 0:
        level = max(level, logging.WARNING)
    root = logging.getLogger("pneumoscan")
    root.setLevel(level)
    for old in [h for h in root.handlers if getattr(h, "_pneumoscan", False)]:
        old.setLevel(level)
    if not any(getattr(h, "_pneumoscan", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(level)  # the stderr verbosity lives on the handler: train.log still gets INFO
        h.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._pneumoscan = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


# ----------------------------------------------------------------------------- models
def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models import count_parameters, create_model, get_spec, list_models

    rows = []
    with torch.device("meta"):
        for name in list_models():
            spec = get_spec(name)
            m = create_model(name)
            rows.append({
                "name": name, "trainable_parameters": count_parameters(m), "total_parameters": count_parameters(m, False),
                "input": f"{spec.input_size}x{spec.input_size}x1 -> {spec.in_channels}ch", "weights": "imagenet" if spec.pretrained else "none",
                "gradcam_layer": spec.gradcam_layer, "description": spec.description,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'name':<16}{'trainable':>13}{'input':>20}  {'pretrained':<11}description")
    for r in rows:
        print(f"{r['name']:<16}{r['trainable_parameters']:>13,}{r['input']:>20}  {r['weights']:<11}{r['description']}")
    return EXIT_OK


# ----------------------------------------------------------------------------- data
def _cmd_data_summary(args: argparse.Namespace) -> int:
    from .data.summary import format_summary, summarize

    s = summarize(args.data)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return EXIT_OK


# ----------------------------------------------------------------------------- train
def build_train_config(args: argparse.Namespace):
    """Preset or YAML file, then explicit flags, then ``--set key=value`` overrides."""
    from .config import TrainConfig, load_preset

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
        "class_balance": args.class_balance,
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
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import fit

    if args.resume:
        summary = fit(None, args.resume, resume=True)  # type: ignore[arg-type]
    else:
        if not args.out:
            raise PneumoscanError("train needs --out RUN_DIR (or --resume RUN_DIR)")
        cfg = build_train_config(args)
        out = Path(args.out)
        if (out / "last.pt").exists() and not args.overwrite:
            raise PneumoscanError(f"{out} already holds a run; use --resume {out} to continue it or --overwrite to start again")
        summary = fit(cfg, out)
    if int(os.environ.get("RANK", "0")) == 0:
        vm = summary.get("val_metrics") or {}
        if vm:
            log.info(
                "done: %s — validation AUC %.4f, sensitivity %.3f, specificity %.3f at threshold %.3f",
                summary["run_dir"], vm.get("roc_auc", float("nan")), vm.get("sensitivity", float("nan")),
                vm.get("specificity", float("nan")), summary.get("threshold", float("nan")),
            )
    return EXIT_OK


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (also under torchrun for DDP)", description="Train a registered model. "
                       "Settings: --preset or --config FILE.yaml, then flags, then --set key=value (e.g. --set optim.scheduler=cosine).")
    p.add_argument("--data", help="dataset folder (ROOT/{train,val}/{NORMAL,PNEUMONIA}) or CSV manifest")
    p.add_argument("--model", help="registered model name (see 'pneumoscan models')")
    p.add_argument("--out", help="run directory")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help="shipped preset (default, study_seed_cnn, study_vgg16, study_resnet50, ...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
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
    p.add_argument("--val-source", help="grouped (default), official, or a manifest CSV")
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


# ----------------------------------------------------------------------------- weights
def _cmd_weights_import(args: argparse.Namespace) -> int:
    from .models.weights import import_weights

    target = import_weights(args.file, sha256=args.sha256, dest_dir=args.dest)
    print(target)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description="Pneumonia detection on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    ps = dsub.add_parser("summary", help="images, patients, sizes, duplicates and balance of a dataset")
    ps.add_argument("data", help="dataset folder or CSV manifest")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=_cmd_data_summary)

    _add_train(sub)

    p = sub.add_parser("weights", help="pretrained weight files")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    pi = wsub.add_parser("import", help="verify a downloaded weights file and place it in the torch hub cache")
    pi.add_argument("file")
    pi.add_argument("--sha256", help="expected sha256 (full or prefix) if the file name carries none")
    pi.add_argument("--dest", help="target folder (default: $TORCH_HOME/hub/checkpoints)")
    pi.set_defaults(func=_cmd_weights_import)

    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumoscan`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    tune_malloc()  # before PyTorch allocates anything (see pneumoscan.utils.runtime)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args) or 0)
    except PneumoscanError as e:
        if args.debug:
            log.exception("error")
        log.error("error: %s", e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            log.exception("internal error")
        log.error("internal error: %s: %s (rerun with --debug for details)", e.__class__.__name__, e)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
