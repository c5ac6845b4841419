"""Grad-CAM (Selvaraju et al. 2017) for every registered model, as a hook wrapper in the style
of MONAI's ``GradCAM``: a forward hook on the target layer (found by its ``named_modules``
name) records the activation and registers a tensor hook that records its gradient.

Details that matter for pneumoscan's models:

* the input is made to require grad, so gradients reach the target layer even when every
  parameter is frozen (vgg16's frozen backbone, or a :class:`~pneumoscan.inference.Predictor`,
  which freezes everything);
* the activation is copied in the forward hook and its gradient is taken with
  ``Tensor.register_hook``: a later in-place op (``ReLU(inplace=True)``) can neither change
  the recorded values nor break the backward pass;
* the models have one logit ``z`` (PNEUMONIA when high): by default the map explains the
  predicted class, i.e. ``z`` for an image predicted PNEUMONIA and ``-z`` (evidence for NORMAL)
  otherwise; ``target="pneumonia"`` always explains ``z``.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

log = logging.getLogger(__name__)

#: What a map can explain: the predicted class, the pneumonia logit, or its negation.
TARGETS = ("predicted", "pneumonia", "normal")


def resolve_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """The target layer of ``model``: ``layer`` (a ``named_modules`` name) or the registered
    model's default (:attr:`~pneumoscan.models.registry.ModelSpec.gradcam_layer`).

    Args:
        model: a pneumoscan model (or any module when ``layer`` is given).
        layer: layer name, ``None`` for the model's default.

    Raises:
        ModelError: unknown layer name, or no default known for this model.
    """
    if layer is None:
        name = getattr(model, "pneumoscan_name", None)
        if name is None:
            raise ModelError("this model has no registered Grad-CAM layer; pass layer='...'")
        from ..models import get_spec

        layer = get_spec(name).gradcam_layer
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Sequential)) and n]
        hint = ", ".join(convs[-6:])
        raise ModelError(f"unknown layer '{layer}' for Grad-CAM (layers near the end: {hint})")
    return layer, modules[layer]


class GradCAM:
    """Grad-CAM maps of a model's pneumonia logit.

    Args:
        model: a model mapping ``(B, 1, S, S)`` greyscale in [0, 1] to ``(B, 1)`` logits.
        layer: target layer name (``named_modules``), default: the registered model's
            ``gradcam_layer``.
        target: ``"predicted"`` (explain the predicted class), ``"pneumonia"`` (the logit)
            or ``"normal"`` (the negated logit).
        logit_threshold: the logit at which the prediction turns PNEUMONIA (a Predictor's
            operating point: ``T * log(t / (1 - t))``); used by ``"predicted"``.

    Example::

        cam = GradCAM(model)(batch)          # (B, 1, S, S) in [0, 1]
    """

    def __init__(self, model: nn.Module, layer: str | None = None, target: str = "predicted", logit_threshold: float = 0.0) -> None:
        if target not in TARGETS:
            raise ModelError(f"Grad-CAM target must be one of {', '.join(TARGETS)} (got '{target}')")
        self.model = model
        self.target = target
        self.logit_threshold = float(logit_threshold)
        self.layer_name, self.layer = resolve_layer(model, layer)
        self._acts: torch.Tensor | None = None
        self._grads: torch.Tensor | None = None

    def _forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise ModelError(
                f"Grad-CAM layer '{self.layer_name}' must output a (B, C, H, W) feature map, got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        self._acts = out.detach().clone()
        if out.requires_grad:
            out.register_hook(self._save_grad)

    def _save_grad(self, grad: torch.Tensor) -> None:
        self._grads = grad.detach().clone()

    def compute(self, x: torch.Tensor, upsample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and logits of a batch.

        Args:
            x: ``(B, 1, S, S)`` model input.
            upsample: resize the maps to the input's ``S × S`` (else the layer's resolution).

        Returns:
            ``(cam, logits)``: ``(B, 1, H, W)`` float maps, each scaled to [0, 1] (all zeros
            when the layer holds no positive evidence), and the ``(B,)`` logits.
        """
        was_training = self.model.training
        self.model.eval()
        self._acts = self._grads = None
        handle = self.layer.register_forward_hook(self._forward_hook)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                inp = x.detach().clone().float().requires_grad_(True)
                logits = self.model(inp).float().reshape(inp.shape[0], -1)[:, 0]
                if self._acts is None:
                    raise ModelError(f"Grad-CAM layer '{self.layer_name}' was not used by the forward pass")
                if self.target == "pneumonia":
                    sign = torch.ones_like(logits)
                elif self.target == "normal":
                    sign = -torch.ones_like(logits)
                else:
                    sign = torch.where(logits.detach() >= self.logit_threshold, 1.0, -1.0)
                # gradients w.r.t. the input only: parameters' .grad stay untouched, and the
                # tensor hook on the activation fires on the way
                torch.autograd.grad((logits * sign).sum(), inp)
        finally:
            handle.remove()
            self.model.train(was_training)
        acts, grads = self._acts, self._grads
        if grads is None:
            grads = torch.zeros_like(acts)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
        if upsample and cam.shape[-2:] != x.shape[-2:]:
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        b = cam.shape[0]
        flat = cam.reshape(b, -1)
        lo = flat.min(dim=1, keepdim=True).values
        hi = flat.max(dim=1, keepdim=True).values
        span = hi - lo
        tiny = torch.finfo(torch.float32).tiny  # randomly initialised nets have minute activations
        norm = torch.where(span > tiny, (flat - lo) / span.clamp_min(tiny), torch.zeros_like(flat))
        return norm.reshape(cam.shape).clamp_(0.0, 1.0).detach(), logits.detach()

    def __call__(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """``(B, 1, S, S)`` maps in [0, 1] (see :meth:`compute`)."""
        return self.compute(x, upsample)[0]


def resize_map(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map in [0, 1] to ``height × width`` (e.g. from the model's
    stretched square back to the image's original resolution).

    Args:
        cam: 2-D float map.
        height, width: target size.
    """
    from PIL import Image

    cam = np.ascontiguousarray(cam, dtype=np.float32)
    if cam.shape == (height, width):
        return cam
    im = Image.fromarray(cam, mode="F").resize((int(width), int(height)), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
