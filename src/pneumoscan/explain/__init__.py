"""Explanations: Grad-CAM heat maps for every registered model, PNG overlays and figures
(original | overlay + colour bar + caption, :mod:`pneumoscan.explain.figure`).

::

    from pneumoscan.explain import GradCAM, save_overlay
    cam = GradCAM(model)(batch)                       # (B, 1, S, S) in [0, 1]
    save_overlay("heat.png", image, cam[0, 0].numpy())  # at the image's resolution

:meth:`pneumoscan.inference.Predictor.explain` does the same from a file or an array. Models
with a pooled linear head are explained without PyTorch (:mod:`pneumoscan.explain.cam_numpy`):
exports of them carry what :func:`linear_head_maps` needs. The names load lazily, so the
NumPy parts never import PyTorch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_EXPORTS = {
    "GradCAM": ".gradcam", "resolve_layer": ".gradcam", "resolve_layers": ".gradcam", "linear_head": ".gradcam",
    "linear_heads": ".gradcam",
    "LinearHead": ".cam_numpy", "linear_head_maps": ".cam_numpy", "finish_maps": ".cam_numpy", "TARGETS": ".cam_numpy",
    "save_overlay": ".overlay",
    "Caption": ".figure", "heatmap_figure": ".figure", "save_heatmap_figure": ".figure",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .cam_numpy import TARGETS, LinearHead, finish_maps, linear_head_maps
    from .gradcam import GradCAM, linear_head, linear_heads, resolve_layer, resolve_layers
    from .figure import Caption, heatmap_figure, save_heatmap_figure
    from .overlay import save_overlay
