"""Explanations: Grad-CAM heat maps for every registered model and PNG overlays.

::

    from pneumoscan.explain import GradCAM, save_overlay
    cam = GradCAM(model)(batch)                       # (B, 1, S, S) in [0, 1]
    save_overlay("heat.png", image, cam[0, 0].numpy())  # at the image's resolution

:meth:`pneumoscan.inference.Predictor.explain` does the same from a file or an array.
"""
from __future__ import annotations

from .gradcam import GradCAM, resize_map, resolve_layer
from .overlay import jet, overlay, save_overlay

__all__ = ["GradCAM", "jet", "overlay", "resize_map", "resolve_layer", "save_overlay"]
