"""Fitting a model's distribution-shift detector (:mod:`pneumoscan.inference.shift`) on the
training images of its run, its threshold on the run's validation images.

- :func:`fit_detector`: the detector of a model on given training and validation images;
- :func:`refit_bundle`: a copy of a run's bundle with ``provenance["shift"]`` fitted on the
  run's split (``pneumoscan calibrate --checkpoint RUN --refit-shift``);
- :func:`fit_default`: the shipped default model's sidecar ``assets/default/shift.npz``,
  listed in its manifest (``shift_file``, ``shift_sha256``). The run's split files are not
  shipped, so the patient-grouped split is rebuilt from the stored configuration (seed and
  validation fraction) and checked against the stored validation labels and logits::

      python -m pneumoscan.workflows.shift_fit --default [--data /path/to/chest_xray_224]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import TrainConfig
from ..data.datasets import Sample, load_samples, read_manifest
from ..data.splits import grouped_stratified_split
from ..errors import CheckpointError, DataError
from ..evaluation.data_card import resolve_data_card
from ..inference import load_predictor
from ..inference.features import default_layer, forward_files
from ..inference.shift import MAX_FLAG_RATE, ShiftDetector, fit_shift_detector, replace_detector
from ..models.bundle import DEFAULT_MANIFEST, ModelBundle, default_manifest, default_model_dir, load_bundle
from ..utils.io import atomic_write_bytes, atomic_write_text, sha256_file
from .cv_refit import FINAL_DIR

log = logging.getLogger(__name__)

#: The sidecar of the shipped default model.
DEFAULT_SIDECAR = "shift.npz"
#: Largest difference between recomputed and stored validation logits that still means "the same
#: images" (the shipped weights are fp16, the stored logits came from the fp32 model).
LOGIT_TOLERANCE = 0.25


def population_of(root: str | Path | None) -> str:
    """What a model trained on ``root`` was validated on, in words: the data card's population
    (its first clause), else the folder's name.

    Args:
        root: the training data folder (or manifest).
    """
    if not root:
        return "its training data (population not documented)"
    text = (resolve_data_card(None, str(root)).get("population") or "").split(";")[0].strip().rstrip(".")
    if text:
        return text[0].lower() + text[1:]
    return f"images of {Path(str(root)).name} (population not documented)"


def run_split(bundle: ModelBundle, data: str | Path | None = None) -> tuple[list[Sample], list[Sample], str]:
    """The training and validation images of a model's run: the run's ``split_train.csv`` and
    ``split_val.csv`` beside the bundle file when there, else the patient-grouped split rebuilt
    from the stored configuration.

    Args:
        bundle: the model (``path`` locates the run; ``provenance["config"]`` its settings).
        data: the training data folder, when it moved since (default: the configuration's).

    Returns:
        ``(train, val, root)``.

    Raises:
        DataError: no split files and a configuration that cannot be rebuilt.
    """
    cfg = TrainConfig.from_dict(bundle.provenance.get("config") or {})
    root = str(data or cfg.data.root or "")
    run = Path(bundle.path).parent if bundle.path is not None else None
    if data is None and run is not None and (run / "split_train.csv").is_file() and (run / "split_val.csv").is_file():
        return read_manifest(run / "split_train.csv"), read_manifest(run / "split_val.csv"), root
    if not root or cfg.data.val_source != "grouped" or cfg.data.limit:
        raise DataError(f"{bundle.name}: no split files beside the checkpoint, and its split cannot be rebuilt "
                        "(needs a patient-grouped split of a data folder, without data.limit)")
    samples = load_samples(root, cfg.data.train_split, cfg.data.columns)
    train, val = grouped_stratified_split(samples, cfg.data.val_fraction, cfg.data.split_seed)
    log.info("rebuilt the patient-grouped split of %s (seed %d, validation fraction %.2f): %d training, %d validation images",
             root, cfg.data.split_seed, cfg.data.val_fraction, len(train), len(val))
    return train, val, root


def fit_detector(
    bundle: ModelBundle, train: Sequence[Sample], val: Sequence[Sample], *, population: str, fitted_on: str,
    batch_size: int = 32, device: str = "cpu", n_components: int | None = None,
) -> tuple[ShiftDetector, np.ndarray]:
    """A detector of ``bundle`` fitted on the features of ``train``, its threshold set on ``val``.

    Args:
        bundle: the model (with weights).
        train: training images.
        val: validation images.
        population: what the model was validated on, in words.
        fitted_on: where the images came from.
        batch_size: images per forward pass.
        device: torch device.
        n_components: principal components (default :data:`~pneumoscan.inference.shift.DEFAULT_COMPONENTS`).

    Returns:
        The detector and the validation logits (in ``val`` order; NaN for unreadable files).

    Raises:
        DataError: too few readable images.
    """
    tr, va, layer = _features(bundle, train, val, batch_size=batch_size, device=device)
    kw: dict[str, Any] = {} if n_components is None else {"n_components": n_components}
    det = fit_shift_detector(tr.features, va.features, layer=layer, population=population, fitted_on=fitted_on, **kw)
    logits = np.full(len(val), np.nan)
    logits[va.index] = va.logits
    return det, logits


def _features(bundle: ModelBundle, train: Sequence[Sample], val: Sequence[Sample] | None, *, batch_size: int,
              device: str) -> tuple[Any, Any, str]:
    """The pooled features (and logits) of the training and validation images (``None``: no
    validation images) through the model, and the layer."""
    predictor = load_predictor(bundle, backend="torch", device=device, batch_size=batch_size, guard=False)
    layer = default_layer(predictor.runner)
    tr = forward_files(predictor, [s.path for s in train], layer)
    va = None if val is None else forward_files(predictor, [s.path for s in val], layer)
    for name, fs, src in (("training", tr, train), ("validation", va, val)):
        for i, why in list(fs.errors.items())[:5] if fs is not None else ():
            log.warning("shift fit: %s image %s skipped: %s", name, src[i].path, why)  # type: ignore[index]
    return tr, va, layer


def fit_refit_detector(bundle: ModelBundle, cv_dir: str | Path, *, fold: int = 1, batch_size: int = 32, device: str = "cpu",
                       max_flag_rate: float = MAX_FLAG_RATE) -> ShiftDetector:
    """The detector of a model trained on every image of a cross-validation (``--refit``).

    Such a model has no held-out images, so the threshold is set by the rule a fold model
    teaches: the fold model's detector (fitted on its training images) flags ``max_flag_rate``
    of its held-out fold above the ``q``-th percentile of its training scores; the final model's
    threshold is the same ``q``-th percentile of its own training scores.

    Args:
        bundle: the final model (trained on ``cv_dir/final/split_train.csv``).
        cv_dir: its cross-validation directory (``fold-<fold>/`` and ``final/`` with split files).
        fold: the fold whose held-out images set the percentile.
        batch_size: images per forward pass.
        device: torch device.
        max_flag_rate: share of held-out images to flag.

    Raises:
        DataError: missing fold runs or unreadable images.
    """
    fb = load_bundle(Path(cv_dir) / f"fold-{fold}" / "best.pt")
    f_train, f_val, root = run_split(fb)
    ftr, fva, layer = _features(fb, f_train, f_val, batch_size=batch_size, device=device)
    fdet = fit_shift_detector(ftr.features, fva.features, layer=layer, population="", fitted_on="")
    s_train, s_val = fdet.score(ftr.features), fdet.score(fva.features)
    cut = float(np.quantile(s_val, 1.0 - max_flag_rate, method="higher"))
    q = float(100.0 * np.mean(s_train <= cut))
    train = read_manifest(Path(cv_dir) / FINAL_DIR / "split_train.csv")
    tr, _, layer = _features(bundle, train, None, batch_size=batch_size, device=device)
    det = fit_shift_detector(tr.features, tr.features, layer=layer, population=population_of(root),
                             fitted_on=f"every training image of {Path(root).name} ({len(train)} images)")
    s_all = det.score(tr.features)
    det.threshold = float(np.percentile(s_all, q))
    det.stats.update(rule=f"train-p{q:.2f}", train_flag_rate=float(np.mean(s_all > det.threshold)), n_val=int(len(f_val)),
                     val_flag_rate=float(np.mean(s_val > cut)), val_score_median=float(np.median(s_val)),
                     note=f"threshold: the training percentile above which fold {fold}'s model flagged {100 * max_flag_rate:g} % of its "
                          f"{len(f_val)} held-out images (the final model has no held-out images of its own)")
    log.info("shift detector of the refitted model: threshold %.2f (training p%.2f, from fold %d: %.1f %% of %d held-out images)",
             det.threshold, q, fold, 100 * det.stats["val_flag_rate"], len(f_val))
    return det


def refit_bundle(bundle: ModelBundle, data: str | Path | None = None, **kw: Any) -> ModelBundle:
    """A copy of a run's bundle with its detector fitted on the run's split (:func:`run_split`).

    Args:
        bundle: the model; not modified.
        data: the training data folder, when it moved since.
        **kw: ``batch_size``, ``device``, ``n_components`` of :func:`fit_detector`.
    """
    train, val, root = run_split(bundle, data)
    det, _ = fit_detector(bundle, train, val, population=population_of(root), fitted_on=f"training split of {Path(root).name}", **kw)
    return replace_detector(bundle, det)


def fit_default(data: str | Path | None = None, dest: str | Path | None = None, *, batch_size: int = 32, device: str = "cpu",
                expect_val: int | None = None, cv_dir: str | Path | None = None) -> dict[str, Any]:
    """Fit the shipped default model's detector on its rebuilt training split and write the
    sidecar (detector + validation logits and labels) and the manifest entries.

    Args:
        data: the training data folder (default: the stored configuration's root).
        dest: the default model's folder (default: the installed one).
        batch_size: images per forward pass.
        device: torch device.
        expect_val: validation images the rebuilt split must hold (default: as many as the
            stored validation labels).
        cv_dir: the cross-validation directory of a model trained on every image (``train
            --folds K --refit``): the detector is fitted by :func:`fit_refit_detector`.

    Returns:
        The detector's ``stats`` plus ``threshold``, ``file``, ``sha256`` and
        ``max_logit_difference`` (recomputed vs stored validation logits).

    Raises:
        DataError: the rebuilt split is not the stored one (counts, labels or logits differ).
    """
    folder = Path(dest or default_model_dir())
    bundle = load_bundle(None) if dest is None else load_bundle(folder / str(default_manifest(folder)["file"]))
    stored_y = np.asarray(bundle.provenance.get("val_labels") or [], np.int64)
    stored_z = np.asarray(bundle.provenance.get("val_logits") or [], np.float64)
    diff = None
    if cv_dir is not None:  # trained on every image (--refit): no held-out split of its own
        det = fit_refit_detector(bundle, cv_dir, batch_size=batch_size, device=device)
    else:
        train, val, root = run_split(bundle, data)
        y = np.asarray([s.label for s in val], np.int64)
        want = expect_val if expect_val is not None else stored_y.size
        if len(val) != want or not np.array_equal(y, stored_y):
            raise DataError(f"the rebuilt validation split ({len(val)} images) is not the default model's ({want} images, stored labels)")
        det, z = fit_detector(bundle, train, val, population=population_of(root), batch_size=batch_size, device=device,
                              fitted_on=f"default model's training split of {Path(root).name} ({len(train)} images)")
        diff = float(np.nanmax(np.abs(z - stored_z)))
        if not diff <= LOGIT_TOLERANCE:
            raise DataError(f"recomputed validation logits differ from the stored ones by up to {diff:.3f}: not the same images")
    data_bytes = det.to_npz({"val_logits": stored_z, "val_labels": stored_y})
    atomic_write_bytes(folder / DEFAULT_SIDECAR, data_bytes)
    man = default_manifest(folder)
    if man.get("sha256") != bundle.sha256:
        raise CheckpointError(f"{folder / DEFAULT_MANIFEST} does not describe the loaded default model")
    man.update(shift_file=DEFAULT_SIDECAR, shift_sha256=sha256_file(folder / DEFAULT_SIDECAR))
    atomic_write_text(folder / DEFAULT_MANIFEST, json.dumps(man, indent=2) + "\n")
    log.info("wrote %s (sha256 %s…)%s", folder / DEFAULT_SIDECAR, man["shift_sha256"][:12],
             "" if diff is None else f"; validation logits recomputed within {diff:.4f} of the stored ones")
    return {**det.stats, "threshold": det.threshold, "file": str(folder / DEFAULT_SIDECAR), "sha256": man["shift_sha256"],
            "max_logit_difference": diff}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pneumoscan.workflows.shift_fit --default``: fit the default model's sidecar."""
    p = argparse.ArgumentParser(prog="python -m pneumoscan.workflows.shift_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--default", action="store_true", required=True, help="fit the shipped default model's sidecar")
    p.add_argument("--data", help="the default model's training data folder (default: its stored configuration's)")
    p.add_argument("--expect-val", type=int, help="validation images the rebuilt split must hold")
    p.add_argument("--cv", help="the cross-validation directory of a default model trained with train --folds K --refit")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = fit_default(args.data, batch_size=args.batch_size, device=args.device, expect_val=args.expect_val, cv_dir=args.cv)
    log.info("%s", json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
