"""Model-input preprocessing for prediction, in NumPy and Pillow only (no PyTorch).

Every model takes ``(B, 1, S, S)`` float32 greyscale in ``[0, 1]``: decode → greyscale →
stretch to ``S × S`` with antialiased bilinear interpolation → clamp to ``[0, 1]``.
Normalisation (and the greyscale→RGB expansion of ImageNet backbones) happens inside the
model, so this is all that happens outside it, for every backend (PyTorch, ONNX) and for
the web service.

The resize is :func:`pneumoscan.core.imaging.resize_float`: Pillow's float (``"F"`` mode)
bilinear filter, whose support widens with the downscaling factor — the same antialiased filter as
``torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)`` used on training
batches (``pneumoscan.data.transforms``): the two agree within 1e-5 per pixel (tested).
Keeping prediction free of PyTorch lets ``pneumoscan predict`` start in a fraction of a
second with the ONNX backend.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..core.imaging import resize_float


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become model input; stored with every checkpoint and ONNX file.

    Attributes:
        input_size: square side in pixels (images are stretched to a square, as the
            training data were).
        in_channels: channels of the network proper (1 or 3); inputs are always greyscale.
        mean, std: per-channel normalisation applied inside the model.
        resize: resize rule; ``"stretch"`` to ``input_size``² (antialiased bilinear, the
            only rule; :func:`pneumoscan.models.bundle.validate_bundle` refuses others).
    """

    input_size: int = 224
    in_channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: str = "stretch"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """Rebuild from :meth:`to_dict` output; unknown keys (``interpolation`` of older
        files) are ignored."""
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", cls.mean)), tuple(d.get("std", cls.std))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One greyscale image (2-D float [0,1] or uint8 array) to a ``(1, S, S)`` float32
        array in [0, 1]."""
        return preprocess_arrays([image], self.input_size)[0]


def as_unit_float(image: np.ndarray) -> np.ndarray:
    """A 2-D greyscale array as float32 in [0, 1]: uint8 is scaled by 1/255, other types
    get NaN → 0, ±inf → 1/0 and are clamped (always a new array, never the caller's)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D greyscale image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) * np.float32(1.0 / 255.0)
    a = np.array(a, dtype=np.float32)  # a copy
    if not np.isfinite(a).all():
        np.nan_to_num(a, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(a, 0.0, 1.0, out=a)


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
    """One greyscale image (2-D float in [0, 1], or uint8) → ``(1, size, size)`` float32."""
    a = as_unit_float(image)
    if a.shape != (size, size):
        a = resize_float(a, size, size)
    return a[None]


def preprocess_arrays(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Greyscale images → ``(B, 1, size, size)`` float32 model input in [0, 1].

    Args:
        images: 2-D float arrays in [0, 1] (other values are clamped, NaN becomes 0) or
            uint8 arrays.
        size: output side.
    """
    out = np.empty((len(images), 1, size, size), dtype=np.float32)
    for i, im in enumerate(images):
        out[i] = preprocess_image(im, size)
    return out
