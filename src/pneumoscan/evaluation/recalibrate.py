"""``pneumoscan calibrate``: re-derive a model's temperature and operating threshold from the
validation logits stored in its bundle, without retraining.

:func:`recalibrate_bundle` is the computation (a new bundle; the input is not modified);
:func:`recalibrate_file` loads, recalibrates and writes a bundle file, and refreshes the run's
model card when it rewrites a run's ``best.pt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.calibration import check_threshold_rule, fit_operating_point
from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle


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


def recalibrate_file(
    checkpoint: str | Path, out: str | Path | None = None, *, method: str = "youden", target_sensitivity: float = 0.95,
    refit_temperature: bool = True, in_place: bool = False,
) -> tuple[ModelBundle, ModelBundle]:
    """Recalibrate a bundle file and write the result.

    Args:
        checkpoint: bundle file or run directory.
        out: destination file, or a directory (its ``best.pt``); ``None`` with ``in_place``.
        method: threshold rule (see :func:`recalibrate_bundle`).
        target_sensitivity: sensitivity the ``"sensitivity"`` rule must reach.
        refit_temperature: fit the temperature again.
        in_place: overwrite the input (instead of ``out``).

    Returns:
        The input bundle and the new one (its ``path`` and ``sha256`` are those of the file
        written). When the destination is a run's ``best.pt`` (``config.yaml`` beside it), the
        run's ``MODEL_CARD.md`` is rewritten too.

    Raises:
        CheckpointError: unreadable input, no validation logits, or the file cannot be written.
        ConfigError: unknown method or target outside (0, 1]; neither or both of ``out`` and
            ``in_place``.
    """
    from ..models.bundle import load_bundle, save_bundle

    if (out is None) == (not in_place):
        raise ConfigError("give a new file with --out NEW.pt, or --in-place to overwrite the checkpoint" if out is None
                          else "give --out or --in-place, not both")
    from .model_card import write_model_card

    old = load_bundle(checkpoint)
    new = recalibrate_bundle(old, method, target_sensitivity, refit_temperature)
    dest = Path(out) if out is not None else Path(old.path or checkpoint)  # in place
    if dest.is_dir():
        dest = dest / "best.pt"
    save_bundle(new, dest)
    if dest.name == "best.pt" and (dest.parent / "config.yaml").is_file():
        write_model_card(dest.parent, new)
    return old, new
