"""The records of the prediction path: :class:`DecodedImage` travels from the reader threads
to a batch, :class:`Prediction` is one image's answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DecodedImage:
    """One input on its way to a batch.

    Attributes:
        name: the input's name (``Prediction.path``).
        array: the decoded 2-D greyscale float image in [0, 1] (``None`` when unreadable).
        meta: the reader's metadata (DICOM modality, colour, original size, ...), for the guard.
        error: why the input could not be read (one line), if it could not.
        check: the guard's result, when already computed (``None``: not checked yet).
        input: the preprocessed ``(1, S, S)`` model input, when already computed.
    """

    name: str | None
    array: np.ndarray | None = field(default=None, repr=False)
    meta: dict[str, Any] | None = None
    error: str | None = None
    check: Any = None
    input: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Prediction:
    """One image's answer.

    Attributes:
        path: the input's name.
        probability: calibrated probability of pneumonia (``None`` when refused or failed).
        label: ``"PNEUMONIA"`` or ``"NORMAL"`` at ``threshold`` (``None`` when no prediction).
        threshold: the model's operating threshold.
        model: the weight name.
        error: why the file could not be read (one line), if it could not.
        refused: why the input was refused as not a chest X-ray, if it was.
        heatmap: Grad-CAM map in [0, 1] at the resolution of the decoded image (not
            serialised).
        extra: additional fields (``weights``: the weights' sha256 prefix, ``guard_score``,
            ``shift_score``, ``heatmap_file``, ``seen_as``: ``"train"`` or ``"calibration"`` when
            the input is one of the model's own images, ...), merged into :meth:`to_dict`.
        warnings: what the reader of this answer must know (e.g. that the image lies outside
            the population the model was validated on: :mod:`pneumoscan.inference.shift`; or
            that the model was trained on it: :mod:`pneumoscan.data.fingerprints`);
            empty when there is nothing to say.
    """

    path: str | None
    probability: float | None
    label: str | None
    threshold: float
    model: str
    error: str | None = None
    refused: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"ok"``, ``"refused"`` or ``"error"``."""
        return "error" if self.error is not None else "refused" if self.refused is not None else "ok"

    def to_dict(self) -> dict[str, Any]:
        # the fields in their order, without the heat map; built directly (``asdict`` would
        # deep-copy the heat map and ``extra`` only to drop them)
        d: dict[str, Any] = {"path": self.path, "probability": self.probability, "label": self.label,
                             "threshold": self.threshold, "model": self.model}
        if self.error is not None:
            d["error"] = self.error
        if self.refused is not None:
            d["refused"] = self.refused
        d["warnings"] = list(self.warnings)
        d.update(self.extra)
        return d
