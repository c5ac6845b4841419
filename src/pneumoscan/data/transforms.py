"""Training and evaluation transforms on PyTorch tensors, and the study's augmentation, all
on uint8 tensors.

Every model takes ``(B, 1, H, W)`` float greyscale in ``[0, 1]``; normalisation (and the
greyscale→RGB expansion of ImageNet backbones) happens inside the model, so the
preprocessing outside it is only: decode → greyscale → resize to a square → scale to [0, 1].
Prediction does the same in NumPy/Pillow (:mod:`pneumoscan.data.preprocessing`, which also
holds :class:`Preprocessing`); both resizes are the same antialiased bilinear filter.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..config import AugmentConfig
from .preprocessing import Preprocessing, preprocess_arrays  # noqa: F401  (re-exported)


def preprocess_batch(images: list[np.ndarray | torch.Tensor], size: int) -> torch.Tensor:
    """Resize greyscale images to ``size``² and stack as ``(B, 1, S, S)`` float32 in [0, 1].

    Args:
        images: 2-D float arrays in [0, 1] or uint8 ``(1, H, W)``/``(H, W)`` tensors/arrays.
        size: output side.
    """
    out = []
    for im in images:
        t = torch.as_tensor(np.ascontiguousarray(im)) if isinstance(im, np.ndarray) else im
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.dtype == torch.uint8:
            t = t.float().div_(255.0)
        else:
            # a new tensor (never the caller's memory), finite and in [0, 1] before resizing
            t = torch.nan_to_num(t.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
        t = t.unsqueeze(0)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(t[0].clamp_(0.0, 1.0))
    return torch.stack(out)


class EvalTransform:
    """uint8 ``(1,H,W)`` → float ``(1,S,S)`` in [0, 1] (picklable for DataLoader workers)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return preprocess_batch([x], self.size)[0]


def build_train_transform(size: int, aug: AugmentConfig) -> v2.Compose | EvalTransform:
    """The study's augmentation on uint8 tensors: random resized crop, horizontal flip, small
    rotation and brightness/contrast jitter, then scaling to float [0, 1].

    Args:
        size: output side.
        aug: augmentation settings (``aug.enabled=False`` gives the eval transform).
    """
    if not aug.enabled:
        return EvalTransform(size)
    ops: list[Any] = [v2.RandomResizedCrop(size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), antialias=True)]
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=aug.hflip))
    if aug.rotation > 0:
        ops.append(v2.RandomRotation(aug.rotation))
    if aug.brightness > 0 or aug.contrast > 0:
        ops.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def build_eval_transform(size: int) -> EvalTransform:
    """Deterministic resize to ``size``² and scaling to [0, 1]."""
    return EvalTransform(size)
