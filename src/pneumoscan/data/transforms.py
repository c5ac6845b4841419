"""Preprocessing shared by training, evaluation, prediction, the service and ONNX export,
and the study's augmentation, all on uint8 tensors.

Every model takes ``(B, 1, H, W)`` float greyscale in ``[0, 1]``; normalisation (and the
greyscale→RGB expansion of ImageNet backbones) happens inside the model, so the
preprocessing outside it is only: decode → greyscale → resize to a square → scale to [0, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..config import AugmentConfig


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become model input; stored with every checkpoint and ONNX file.

    Attributes:
        input_size: square side in pixels (images are stretched to a square, as the
            training data were).
        in_channels: channels of the network proper (1 or 3); inputs are always greyscale.
        mean, std: per-channel normalisation applied inside the model.
        resize: resize rule; ``"stretch"`` to ``input_size``².
        interpolation: ``"bilinear"`` with antialiasing.
    """

    input_size: int = 224
    in_channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: str = "stretch"
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", cls.mean)), tuple(d.get("std", cls.std))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One greyscale image (2-D float [0,1] array, or uint8 ``(1,H,W)`` tensor) to a
        ``(1, S, S)`` float tensor."""
        return preprocess_batch([image], self.input_size)[0]


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
