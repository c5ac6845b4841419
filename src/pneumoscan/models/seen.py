"""The record of the images a bundle was trained and calibrated on
(:class:`~pneumoscan.data.fingerprints.SeenImages`, in ``provenance["seen_images"]``).

Training (:func:`pneumoscan.workflows.train.finalize_run`), site calibration and ensembles
record it; a script that builds a bundle by hand (the shipped default model) records it with
:func:`record_seen_images` before :func:`~pneumoscan.models.bundle.save_bundle` /
:func:`~pneumoscan.models.bundle.save_default`::

    from pneumoscan.models.bundle import load_bundle, save_default
    from pneumoscan.models.seen import record_seen_images

    best = record_seen_images(load_bundle("runs/x/best.pt"), train=train_paths, calibration=val_paths)
    save_default(best, "src/pneumoscan/assets/default", name)   # then export the ONNX file

The record is in :meth:`ModelBundle.info`, hence in ONNX exports' metadata: a predictor built
without PyTorch has it too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from ..data.fingerprints import ImageDigest, SeenImages, fingerprint_files
from .bundle import ModelBundle

log = logging.getLogger(__name__)

#: The provenance key of the record.
SEEN_KEY = "seen_images"

__all__ = ["SEEN_KEY", "record_seen_images", "seen_images", "with_seen_images"]


def seen_images(bundle: ModelBundle) -> SeenImages | None:
    """The bundle's record of its training and calibration images; ``None`` for a bundle made
    before records existed (or with an unreadable one: logged at debug level).

    Args:
        bundle: the model.
    """
    rec = SeenImages.from_dict(bundle.provenance.get(SEEN_KEY))
    if rec is None:
        log.debug("%s carries no record of its training images", bundle.name)
    return rec


def with_seen_images(bundle: ModelBundle, seen: SeenImages | None) -> ModelBundle:
    """A copy of ``bundle`` whose record is ``seen`` merged with the one it has.

    Args:
        bundle: the model.
        seen: the images to add (``None``: the bundle unchanged).
    """
    if seen is None:
        return bundle
    rec = (seen_images(bundle) or SeenImages()).merged(seen)
    return bundle.replace(provenance={**bundle.provenance, SEEN_KEY: rec.to_dict()})


def record_seen_images(
    bundle: ModelBundle, *, train: Iterable[str | Path] | Sequence[ImageDigest] = (),
    calibration: Iterable[str | Path] | Sequence[ImageDigest] = (),
) -> ModelBundle:
    """A copy of ``bundle`` that also records these training and calibration images (files are
    read and fingerprinted: :func:`~pneumoscan.data.fingerprints.fingerprint_files`).

    Args:
        bundle: the model (not modified; save the copy).
        train: image files (or their digests) the model was trained on.
        calibration: image files (or digests) its temperature and threshold were fitted on.

    Returns:
        The copy (``bundle`` itself when no image is given).

    Raises:
        DataError: a file that cannot be read.
    """
    given = {"train": list(train), "calibration": list(calibration)}
    if not any(given.values()):
        return bundle
    rec = SeenImages()
    for role, items in given.items():
        if items:
            digests = items if all(isinstance(d, ImageDigest) for d in items) else fingerprint_files(items)  # type: ignore[arg-type]
            rec.add(role, digests)  # type: ignore[arg-type]
    log.info("recorded %d training and %d calibration image(s) in %s", rec.count("train"), rec.count("calibration"), bundle.name)
    return with_seen_images(bundle, rec)
