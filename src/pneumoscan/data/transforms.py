"""Training and evaluation transforms on PyTorch tensors, and the study's augmentation, all
on uint8 tensors.

Every model takes ``(B, 1, H, W)`` float greyscale in ``[0, 1]``; normalisation (and the
greyscale→RGB expansion of ImageNet backbones) happens inside the model, so the
preprocessing outside it is only: decode → greyscale → resize to a square → scale to [0, 1].
Prediction does the same in NumPy/Pillow (:mod:`pneumoscan.data.preprocessing`, which also
holds :class:`Preprocessing`); both resizes are the same antialiased bilinear filter.

The robustness augmentations (exposure and processing: gamma, equalisation, autocontrast,
blur, sharpening, noise, letterboxing, JPEG re-compression) are off by default; each is an
``AugmentConfig`` field. :func:`add_noise` and :func:`letterbox` are also the building blocks
of the fixed "shifted validation" perturbations (:mod:`pneumoscan.training.shifted_val`).
"""
from __future__ import annotations

import io
import math
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
    rotation and brightness/contrast jitter; then the robustness augmentations that are switched
    on (gamma, equalisation, autocontrast, blur, sharpening, noise, letterbox, JPEG); then
    scaling to float [0, 1].

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
    ops += robustness_ops(aug)
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def robustness_ops(aug: AugmentConfig) -> list[Any]:
    """The exposure and processing augmentations that ``aug`` switches on, in the order they
    run (each takes and returns a uint8 ``(1, H, W)`` tensor of the same shape).

    Args:
        aug: augmentation settings (``gamma``, ``equalize``, ``autocontrast``, ``blur``,
            ``sharpen``, ``noise``, ``letterbox``, ``jpeg``, ``jpeg_quality``).
    """
    ops: list[Any] = []
    if aug.gamma > 0:
        ops.append(RandomGamma(aug.gamma))
    if aug.equalize > 0:
        ops.append(v2.RandomEqualize(p=aug.equalize))
    if aug.autocontrast > 0:
        ops.append(v2.RandomAutocontrast(p=aug.autocontrast))
    if aug.blur > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=aug.blur))
    if aug.sharpen > 0:
        ops.append(v2.RandomAdjustSharpness(2.0, p=aug.sharpen))
    if aug.noise > 0:
        ops.append(RandomNoise(aug.noise))
    if aug.letterbox > 0:
        ops.append(RandomLetterbox(aug.letterbox))
    if aug.jpeg > 0:
        ops.append(RandomJpeg(aug.jpeg, tuple(aug.jpeg_quality)))
    return ops


class RandomGamma:
    """Gamma correction with gamma drawn log-uniformly in ``[1/(1+strength), 1+strength]``
    (uint8 in, uint8 out; picklable for DataLoader workers).

    Args:
        strength: 0.4 gives gammas between 0.71 and 1.4.
    """

    def __init__(self, strength: float) -> None:
        self.log_max = math.log1p(strength)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gamma = math.exp((2.0 * float(torch.rand(())) - 1.0) * self.log_max)
        return v2.functional.adjust_gamma(x, gamma)


class RandomNoise:
    """Additive Gaussian noise with a standard deviation drawn uniformly in
    ``[0, max_std]`` (fraction of the full range; uint8 in, uint8 out).

    Args:
        max_std: largest standard deviation, e.g. 0.03 (about 8 grey levels).
    """

    def __init__(self, max_std: float) -> None:
        self.max_std = max_std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return add_noise(x, float(torch.rand(())) * self.max_std)


class RandomLetterbox:
    """With probability ``p``, pad the image with black bars to a random aspect ratio (up to
    ``max_aspect``, horizontally or vertically, off-centre at random) and resize it back: what
    a letterboxed export or a wider detector plate looks like after the square resize.

    Args:
        p: probability of letterboxing an image.
        max_aspect: the largest padded-to-original side ratio.
    """

    def __init__(self, p: float, max_aspect: float = 4 / 3) -> None:
        self.p, self.max_aspect = p, max_aspect

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return x
        r = torch.rand(3).tolist()
        return letterbox(x, 1.0 + r[0] * (self.max_aspect - 1.0), "width" if r[1] < 0.5 else "height", r[2])


class RandomJpeg:
    """With probability ``p``, re-compress the image as a JPEG at a quality drawn uniformly in
    ``quality`` (uint8 in, uint8 out).

    Args:
        p: probability of re-compressing an image.
        quality: (min, max) JPEG quality, 1-100.
    """

    def __init__(self, p: float, quality: tuple[int, int] = (30, 90)) -> None:
        self.p, self.quality = p, quality

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return x
        return jpeg_recompress(x, int(torch.randint(self.quality[0], self.quality[1] + 1, ())))


def jpeg_recompress(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode a uint8 ``(1, H, W)`` greyscale image as a JPEG at ``quality`` and decode it
    again with Pillow.

    Args:
        x: uint8 ``(1, H, W)`` tensor.
        quality: JPEG quality, 1-100.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(x[0].numpy())).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return torch.from_numpy(np.array(im.convert("L"))).unsqueeze(0)


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add Gaussian noise to a uint8 image and round back to uint8.

    Args:
        x: uint8 tensor.
        std: standard deviation as a fraction of the full range (0.04 = about 10 grey levels).
        generator: random stream (default: PyTorch's global one).
    """
    if std <= 0:
        return x
    noise = torch.randn(x.shape, generator=generator) * (255.0 * std)
    return (x.float() + noise).round_().clamp_(0, 255).to(torch.uint8)


def letterbox(x: torch.Tensor, aspect: float, axis: str = "width", offset: float = 0.5) -> torch.Tensor:
    """Pad a ``(C, H, W)`` uint8 image with black bars to ``aspect`` times its width (or
    height), then resize it back to ``(H, W)``.

    Args:
        x: uint8 ``(C, H, W)`` tensor.
        aspect: padded side over original side (>= 1).
        axis: ``"width"`` (bars left and right) or ``"height"`` (top and bottom).
        offset: share of the padding before the image (0.5 = centred).
    """
    h, w = x.shape[-2:]
    side = w if axis == "width" else h
    pad = max(int(round(side * (aspect - 1.0))), 0)
    if pad == 0:
        return x
    before = int(round(pad * min(max(offset, 0.0), 1.0)))
    padding = [before, 0, pad - before, 0] if axis == "width" else [0, before, 0, pad - before]
    return v2.functional.resize(v2.functional.pad(x, padding, fill=0), [h, w], antialias=True)


def build_eval_transform(size: int) -> EvalTransform:
    """Deterministic resize to ``size``² and scaling to [0, 1]."""
    return EvalTransform(size)
