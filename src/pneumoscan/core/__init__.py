"""Pure NumPy/Pillow pieces that many layers share: class names, calibration, metrics and
image resizing/colouring. Nothing here imports PyTorch, and nothing here imports another
pneumoscan layer except :mod:`pneumoscan.errors` and :mod:`pneumoscan.utils`."""
from __future__ import annotations

from .labels import CLASS_NAMES

__all__ = ["CLASS_NAMES"]
