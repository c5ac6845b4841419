"""Resizing and colouring of 2-D float maps and images (NumPy + Pillow).

One bilinear resize and one colour map serve preprocessing, Grad-CAM upsampling, the guard's
thumbnails, heat-map overlays and the service's RGBA maps.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def resize_float(image: np.ndarray, height: int, width: int, *, clip: bool = True) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a 2-D float image with Pillow's ``"F"``
    mode; pixel centres aligned as ``align_corners=False``.

    Args:
        image: 2-D array (any real dtype).
        height: output rows.
        width: output columns.
        clip: clamp the result to [0, 1].

    Returns:
        ``(height, width)`` float32 (a new array).
    """
    a = np.ascontiguousarray(image, dtype=np.float32)
    if a.shape == (height, width):
        out = a.copy()
    else:
        out = np.array(Image.fromarray(a, mode="F").resize((int(width), int(height)), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


def fit_within(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(h, w)`` scaled down (never up) so that the longer side is at most ``max_side``."""
    s = min(1.0, max_side / max(height, width, 1))
    return max(1, round(height * s)), max(1, round(width * s))


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float [0, 1] → uint8 [0, 255] (rounded, clamped; NaN becomes 0).

    Args:
        arr: array of any shape; float64 input is scaled and rounded in float64, anything
            else in float32.
    """
    a = np.asarray(arr)
    if a.dtype != np.float64:
        a = a.astype(np.float32, copy=False)
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map (blue → cyan → yellow → red) of values in [0, 1], as float RGB.

    Args:
        values: array of any shape in [0, 1].

    Returns:
        ``values.shape + (3,)`` float32 in [0, 1].
    """
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    k = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    return np.clip(1.5 - np.abs(4.0 * v - k), 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heat map over a greyscale image at the image's resolution.

    Args:
        image: 2-D float greyscale in [0, 1] (any size).
        cam: 2-D map in [0, 1] (any size; resized bilinearly to the image's).
        alpha: heat-map opacity where the map is 1 (it fades out where the map is 0).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    h, w = image.shape
    c = resize_float(np.nan_to_num(cam, nan=0.0), h, w)
    a = (alpha * np.sqrt(c))[..., None]  # low values fade so the anatomy stays visible
    grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None]
    return to_uint8((1.0 - a) * grey + a * jet(c))


def heatmap_rgba(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [0, 1] map as an RGBA overlay of ``height × width`` pixels: the jet colour map with an
    alpha that grows with the map, so regions the network ignored stay transparent.

    Returns:
        ``(height, width, 4)`` uint8.
    """
    m = resize_float(np.nan_to_num(cam, nan=0.0), height, width)
    a = np.clip(0.15 + 0.85 * m, 0.0, 1.0)[..., None]
    return to_uint8(np.concatenate([jet(m), a], axis=-1))
