"""``pneumoscan calibrate``: re-derive a model's temperature and operating threshold without
retraining, from the validation logits stored in its bundle or from a site's own labelled images.

- :func:`recalibrate_bundle` refits on the stored validation logits (a new bundle; the input
  is not modified); :func:`recalibrate_file` loads, recalibrates and writes a bundle file, and
  refreshes the run's model card when it rewrites a run's ``best.pt``.
- :func:`site_calibrate` refits on a site's labelled images (``--data DIR``), measures the
  model there before and after with confidence intervals, and records what it was calibrated on
  (``provenance["calibration"]["data"]``: description, count, sha256 of the sorted file
  hashes); optionally it refits the distribution-shift detector on those images too.
  :func:`site_calibrate_file` writes the result (never over its input unless ``in_place``) and
  its model card.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..core.calibration import check_threshold_rule, fit_operating_point, sigmoid
from ..core.intervals import MIN_PER_CLASS
from ..core.labels import CLASS_NAMES
from ..core.metrics import DEFAULT_RESAMPLES, bootstrap_metrics
from ..errors import CheckpointError, ConfigError, DataError
from ..utils.io import atomic_write_text, sha256_file

if TYPE_CHECKING:
    from ..inference.shift import ShiftDetector
    from ..models.bundle import ModelBundle

log = logging.getLogger(__name__)

#: Share of a site's images held out to set a refitted shift detector's threshold.
SHIFT_HOLDOUT = 0.2
#: Fewest readable images a shift detector is refitted on.
MIN_SHIFT_IMAGES = 10


def recalibrate_bundle(
    bundle: ModelBundle, method: str = "youden", target_sensitivity: float = 0.95, refit_temperature: bool = True,
) -> ModelBundle:
    """A copy of ``bundle`` with its temperature and threshold fitted again on its stored
    validation logits (``provenance["val_logits"]``/``["val_labels"]``).

    Args:
        bundle: the model; not modified.
        method: ``"youden"``, ``"sensitivity"`` or ``"f1"`` (see
            :func:`~pneumoscan.core.calibration.select_threshold`).
        target_sensitivity: sensitivity the ``"sensitivity"`` rule must reach.
        refit_temperature: fit the temperature again (otherwise keep the stored one).

    Returns:
        A new, unsaved bundle with ``threshold``, ``temperature``, ``threshold_method`` and
        ``val_metrics`` replaced, and ``provenance["calibration"]`` recording the rule
        (``method``, ``target_sensitivity``, ``refit_temperature``).

    Raises:
        CheckpointError: the bundle holds no validation logits, or a single class.
        ConfigError: unknown method or target outside (0, 1].
    """
    check_threshold_rule(method, target_sensitivity)
    z = np.asarray(bundle.provenance.get("val_logits") or [], dtype=np.float64)
    y = np.asarray(bundle.provenance.get("val_labels") or [], dtype=np.int64)
    if z.size == 0 or z.size != y.size:
        raise CheckpointError("the checkpoint stores no validation logits (val_logits/val_labels); retrain or evaluate instead")
    if y.min() == y.max():
        raise CheckpointError("the stored validation split has a single class; no threshold can be derived from it")
    op = fit_operating_point(z, y, method, target_sensitivity, temperature=None if refit_temperature else bundle.temperature)
    provenance = {**bundle.provenance, "calibration": {
        "method": method, "target_sensitivity": op.target_sensitivity, "refit_temperature": refit_temperature}}
    return bundle.replace(threshold=op.threshold, temperature=op.temperature, threshold_method=method,
                          val_metrics=op.val_metrics, provenance=provenance)


def _check_destination(checkpoint: str | Path | None, out: str | Path | None, in_place: bool) -> None:
    """Refuse, before any work, neither or both of ``out`` and ``in_place``, and the shipped
    default model in place.

    Raises:
        ConfigError: with the fix.
    """
    if (out is None) == (not in_place):
        raise ConfigError("give a new file with --out NEW.pt, or --in-place to overwrite the checkpoint" if out is None
                          else "give --out or --in-place, not both")
    if in_place and checkpoint is None:
        raise ConfigError("the shipped default model is never overwritten: give --out NEW.pt")


def _destination(old: ModelBundle, checkpoint: str | Path | None, out: str | Path | None) -> Path:
    """Where a recalibrated bundle goes: ``out`` (a directory: its ``best.pt``), else the input.

    Raises:
        ConfigError: ``out`` is the input file.
    """
    src = Path(old.path or checkpoint or "")
    dest = Path(out) if out is not None else src
    if dest.is_dir():
        dest = dest / "best.pt"
    if out is not None and dest.exists() and src.exists() and dest.resolve() == src.resolve():
        raise ConfigError(f"--out {out} is the input checkpoint; give another file, or --in-place to overwrite it")
    return dest


def _keep_detector(old: ModelBundle, new: ModelBundle, detector: ShiftDetector | None = None) -> ModelBundle:
    """``new`` with ``detector``, else the detector ``old`` has (the shipped default model's sidecar
    no longer applies to a new file, so it goes into the bundle)."""
    from ..inference.shift import replace_detector, shift_detector

    det = detector or shift_detector(old)
    return replace_detector(new, det) if det is not None else new


def recalibrate_file(
    checkpoint: str | Path, out: str | Path | None = None, *, method: str = "youden", target_sensitivity: float = 0.95,
    refit_temperature: bool = True, in_place: bool = False, refit: Callable[[ModelBundle], ModelBundle] | None = None,
) -> tuple[ModelBundle, ModelBundle]:
    """Recalibrate a bundle file and write the result.

    Args:
        checkpoint: bundle file or run directory.
        out: destination file, or a directory (its ``best.pt``); ``None`` with ``in_place``.
        method: threshold rule (see :func:`recalibrate_bundle`).
        target_sensitivity: sensitivity the ``"sensitivity"`` rule must reach.
        refit_temperature: fit the temperature again.
        in_place: overwrite the input (instead of ``out``).
        refit: a last change to the new bundle before it is written (e.g. refitting its shift
            detector on the run's split: :func:`pneumoscan.workflows.shift_fit.refit_bundle`).

    Returns:
        The input bundle and the new one (its ``path`` and ``sha256`` are those of the file
        written). When the destination is a run's ``best.pt`` (``config.yaml`` beside it), the
        run's ``MODEL_CARD.md`` is rewritten too.

    Raises:
        CheckpointError: unreadable input, no validation logits, or the file cannot be written.
        ConfigError: unknown method or target outside (0, 1]; neither or both of ``out`` and
            ``in_place``; ``out`` is the input.
    """
    from ..models.bundle import load_bundle, save_bundle

    from .model_card import write_model_card

    _check_destination(checkpoint, out, in_place)
    old = load_bundle(checkpoint)
    dest = _destination(old, checkpoint, out)
    new = _keep_detector(old, recalibrate_bundle(old, method, target_sensitivity, refit_temperature))
    if refit is not None:
        new = refit(new)
    save_bundle(new, dest)
    if dest.name == "best.pt" and (dest.parent / "config.yaml").is_file():
        write_model_card(dest.parent, new)
    return old, new


# ----------------------------------------------------------------------------- site calibration
@dataclass
class SiteCalibration:
    """What :func:`site_calibrate` measured.

    Attributes:
        bundle: the new, unsaved bundle.
        data: ``provenance["calibration"]["data"]``: ``description``, ``split``, ``n``,
            ``n_per_class``, ``n_unreadable``, ``sha256``.
        before: :func:`~pneumoscan.core.metrics.bootstrap_metrics` section on the site's
            images with the old temperature and threshold.
        after: the same with the new ones (fitted on these images: optimistic).
        warnings: what the user must know (too few images of a class for the target, ...).
        shift: the refitted detector's ``stats`` and ``threshold`` (``None`` unless refitted).
    """

    bundle: ModelBundle
    data: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    shift: dict[str, Any] | None = None


def files_fingerprint(paths: list[str]) -> str:
    """sha256 of the sorted sha256 hex digests of files (one per line): the same images give
    the same value whatever their names or order.

    Args:
        paths: the files.
    """
    return hashlib.sha256("\n".join(sorted(sha256_file(p) for p in paths)).encode("ascii")).hexdigest()


def small_site_warnings(counts: dict[str, int], method: str, target_sensitivity: float) -> list[str]:
    """Warnings for classes with fewer than :data:`~pneumoscan.core.intervals.MIN_PER_CLASS`
    images: the threshold and the figures rest on too few images.

    Args:
        counts: images per class name.
        method: the threshold rule.
        target_sensitivity: the ``"sensitivity"`` rule's target.
    """
    out = []
    for name, n in counts.items():
        if n >= MIN_PER_CLASS:
            continue
        what = (f"a sensitivity of {target_sensitivity:.2f} cannot be targeted reliably (one missed image moves it by {1 / n:.3f})"
                if name == CLASS_NAMES[1] and method == "sensitivity" else "the threshold and its figures are very uncertain")
        out.append(f"only {n} {name} image(s) to calibrate on (fewer than {MIN_PER_CLASS}): {what}; use more images of the site")
    return out


def site_calibrate(
    bundle: ModelBundle, data: str | Path, *, split: str | None = None, columns: str | dict[str, str] | None = None,
    method: str = "youden", target_sensitivity: float = 0.95, refit_temperature: bool = True, refit_shift: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, batch_size: int = 16, device: str = "cpu",
) -> SiteCalibration:
    """Fit temperature and threshold on a site's labelled images (the PyTorch model, fp32, the
    reader and preprocessing of ``predict``); the images used are added to the model's record of
    its calibration images (:mod:`pneumoscan.models.seen`).

    Args:
        bundle: the model; not modified.
        data: folder data set, class-folder directory or CSV manifest (as ``evaluate``).
        split: its split (default ``test`` for a folder, every row of a manifest).
        columns: a manifest's own column names.
        method: threshold rule (``youden``, ``sensitivity``, ``f1``).
        target_sensitivity: the ``"sensitivity"`` rule's target.
        refit_temperature: fit the temperature again (else keep the model's).
        refit_shift: refit the distribution-shift detector on these images (its subspace on
            80 % of the patients, its threshold on the other 20 %).
        n_resamples: bootstrap resamples of the intervals.
        seed: bootstrap seed.
        batch_size: images per forward pass.
        device: torch device.

    Raises:
        ConfigError: unknown method or target.
        DataError: no readable image of one of the classes, or too few images to refit the
            shift detector.
    """
    from ..inference import load_predictor
    from ..inference.features import default_layer, forward_files
    from ..models.seen import record_seen_images
    from .evaluate import resolve_samples

    check_threshold_rule(method, target_sensitivity)
    samples, used_split = resolve_samples(data, split, columns)
    predictor = load_predictor(bundle, backend="torch", device=device, batch_size=batch_size, guard=False)
    log.info("calibrating %s on %d images of %s", bundle.name, len(samples), data)
    layer = default_layer(predictor.runner) if refit_shift else None
    fs = forward_files(predictor, [s.path for s in samples], layer, features=refit_shift)
    for i, why in fs.errors.items():
        log.warning("skipped %s: %s", samples[i].path, why)
    kept = [samples[i] for i in fs.index]
    z, y = fs.logits, np.asarray([s.label for s in kept], np.int64)
    counts = {name: int(np.sum(y == k)) for k, name in enumerate(CLASS_NAMES)}
    if min(counts.values()) == 0:
        raise DataError(f"{data}: calibration needs images of both classes (readable: {', '.join(f'{k} {v}' for k, v in counts.items())})")
    op = fit_operating_point(z, y, method, target_sensitivity, temperature=None if refit_temperature else bundle.temperature)
    sections = {"before": (bundle.temperature, bundle.threshold), "after": (op.temperature, op.threshold)}
    before, after = (bootstrap_metrics(y, sigmoid(z / t), {k: thr}, n_resamples=n_resamples, seed=seed)[k] for k, (t, thr) in sections.items())
    desc = {"description": str(data) + (f" (split {used_split})" if used_split else ""), "split": used_split, "n": int(y.size),
            "n_per_class": counts, "n_unreadable": len(fs.errors), "sha256": files_fingerprint([s.path for s in kept])}
    prov = {**bundle.provenance, "val_logits": z.tolist(), "val_labels": y.tolist(), "val_logits_source": "site-calibration",
            "calibration": {"method": method, "target_sensitivity": op.target_sensitivity, "refit_temperature": refit_temperature,
                            "refit_shift": refit_shift, "data": desc,
                            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "previous": {"threshold": bundle.threshold, "temperature": bundle.temperature,
                                         "threshold_method": bundle.threshold_method, "val_metrics": dict(bundle.val_metrics)}}}
    new = bundle.replace(threshold=op.threshold, temperature=op.temperature, threshold_method=method, val_metrics=op.val_metrics,
                         provenance=prov)
    new = record_seen_images(new, calibration=[s.path for s in kept])  # predict/evaluate recognise them from now on
    det = _refit_shift(fs.features, kept, layer, str(data), seed) if layer else None
    new = _keep_detector(bundle, new, det)
    return SiteCalibration(new, desc, before, after, small_site_warnings(counts, method, target_sensitivity),
                           None if det is None else {**det.stats, "threshold": det.threshold})


def _refit_shift(features: np.ndarray, kept: list[Any], layer: str, data: str, seed: int) -> ShiftDetector:
    """A detector fitted on a site's images: subspace on 80 % of the patients, threshold on the rest."""
    from ..data.splits import grouped_stratified_split
    from ..inference.shift import fit_shift_detector

    if len(kept) < MIN_SHIFT_IMAGES:
        raise DataError(f"--refit-shift needs at least {MIN_SHIFT_IMAGES} readable images (got {len(kept)})")
    row = {id(s): i for i, s in enumerate(kept)}
    fit, held = grouped_stratified_split(kept, SHIFT_HOLDOUT, seed)
    name = Path(data).name
    return fit_shift_detector(features[[row[id(s)] for s in fit]], features[[row[id(s)] for s in held]], layer=layer,
                              population=f"images of {name}", fitted_on=f"site calibration images of {name}")


def site_calibrate_file(
    checkpoint: str | Path | None, data: str | Path, out: str | Path | None = None, *, in_place: bool = False, **kw: Any,
) -> tuple[ModelBundle, SiteCalibration]:
    """:func:`site_calibrate` a bundle file and write the result and its model card.

    Args:
        checkpoint: bundle file, run directory, or ``None`` for the shipped default model.
        data: the site's labelled images.
        out: destination file (a directory: its ``best.pt``); never the input.
        in_place: overwrite the input instead (not the shipped default model).
        **kw: the other arguments of :func:`site_calibrate`.

    Returns:
        The input bundle and the calibration (its ``bundle`` written: ``path``, ``sha256``). The
        model card goes beside the new file: ``MODEL_CARD.md`` for a run's ``best.pt``, else
        ``<name>.MODEL_CARD.md``.

    Raises:
        ConfigError: bad destination (see :func:`recalibrate_file`), method or target.
        CheckpointError: unreadable input, or the file cannot be written.
        DataError: see :func:`site_calibrate`.
    """
    from ..models.bundle import load_bundle, save_bundle
    from .model_card import MODEL_CARD, render_model_card

    _check_destination(checkpoint, out, in_place)
    old = load_bundle(checkpoint)
    dest = _destination(old, checkpoint, out)
    cal = site_calibrate(old, data, **kw)
    save_bundle(cal.bundle, dest)
    run = dest.parent if dest.name == "best.pt" and (dest.parent / "config.yaml").is_file() else None
    card = dest.parent / (MODEL_CARD if run is not None else f"{dest.stem}.{MODEL_CARD}")
    atomic_write_text(card, render_model_card(cal.bundle, run))
    log.info("model card: %s", card)
    return old, cal
