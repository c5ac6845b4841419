"""Building registered models: ``create_model(name, **kw)`` (timm-style), ``list_models()``,
``get_spec(name)``. Importing this module registers pneumoscan's own models
(:mod:`pneumoscan.models.builders`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ModelError
from . import builders  # noqa: F401  (registers the built-in models)
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
        **kwargs: builder options (e.g. ``dropout``).

    Returns:
        A module mapping ``(B, 1, S, S)`` greyscale in [0, 1] to ``(B, 1)`` logits.
    """
    spec = get_spec(name)
    model = spec.builder(weights=weights, input_size=input_size or spec.input_size, **kwargs)
    model.pneumoscan_name = name  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
