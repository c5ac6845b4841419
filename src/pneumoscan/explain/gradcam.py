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

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .cam_numpy import LinearHead, check_target, finish_maps

log = logging.getLogger(__name__)


def default_layers(model: nn.Module) -> list[str]:
    """The default Grad-CAM target layers of a model: each member's for an ensemble
    (:attr:`~pneumoscan.models.ensemble.EnsembleNet.gradcam_layers`), else the registered
    model's :attr:`~pneumoscan.models.registry.ModelSpec.gradcam_layer`.

    Raises:
        ModelError: no default known for this model.
    """
    own = getattr(model, "gradcam_layers", None)
    if own:
        return list(own)
    name = getattr(model, "pneumoscan_name", None)
    if name is None:
        raise ModelError("this model has no registered Grad-CAM layer; pass layer='...'")
    from ..models import get_spec

    return [get_spec(name).gradcam_layer]


def resolve_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """The target layer of ``model``: ``layer`` (a ``named_modules`` name) or the registered
    model's default (:attr:`~pneumoscan.models.registry.ModelSpec.gradcam_layer`).

    Args:
        model: a pneumoscan model (or any module when ``layer`` is given).
        layer: layer name, ``None`` for the model's default.

    Raises:
        ModelError: unknown layer name, or no single default known for this model (an
            ensemble has one per member: :func:`resolve_layers`).
    """
    if layer is None:
        defaults = default_layers(model)
        if len(defaults) != 1:
            raise ModelError(f"this model has {len(defaults)} Grad-CAM layers ({', '.join(defaults)}); name one")
        layer = defaults[0]
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Sequential)) and n]
        hint = ", ".join(convs[-6:])
        raise ModelError(f"unknown layer '{layer}' for Grad-CAM (layers near the end: {hint})")
    return layer, modules[layer]


def resolve_layers(model: nn.Module, layer: str | None = None) -> list[tuple[str, nn.Module]]:
    """The target layers of ``model`` (Grad-CAM averages their normalised maps).

    Args:
        model: a pneumoscan model.
        layer: one ``named_modules`` name, several joined by commas, or ``None`` for the
            model's default (:func:`default_layers`: an ensemble's members' layers).

    Raises:
        ModelError: an unknown layer name, or no default known for this model.
    """
    names = default_layers(model) if layer is None else [n.strip() for n in layer.split(",")]
    return [resolve_layer(model, n) for n in names]


class GradCAM:
    """Grad-CAM maps of a model's pneumonia logit.

    Args:
        model: a model mapping ``(B, 1, S, S)`` greyscale in [0, 1] to ``(B, 1)`` logits.
        layer: target layer name (``named_modules``), several joined by commas (the mean of
            their normalised maps), default: the registered model's ``gradcam_layer``, or for
            an ensemble each member's (the mean of the members' maps).
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
        self.layers = resolve_layers(model, layer)
        self.layer_name = ",".join(name for name, _ in self.layers)
        self._acts: list[torch.Tensor | None] = []
        self._grads: list[torch.Tensor | None] = []

    def _hook(self, i: int) -> Any:
        """The forward hook of target layer ``i``: keeps its output and registers a tensor hook
        that keeps its gradient."""
        name = self.layers[i][0]

        def forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor) or out.ndim != 4:
                raise ModelError(
                    f"Grad-CAM layer '{name}' must output a (B, C, H, W) feature map, got "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                )
            self._acts[i] = out.detach().clone()
            if out.requires_grad:
                out.register_hook(lambda grad: self._grads.__setitem__(i, grad.detach().clone()))

        return forward_hook

    def compute(self, x: torch.Tensor, upsample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and logits of a batch.

        Args:
            x: ``(B, 1, S, S)`` model input.
            upsample: resize the maps to the input's ``S × S`` (else the layer's resolution;
                with several layers, the finest of them).

        Returns:
            ``(cam, logits)``: ``(B, 1, H, W)`` float maps, each scaled to [0, 1] (all zeros
            when the layer holds no positive evidence; with several layers, the mean of their
            maps), and the ``(B,)`` logits.
        """
        was_training = self.model.training
        self.model.eval()
        n = len(self.layers)
        self._acts, self._grads = [None] * n, [None] * n
        handles = [module.register_forward_hook(self._hook(i)) for i, (_, module) in enumerate(self.layers)]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                inp = x.detach().clone().float().requires_grad_(True)
                logits = self.model(inp).float().reshape(inp.shape[0], -1)[:, 0]
                unused = [name for (name, _), a in zip(self.layers, self._acts) if a is None]
                if unused:
                    raise ModelError(f"Grad-CAM layer '{unused[0]}' was not used by the forward pass")
                if self.target == "pneumonia":
                    sign = torch.ones_like(logits)
                elif self.target == "normal":
                    sign = -torch.ones_like(logits)
                else:
                    sign = torch.where(logits.detach() >= self.logit_threshold, 1.0, -1.0)
                # gradients w.r.t. the input only: parameters' .grad stay untouched, and the
                # tensor hooks on the activations fire on the way
                torch.autograd.grad((logits * sign).sum(), inp)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        acts = [a for a in self._acts if a is not None]
        size = tuple(x.shape[-2:]) if upsample else (None if n == 1 else max(tuple(a.shape[-2:]) for a in acts))
        maps = []
        for a, g in zip(acts, self._grads):
            weights = (torch.zeros_like(a) if g is None else g).mean(dim=(2, 3), keepdim=True)
            raw = F.relu((weights * a).sum(dim=1)).float().cpu().numpy()
            maps.append(finish_maps(raw, size))  # the NumPy path's own post-processing
        cam = maps[0] if n == 1 else np.mean(np.stack(maps), axis=0, dtype=np.float32)
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


def linear_heads(model: nn.Module, input_size: int) -> list[LinearHead] | None:
    """The pooled linear heads that explain a model without PyTorch: ``[linear_head(model)]``
    for one network; for an ensemble (:class:`~pneumoscan.models.ensemble.EnsembleNet`) one per
    member, named by its layer inside the ensemble (``members.<i>.<layer>``); ``None`` when a
    network has none (its maps need PyTorch).

    Args:
        model: a pneumoscan model or ensemble.
        input_size: its input side.
    """
    members, layers = getattr(model, "members", None), getattr(model, "gradcam_layers", None)
    if not isinstance(members, nn.ModuleList) or not layers:
        head = linear_head(model, input_size)
        return None if head is None else [head]
    heads = [linear_head(m, input_size) for m in members]
    if any(h is None for h in heads):
        return None
    return [dataclasses.replace(h, layer=name) for h, name in zip(heads, layers)]  # type: ignore[arg-type]
