"""Test-time augmentation: predict several views of each image and average their logits.

Modes:

* ``"none"`` — the image only;
* ``"flip"`` — the image and its horizontal flip (2 views);
* ``"crops"`` — the image, its flip, a 90 % centre crop and that crop's flip (4 views).

The views are built on the preprocessed ``(B, 1, S, S)`` batch, so the PyTorch and ONNX
backends share them. Logits are averaged (then calibrated with the checkpoint's temperature,
which was fitted on single views: TTA mostly reduces variance, and calibration is close).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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


def _centre_crop(batch: torch.Tensor, fraction: float) -> torch.Tensor:
    s = batch.shape[-1]
    c = max(1, int(round(s * fraction)))
    o = (s - c) // 2
    crop = batch[..., o : o + c, o : o + c]
    return F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def make_views(batch: torch.Tensor, mode: str) -> torch.Tensor:
    """Stack the views of a batch, view-major: ``(V * B, 1, S, S)``.

    Args:
        batch: ``(B, 1, S, S)`` preprocessed images.
        mode: a TTA mode.
    """
    mode = check_mode(mode)
    if mode == "none":
        return batch
    views = [batch, torch.flip(batch, dims=(-1,))]
    if mode == "crops":
        crop = _centre_crop(batch, CROP_FRACTION)
        views += [crop, torch.flip(crop, dims=(-1,))]
    return torch.cat(views, dim=0)


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
