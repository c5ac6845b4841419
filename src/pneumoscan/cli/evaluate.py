"""Sub-commands ``evaluate``, ``calibrate``, ``compare`` and ``reproduce``.

Registered by :mod:`pneumoscan.cli` through :func:`register`. Bad input raises a
:class:`~pneumoscan.errors.PneumoscanError`, which the CLI turns into one line and exit 1.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PneumoscanError

log = logging.getLogger(__name__)


def _positive_resamples(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{value}'") from None
    if n < 100:
        raise argparse.ArgumentTypeError("use at least 100 resamples (1,000 or more for reported intervals)")
    return n


# --------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..core.metrics import format_value
    from ..evaluation.evaluate import evaluate_model
    from ..evaluation.summaries import overlap_line

    r = evaluate_model(
        args.data, args.out, args.checkpoint, split=args.split, n_resamples=args.bootstrap, seed=args.seed,
        device=args.device, batch_size=args.batch_size, summary=not args.no_summary, columns=args.columns,
    )
    if args.json:
        keys = ("model", "threshold", "temperature", "at_operating_threshold", "at_0.5", "training_overlap")
        print(json.dumps({k: r[k] for k in keys}, indent=2))
        return 0
    op = r["at_operating_threshold"]
    print(f"{r['model']} on {op['n']} images (NORMAL {op['n_per_class']['NORMAL']}, PNEUMONIA {op['n_per_class']['PNEUMONIA']})"
          + (f", {r['n_unreadable']} unreadable" if r["n_unreadable"] else ""))
    print(f"{'metric':<14}{'at threshold ' + format(r['threshold'], '.3f'):<28}{'at 0.5':<28}")
    for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "brier", "ece"):
        print(f"{k:<14}{format_value(op[k]):<28}{format_value(r['at_0.5'][k]):<28}")
    if r["training_overlap"] and r["training_overlap"]["images"]:
        print(f"warning: {overlap_line(r['training_overlap'], r['n_images'])}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


# --------------------------------------------------------------------------- calibrate
def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.data:
        return _calibrate_on_data(args)
    from ..core.calibration import calibration_summary
    from ..evaluation.recalibrate import recalibrate_file

    if not args.checkpoint:
        raise ConfigError("calibrate needs --checkpoint CKPT (its stored validation logits), or --data DIR (a site's labelled images)")
    refit = None
    if args.refit_shift:
        from ..workflows.shift_fit import refit_bundle

        refit = functools.partial(refit_bundle, batch_size=args.batch_size, device=args.device)
    old, new = recalibrate_file(args.checkpoint, args.out, method=args.method, target_sensitivity=args.target,
                                refit_temperature=not args.keep_temperature, in_place=args.in_place, refit=refit)
    cal = calibration_summary(new.provenance["val_logits"], new.provenance["val_labels"], new.temperature)
    vm = new.val_metrics
    print(f"threshold {old.threshold:.4f} ({old.threshold_method}) -> {new.threshold:.4f} ({args.method}"
          + (f", target sensitivity {args.target:.2f}" if args.method == "sensitivity" else "") + ")")
    print(f"temperature {old.temperature:.4f} -> {new.temperature:.4f}; validation ECE "
          f"{cal['ece_before']:.4f} at T=1 -> {cal['ece_after']:.4f}")
    print(f"validation (n={vm['n']}): sensitivity {vm['sensitivity']:.3f}, specificity {vm['specificity']:.3f}, "
          f"accuracy {vm['accuracy']:.3f}, ROC-AUC {vm['roc_auc']:.4f}")
    if args.refit_shift:
        _print_shift(new.provenance["shift"]["stats"], new.provenance["shift"]["threshold"], "validation")
    print(f"written: {new.path}")
    return 0


def _print_shift(stats: dict[str, Any], threshold: float, held: str) -> None:
    print(f"shift detector refitted on {stats['n_train']} images: threshold {threshold:.2f} ({stats['rule']}); "
          f"{100 * stats['val_flag_rate']:.1f} % of {stats['n_val']} {held} images flagged")


def _calibrate_on_data(args: argparse.Namespace) -> int:
    from ..core.metrics import format_value
    from ..evaluation.recalibrate import site_calibrate_file

    old, cal = site_calibrate_file(
        args.checkpoint, args.data, args.out, in_place=args.in_place, split=args.split, columns=args.columns, method=args.method,
        target_sensitivity=args.target, refit_temperature=not args.keep_temperature, refit_shift=args.refit_shift,
        n_resamples=args.bootstrap, seed=args.seed, batch_size=args.batch_size, device=args.device,
    )
    for w in cal.warnings:
        log.warning("warning: %s", w)
    new, d = cal.bundle, cal.data
    print(f"{old.name} calibrated on {d['n']} images of {d['description']}: {', '.join(f'{k} {v}' for k, v in d['n_per_class'].items())}"
          + (f"; {d['n_unreadable']} unreadable skipped" if d["n_unreadable"] else ""))
    print(f"threshold {old.threshold:.4f} ({old.threshold_method}) -> {new.threshold:.4f} ({args.method}"
          + (f", target sensitivity {args.target:.2f}" if args.method == "sensitivity" else "") + ")")
    print(f"temperature {old.temperature:.4f} -> {new.temperature:.4f}")
    print(f"{'metric':<13}{'before':<36}after (fitted on these images: optimistic)")
    for k in ("sensitivity", "specificity", "accuracy", "precision", "npv", "roc_auc", "ece"):
        print(f"{k:<13}{format_value(cal.before.get(k)):<36}{format_value(cal.after.get(k))}")
    if cal.shift is not None:
        _print_shift(cal.shift, cal.shift["threshold"], "held-out")
    print(f"written: {new.path}")
    return 0


# --------------------------------------------------------------------------- compare
def _cmd_compare(args: argparse.Namespace) -> int:
    from ..evaluation.compare import compare_models
    from ..evaluation.render import render_compare_markdown

    r = compare_models(args.sources, args.data, args.out, split=args.split, n_resamples=args.bootstrap, seed=args.seed,
                       device=args.device, batch_size=args.batch_size, columns=args.columns)
    print(render_compare_markdown(r, {}).split("## Models (details)")[0].rstrip())
    print(f"\nwritten: {Path(args.out) / 'compare.html'}")
    return 0


# --------------------------------------------------------------------------- reproduce
def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    over: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        over[k.strip()] = v
    return over


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ..workflows.reproduce import STUDY_MODELS, estimate_run_time, reproduce

    models = [m.strip() for m in (args.models or ",".join(STUDY_MODELS)).split(",") if m.strip()]
    over = _parse_sets(args.set)
    if args.device_train:
        over["device"] = args.device_train
    if args.limit:
        over["data.limit"] = args.limit
    if args.no_progress:
        over["progress"] = False
    if args.columns:
        over["data.columns"] = args.columns
    if args.estimate:
        n_train, n_val = 4434, 782
        if args.data:
            from ..config import load_preset
            from ..data.datasets import load_samples

            n = len(load_samples(args.data, load_preset(f"study_{models[0]}").data.train_split, args.columns))
            n_val = round(n * 0.15)
            n_train = n - n_val
        rows = estimate_run_time(models, n_train=n_train, n_val=n_val, epochs=args.epochs, steps=args.estimate_steps,
                                 batch_size=args.estimate_batch, device=args.device_train or "auto")
        print(f"{'model':<10}{'device':>8}{'precision':>11}{'batch':>7}{'train img/s':>13}{'eval img/s':>12}{'s/epoch':>9}{'epochs':>7}{'run (min)':>10}")
        for r in rows:
            print(f"{r['model']:<10}{r['device']:>8}{r['precision']:>11}{r['batch_size']:>7}{r['train_images_per_s']:>13.1f}"
                  f"{r['eval_images_per_s']:>12.1f}{r['seconds_per_epoch']:>9.0f}{r['epochs']:>7}{r['seconds_per_run'] / 60:>10.1f}")
        total = sum(r["seconds_per_run"] for r in rows)
        print(f"estimated total: {total / 3600:.2f} h for {n_train} training + {n_val} validation images per epoch "
              f"(compute only, upper bound: early stopping usually ends runs sooner; epoch 1 also decodes every image)")
        return 0
    if not args.data or not args.out:
        raise PneumoscanError("reproduce needs --data DIR and --out DIR (or --estimate)")
    r = reproduce(args.data, args.out, models, epochs=args.epochs, overrides=over, n_resamples=args.bootstrap, seed=args.seed,
                  device=args.device)
    for m, s in r["models"].items():
        if s["status"] == "trained":
            vm = s.get("val_metrics") or {}
            print(f"{m:<10} trained in {s['wall_seconds'] / 60:.1f} min, {s['epochs_run']} epoch(s); validation AUC "
                  f"{vm.get('roc_auc', float('nan')):.4f} — {s['run_dir']}")
        else:
            print(f"{m:<10} SKIPPED: {s['reason']}")
    if r.get("compare"):
        print(f"comparison on {r['compare']['n']} validation images: {Path(r['compare']['dir']) / 'compare.html'}")
    return 0


# --------------------------------------------------------------------------- registration
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=_positive_resamples, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--device", default="cpu", help="device of the predictor (default cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--columns", metavar="NAME=COLUMN,...", help="a CSV manifest's own column names, e.g. path=filename,label=target (names: path, label, patient_id, split)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``calibrate``, ``compare`` and ``reproduce`` to the CLI.

    Args:
        subparsers: the ``pneumoscan`` parser's sub-command action.
    """
    p = subparsers.add_parser(
        "evaluate", help="metrics with confidence intervals, plots and an HTML report on labelled images",
        description="Score labelled images and write metrics.json, predictions.csv, plots, report.html and report.md.",
    )
    p.add_argument("--data", required=True, help="dataset ROOT (uses ROOT/<split>), a folder holding NORMAL/ and PNEUMONIA/, or a CSV manifest")
    p.add_argument("--split", help="split folder of ROOT (default test) or value of a manifest's split column (default: every row)")
    p.add_argument("--checkpoint", help="checkpoint .pt or run directory (default: the shipped default model)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--no-summary", action="store_true", help="leave the data summary out of the report")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser(
        "calibrate", help="re-derive threshold and temperature from stored validation logits or a site's labelled images",
        description="Refit temperature scaling and choose a new operating threshold without retraining: on the validation "
                    "logits stored in a checkpoint, or with --data on a site's own labelled images (before/after metrics "
                    "with 95% intervals; what it was calibrated on is recorded in the bundle and its model card). Writes "
                    "--out NEW.pt (the input is never overwritten), or updates the checkpoint with --in-place.",
    )
    p.add_argument("--checkpoint", help="checkpoint .pt or run directory (with --data: default the shipped default model)")
    p.add_argument("--data", help="a site's labelled images: dataset ROOT (uses ROOT/<split>), a folder holding NORMAL/ and "
                                  "PNEUMONIA/, or a CSV manifest (as evaluate)")
    p.add_argument("--split", help="with --data: split folder of ROOT (default test) or a manifest's split (default: every row)")
    p.add_argument("--method", choices=["youden", "sensitivity", "f1"], default="youden")
    p.add_argument("--target", type=float, default=0.95, help="target sensitivity for --method sensitivity (default 0.95)")
    p.add_argument("--keep-temperature", action="store_true", help="keep the stored temperature")
    p.add_argument("--refit-shift", action="store_true",
                   help="also refit the distribution-shift detector: on --data, else on the run's training/validation split")
    p.add_argument("--out", help="new checkpoint file (or directory: its best.pt)")
    p.add_argument("--in-place", action="store_true", help="overwrite the checkpoint (and its run's model card) instead of --out")
    _common(p)
    p.set_defaults(func=_cmd_calibrate)

    p = subparsers.add_parser(
        "compare", help="models side by side: metrics with CIs, speed, ROC/PR overlays, DeLong tests",
        description="Compare checkpoints or run directories on the same labelled images.",
    )
    p.add_argument("sources", nargs="+", metavar="RUN_OR_CKPT", help="run directories or checkpoint files")
    p.add_argument("--data", required=True, help="dataset ROOT, class-folder directory or CSV manifest")
    p.add_argument("--split", help="split folder of ROOT (default test) or manifest split (default: every row)")
    p.add_argument("--out", required=True, help="output folder")
    _common(p)
    p.set_defaults(func=_cmd_compare)

    p = subparsers.add_parser(
        "reproduce", help="train the study's models with their presets and compare them on validation",
        description="Train seed_cnn, vgg16 and resnet50 with the study_* presets (resuming interrupted runs), then compare "
                    "them on the runs' patient-grouped validation split. Models whose ImageNet weights are unavailable are "
                    "skipped with a message. --estimate measures a few steps per model and prints the projected run time.",
    )
    p.add_argument("--data", help="dataset ROOT with train/{NORMAL,PNEUMONIA} (or a CSV manifest)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--models", help="comma-separated study models (default seed_cnn,vgg16,resnet50)")
    p.add_argument("--epochs", type=int, help="override the presets' epoch counts")
    p.add_argument("--limit", type=int, help="use at most N training images per run (smoke tests)")
    p.add_argument("--train-device", dest="device_train", help="training device (auto, cpu, cuda, mps; default: the presets' auto)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--estimate", action="store_true", help="only measure speed and print the projected run time")
    p.add_argument("--estimate-steps", type=int, default=3, help="timed training steps per model for --estimate")
    p.add_argument("--estimate-batch", type=int, help="batch size of the timed steps (default: the presets')")
    _common(p)
    p.set_defaults(func=_cmd_reproduce)
