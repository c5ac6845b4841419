"""Heat-map overlays saved as PNG (the blend itself is :func:`pneumoscan.core.imaging.overlay`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..core.imaging import overlay
from ..utils.io import atomic_open


def save_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> Path:
    """Write :func:`pneumoscan.core.imaging.overlay` as a PNG atomically.

    Args:
        path: destination ``.png``.
        image: 2-D float greyscale in [0, 1] (its resolution is the PNG's).
        cam: 2-D map in [0, 1] (any size; resized bilinearly to the image's).
        alpha: heat-map opacity.
    """
    path = Path(path)
    rgb = overlay(image, cam, alpha)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(rgb).save(fh, format="PNG")
    return path
