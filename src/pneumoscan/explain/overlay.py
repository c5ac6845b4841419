"""Heat-map overlays: a Grad-CAM map blended over the X-ray, saved as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.io import atomic_open
from .gradcam import resize_map


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
    c = resize_map(cam, h, w)
    a = (alpha * np.sqrt(c))[..., None]  # low values fade so the anatomy stays visible
    grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None]
    rgb = (1.0 - a) * grey + a * jet(c)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> Path:
    """Write :func:`overlay` as a PNG atomically.

    Args:
        path: destination ``.png``.
        image: 2-D float greyscale in [0, 1] (its resolution is the PNG's).
        cam: 2-D map in [0, 1].
        alpha: heat-map opacity.
    """
    path = Path(path)
    rgb = overlay(image, cam, alpha)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(rgb).save(fh, format="PNG")
    return path
