"""Building registered models: ``create_model(name, **kw)`` (timm-style), ``list_models()``,
``get_spec(name)``. Importing this module registers pneumoscan's own models
(:mod:`pneumoscan.models.builders`). ``create_model("ensemble", members=[...])`` builds an
ensemble of registered models (:mod:`pneumoscan.models.ensemble`; not a registry entry: it is
made from trained models, never trained itself)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ModelError
from . import builders  # noqa: F401  (registers the built-in models)
from .ensemble import ENSEMBLE_ARCH, EnsembleNet, member_specs
from .registry import _REGISTRY, ModelSpec


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; unknown names raise ModelError listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model '{name}' (available: {', '.join(list_models())})") from None


def create_model(name: str, weights: str | None = None, input_size: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name (``pneumoscan models`` lists them).
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's weights, from the torch
            hub cache when offline) or a path to a state-dict file.
        input_size: square input side (default: the model's).
        **kwargs: builder options (e.g. ``dropout``); for ``"ensemble"``: ``members``.

    Returns:
        A module mapping ``(B, 1, S, S)`` greyscale in [0, 1] to ``(B, 1)`` logits.
    """
    if name == ENSEMBLE_ARCH:
        model: nn.Module = _create_ensemble(weights, input_size, **kwargs)
    else:
        spec = get_spec(name)
        model = spec.builder(weights=weights, input_size=input_size or spec.input_size, **kwargs)
    model.pneumoscan_name = name  # type: ignore[attr-defined]
    return model


def _create_ensemble(weights: str | None, input_size: int | None, members: Any = None, **kwargs: Any) -> EnsembleNet:
    """An :class:`~pneumoscan.models.ensemble.EnsembleNet` of freshly built members (their
    weights come with the ensemble's bundle), all taking ``input_size`` (default: theirs).

    Raises:
        ModelError: bad ``members``, other arguments, or members of different input sizes.
    """
    if weights is not None or kwargs:
        raise ModelError(f"an ensemble takes only members=[...] (its weights come with its bundle), not {sorted(kwargs) or 'weights'}")
    specs = member_specs(members)
    sizes = [int(kw.get("input_size") or get_spec(arch).input_size) for arch, kw in specs]
    if len(set(sizes + ([int(input_size)] if input_size else []))) != 1:
        raise ModelError(f"ensemble members must take one input size (got {', '.join(map(str, sizes))}"
                         + (f"; asked for {input_size}" if input_size else "") + ")")
    nets = [create_model(arch, weights=None, **kw) for arch, kw in specs]
    return EnsembleNet(nets, [get_spec(arch).gradcam_layer for arch, _ in specs])


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
