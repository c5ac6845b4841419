"""Patient-grouped k-fold cross-validation of the training data (``pneumoscan train --folds K``).

Model, recipe and operating-point choices are made on the training data, never on the withheld
test split: the training images are split into K folds by patient, stratified by class
(:func:`~pneumoscan.data.splits.grouped_stratified_kfold`), and one ordinary run is trained per
fold, validated on that fold:

```
OUT/config.yaml          the settings shared by every fold
OUT/fold-<k>/            a normal run directory (best.pt, last.pt, history.csv, MODEL_CARD.md ...)
                         with data.val_source = "fold:<k>/<K>"
OUT/cv/folds.csv         the plan: every training image with its patient and fold
OUT/cv/fold-<k>.json     written when fold k is finished (training, calibration, card)
OUT/cv/oof.csv, cv_summary.json, cv_summary.md, cv_roc.png   (:mod:`.cv_summary`)
OUT/train.log            the log of every fold
OUT/final/               with --refit: the recipe trained on every image, calibrated on oof.csv (:mod:`.cv_refit`)
```

Interrupted, it resumes (``pneumoscan train --resume OUT``, or the same command again):
finished folds are skipped, an interrupted fold continues from its ``last.pt``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..core.labels import CLASS_NAMES
from ..data.datasets import Sample, parse_label, read_manifest
from ..data.splits import fold_source, grouped_stratified_kfold
from ..errors import CheckpointError, ConfigError, DataError
from ..models.validation import jsonable
from ..training.distributed import is_main_process
from ..training.engine import run_log
from ..training.inputs import training_samples
from ..utils.io import atomic_write_text
from .cv_refit import refit_final
from .cv_summary import write_cv_summary
from .train import train

log = logging.getLogger(__name__)

#: The summary folder of a cross-validation directory, and its plan file.
CV_DIR, PLAN_FILE = "cv", "folds.csv"
#: Settings that do not change what a run computes (ignored when a rerun is compared with the saved run).
_COSMETIC = ("progress", "log_every")


def is_cv_run(path: str | Path) -> bool:
    """True when ``path`` holds a cross-validation run (its ``cv/folds.csv``).

    Args:
        path: a directory.
    """
    return (Path(path) / CV_DIR / PLAN_FILE).is_file()


def cross_validate(
    cfg: TrainConfig | None, out: str | Path, folds: int = 5, *, resume: bool = False, overwrite: bool = False, refit: bool = False,
) -> dict[str, Any]:
    """Train one run per patient-grouped fold of the training data and summarise them.

    Args:
        cfg: the settings shared by the folds (``None`` with ``resume``: ``OUT/config.yaml``).
            ``data.val_source`` is replaced by each fold.
        out: the cross-validation directory.
        folds: number of folds K (>= 2); ignored on resume (the saved plan's K).
        resume: continue the cross-validation in ``out``.
        overwrite: start again in a directory that holds a run. Without it, a directory that
            holds this same cross-validation (same settings and K) is resumed, any other run refused.
        refit: then train the recipe's final model on every training image, calibrated on the
            out-of-fold logits (``OUT/final/``, :func:`~pneumoscan.workflows.cv_refit.refit_final`).

    Returns:
        ``run_dir``, ``folds``, ``oof`` (pooled out-of-fold AUC and operating point),
        ``mean_sd`` and ``summary_file`` (see :func:`~pneumoscan.workflows.cv_summary.write_cv_summary`);
        with ``refit``, ``final`` (see :func:`~pneumoscan.workflows.cv_refit.refit_final`).

    Raises:
        ConfigError: fewer than 2 folds, or a directory that holds another run.
        CheckpointError: nothing to resume.
        DataError: too few patients per class for K folds, or data that changed since the plan.
    """
    out = Path(out)
    if resume:
        if not is_cv_run(out):
            raise CheckpointError(f"nothing to resume in {out} (needs {CV_DIR}/{PLAN_FILE})")
        cfg = TrainConfig.from_yaml(out / "config.yaml")
    elif cfg is None:
        raise ConfigError("cross-validation needs a configuration unless it resumes")
    else:
        if folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {folds}")
        cfg.validate()
        resume = not overwrite and _same_run(out, cfg, folds)
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out, enabled=is_main_process()):
        plan = _read_plan(out) if resume else _new_plan(out, cfg, folds)
        k = len(plan)
        log.info("%d-fold patient-grouped cross-validation of %d training images in %s%s", k, sum(map(len, plan)), out,
                 " (resumed)" if resume else "")
        for i, fold in enumerate(plan, start=1):
            c = [sum(s.label == j for s in fold) for j in (0, 1)]
            log.info("  fold %d: %d images of %d patients (NORMAL %d, PNEUMONIA %d: %.1f%% PNEUMONIA)",
                     i, len(fold), len({s.patient for s in fold}), c[0], c[1], 100.0 * c[1] / max(len(fold), 1))
        for i, fold in enumerate(plan, start=1):
            _run_fold(out, cfg, i, k, fold, resume)
        summary = write_cv_summary(out, cfg, k) if is_main_process() else {}
        if refit:
            summary["final"] = refit_final(out, cfg, resume=True)
    return {"run_dir": str(out), **summary}


def _same_run(out: Path, cfg: TrainConfig, folds: int) -> bool:
    """Whether ``out`` holds this very cross-validation (rerunning the command resumes it).

    Raises:
        ConfigError: ``out`` holds another run.
    """
    if is_cv_run(out):
        saved = TrainConfig.from_yaml(out / "config.yaml")
        if _comparable(saved) == _comparable(cfg) and len(_read_plan(out)) == folds:
            log.info("%s holds this cross-validation already: resuming it", out)
            return True
        raise ConfigError(f"{out} holds a cross-validation run with other settings; use --resume {out} to continue it "
                          "or --overwrite to start again")
    if (out / "last.pt").exists():
        raise ConfigError(f"{out} already holds a run; use --resume {out} to continue it or --overwrite to start again")
    return False


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for k in _COSMETIC:
        d.pop(k, None)
    return d


def _new_plan(out: Path, cfg: TrainConfig, k: int) -> list[list[Sample]]:
    """Assign the training images to folds; write ``config.yaml`` and ``cv/folds.csv``."""
    samples = training_samples(cfg)
    plan = grouped_stratified_kfold(samples, k, cfg.data.split_seed)
    if is_main_process():
        (out / CV_DIR).mkdir(exist_ok=True)
        for stale in (out / CV_DIR).glob("fold-*.json"):  # markers of an overwritten run
            stale.unlink()
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "patient_id", "split"])
        for i, fold in enumerate(plan, start=1):
            w.writerows([str(Path(s.path).resolve()), CLASS_NAMES[s.label], s.patient, f"fold-{i}"] for s in fold)
        atomic_write_text(out / CV_DIR / PLAN_FILE, buf.getvalue())
    return plan


def _read_plan(out: Path) -> list[list[Sample]]:
    """The folds of ``cv/folds.csv``, fold 1 first."""
    path = out / CV_DIR / PLAN_FILE
    folds: dict[int, list[Sample]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            folds.setdefault(int(r["split"].removeprefix("fold-")), []).append(Sample(r["path"], parse_label(r["label"], f"{path}: "), r["patient_id"]))
    return [folds[i] for i in sorted(folds)]


def _run_fold(out: Path, cfg: TrainConfig, i: int, k: int, fold: list[Sample], resume: bool) -> None:
    """Train fold ``i`` (or skip it when finished, or resume it when interrupted) and mark it done."""
    run, marker = out / f"fold-{i}", out / CV_DIR / f"fold-{i}.json"
    if resume and marker.is_file() and (run / "best.pt").is_file():
        log.info("fold %d/%d: finished, skipped", i, k)
        return
    if resume and (run / "last.pt").is_file() and (run / "config.yaml").is_file():
        log.info("fold %d/%d: resuming %s", i, k, run)
        result = train(None, run, resume=True)
    else:
        log.info("fold %d/%d: training %s", i, k, run)
        for old in ("best.pt", "last.pt") if is_main_process() else ():  # an overwritten fold keeps nothing of the earlier run
            (run / old).unlink(missing_ok=True)
        result = train(cfg.override({"data.val_source": fold_source(i, k)}), run)
    if not is_main_process():
        return
    held = {str(Path(s.path).resolve()) for s in read_manifest(run / "split_val.csv")}
    if held != {str(Path(s.path).resolve()) for s in fold}:
        raise DataError(f"{run}: its validation images differ from fold {i} of {out / CV_DIR / PLAN_FILE} "
                        "(the data changed since the cross-validation started); start again with --overwrite")
    atomic_write_text(marker, json.dumps(jsonable(result), indent=2) + "\n")
