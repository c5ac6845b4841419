"""Test-time augmentation: predict several views of each image and average their logits.

Modes:

* ``"none"`` — the image only;
* ``"flip"`` — the image and its horizontal flip (2 views);
* ``"crops"`` — the image, its flip, a 90 % centre crop and that crop's flip (4 views).

The views are built in NumPy on the preprocessed ``(B, 1, S, S)`` batch, so the PyTorch and
ONNX backends share them. Logits are averaged (then calibrated with the checkpoint's temperature,
which was fitted on single views: TTA mostly reduces variance, and calibration is close).
"""
from __future__ import annotations

import numpy as np

from ..core.imaging import resize_float
from ..errors import ConfigError

TTA_MODES = ("none", "flip", "crops")
CROP_FRACTION = 0.9


def check_mode(mode: str | bool | None) -> str:
    """Normalise a TTA setting: ``True`` → ``"flip"``, ``False``/``None`` → ``"none"``.

    Raises:
        ConfigError: unknown mode.
    """
    if mode is True:
        return "flip"
    if mode in (False, None):
        return "none"
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown TTA mode '{mode}' (choose from {', '.join(TTA_MODES)})")
    return str(mode)


def n_views(mode: str) -> int:
    """Number of views per image of ``mode``."""
    return {"none": 1, "flip": 2, "crops": 4}[check_mode(mode)]


def _centre_crop(batch: np.ndarray, fraction: float) -> np.ndarray:
    s = batch.shape[-1]
    c = max(1, int(round(s * fraction)))
    o = (s - c) // 2
    crop = batch[..., o : o + c, o : o + c]
    out = np.empty_like(batch)
    for i in range(batch.shape[0]):
        out[i, 0] = resize_float(crop[i, 0], s, s)
    return out


def make_views(batch: np.ndarray, mode: str) -> np.ndarray:
    """Stack the views of a batch, view-major: ``(V * B, 1, S, S)``.

    Args:
        batch: ``(B, 1, S, S)`` float32 preprocessed images.
        mode: a TTA mode.
    """
    mode = check_mode(mode)
    if mode == "none":
        return batch
    views = [batch, batch[..., ::-1]]
    if mode == "crops":
        crop = _centre_crop(batch, CROP_FRACTION)
        views += [crop, crop[..., ::-1]]
    return np.ascontiguousarray(np.concatenate(views, axis=0), dtype=np.float32)


def merge_views(logits: np.ndarray, mode: str) -> np.ndarray:
    """Average view-major logits back to one per image.

    Args:
        logits: ``(V * B,)`` logits in :func:`make_views` order.
        mode: the TTA mode used.
    """
    v = n_views(mode)
    if v == 1:
        return logits
    return np.asarray(logits, dtype=np.float64).reshape(v, -1).mean(axis=0)
