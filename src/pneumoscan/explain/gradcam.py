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
  otherwise; ``target="pneumonia"`` always explains ``z``;
* upsampling and scaling to [0, 1] are :func:`~pneumoscan.explain.cam_numpy.finish_maps`, shared
  with the PyTorch-free maps of :mod:`pneumoscan.explain.cam_numpy`; :func:`linear_head` tells
  whether a model's Grad-CAM reduces to such a map (a pooled linear head).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .cam_numpy import LinearHead, check_target, finish_maps

log = logging.getLogger(__name__)


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
        self.model = model
        self.target = check_target(target)
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
        raw = F.relu((weights * acts).sum(dim=1)).float().cpu().numpy()
        cam = finish_maps(raw, tuple(x.shape[-2:]) if upsample else None)  # the NumPy path's own post-processing
        return torch.from_numpy(cam[:, None]).to(x.device), logits.detach()

    def __call__(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """``(B, 1, S, S)`` maps in [0, 1] (see :meth:`compute`)."""
        return self.compute(x, upsample)[0]


def linear_head(model: nn.Module, input_size: int, layer: str | None = None) -> LinearHead | None:
    """The model's head as a :class:`~pneumoscan.explain.cam_numpy.LinearHead` when its logit
    is ``w · GAP(A) + b`` of the target layer's output ``A`` (then Grad-CAM there is the CAM that
    :func:`~pneumoscan.explain.cam_numpy.linear_head_maps` computes in NumPy); ``None`` when it
    is not (several linear layers, a flattening head, normalisation between the layer and the
    pooling, ...).

    The head must hold exactly one ``nn.Linear`` with one output, and the identity is checked
    numerically on two random images (eval mode), so no architecture list is needed.

    Args:
        model: a pneumoscan model (``adapter → backbone → head``).
        input_size: the model's input side.
        layer: target layer (default: the registered model's ``gradcam_layer``).

    Raises:
        ModelError: unknown layer.
    """
    name, module = resolve_layer(model, layer)
    head = getattr(model, "head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    if len(linears) != 1 or linears[0].out_features != 1:
        return None
    weight = linears[0].weight.detach().float().reshape(-1).cpu()
    bias = float(linears[0].bias.detach().float().item()) if linears[0].bias is not None else 0.0
    acts: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            acts.append(out.detach().float().clone())

    handle = module.register_forward_hook(keep)
    was_training = model.training
    try:
        model.eval()
        x = torch.rand(2, 1, input_size, input_size, generator=torch.Generator().manual_seed(0))
        device = next(model.parameters(), torch.empty(0)).device
        with torch.inference_mode():
            z = model(x.to(device)).float().reshape(-1).cpu()
    finally:
        handle.remove()
        model.train(was_training)
    if len(acts) != 1 or acts[0].ndim != 4 or acts[0].shape[1] != weight.numel() or z.numel() != 2:
        return None
    pooled = acts[0].cpu().mean(dim=(2, 3)) @ weight + bias
    if not torch.allclose(pooled, z, rtol=1e-4, atol=1e-4 * max(1.0, float(z.abs().max()))):
        log.debug("layer %s does not feed a pooled linear head: Grad-CAM needs PyTorch for this model", name)
        return None
    return LinearHead(name, weight.numpy().astype("float32"), bias)
