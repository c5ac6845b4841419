"""A timm-style model registry: ``@register_model`` builders and ``create_model(name, **kw)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..data.preprocessing import Preprocessing
from ..errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a model.

    Attributes:
        name: registry name.
        builder: ``builder(weights=..., input_size=..., **kw) -> nn.Module``.
        input_size: default square input side.
        in_channels: channels of the network proper (inputs are always greyscale).
        mean, std: normalisation applied inside the model.
        gradcam_layer: default Grad-CAM target layer (a ``named_modules`` name).
        pretrained: name of the ImageNet weights, or ``None`` if there are none.
        description: one line for ``pneumoscan models``.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gradcam_layer: str
    pretrained: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def preprocessing(self, input_size: int | None = None) -> Preprocessing:
        return Preprocessing(
            input_size=input_size or self.input_size, in_channels=self.in_channels, mean=self.mean, std=self.std
        )


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    gradcam_layer: str,
    pretrained: str | None = None,
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ModelError(f"model '{name}' registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, input_size, in_channels, tuple(mean), tuple(std), gradcam_layer, pretrained, description)
        return fn

    return deco


class InputAdapter(nn.Module):
    """Normalises greyscale ``[0, 1]`` input and expands it to the backbone's channels.

    Args:
        mean, std: per-output-channel normalisation.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        return (x - self.mean) / self.std


class XrayClassifier(nn.Module):
    """``adapter`` (normalise/expand) → ``backbone`` (features) → ``head`` (one logit).

    ``backbone`` and ``head`` are separate so the backbone can be frozen and Grad-CAM can
    target ``backbone.<layer>``.
    """

    def __init__(self, adapter: InputAdapter, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.adapter(x)))

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (``False``) or unfreeze the backbone; BatchNorm stays in eval while frozen."""
        for p in self.backbone.parameters():
            p.requires_grad = trainable
        self._backbone_frozen = not trainable

    def train(self, mode: bool = True) -> "XrayClassifier":
        super().train(mode)
        if mode and getattr(self, "_backbone_frozen", False):
            self.backbone.eval()
        return self
