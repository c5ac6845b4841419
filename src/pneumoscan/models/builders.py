"""The registered models: the study's three networks and four modern backbones."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..errors import ModelError, WeightsError
from .registry import InputAdapter, XrayClassifier, register_model
from .weights import imagenet_state_dict, load_state_dict_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.25,)


# --------------------------------------------------------------------------- seed_cnn
def _conv_block(cin: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(cout),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
    )


@register_model(
    "seed_cnn", input_size=128, in_channels=1, mean=GREY_MEAN, std=GREY_STD, gradcam_layer="backbone.4.2",
    description="the study's custom CNN: 5 conv blocks 32-64-64-128-256, dense 512",
)
def seed_cnn(weights: str | None = None, input_size: int = 128, dropout: float | None = None, **_: object) -> nn.Module:
    """The study's custom CNN: five 3×3 'same' conv blocks (32-64-64-128-256 filters, ReLU,
    batch norm, 2×2 max-pool, dropout 0.2), flatten, dropout, dense 512, one output.
    2,524,033 trainable parameters at 128×128×1.

    Args:
        weights: ``None`` or a path to a state dict of this model (no ImageNet weights exist).
        input_size: square input side, a multiple of 32.
        dropout: dropout before the dense layer (default 0.5).
    """
    if input_size % 32:
        raise ModelError(f"seed_cnn needs an input size that is a multiple of 32 (got {input_size})")
    widths = [32, 64, 64, 128, 256]
    blocks, cin = [], 1
    for w in widths:
        blocks.append(_conv_block(cin, w, 0.2))
        cin = w
    side = input_size // 32
    head = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(0.5 if dropout is None else dropout),
        nn.Linear(256 * side * side, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 1),
    )
    model = XrayClassifier(InputAdapter(GREY_MEAN, GREY_STD), nn.Sequential(*blocks), head)
    if weights == "imagenet":
        raise WeightsError("seed_cnn has no ImageNet weights; use weights=None or a path")
    if weights:
        _load_into(model, load_state_dict_file(weights))
    return model


# --------------------------------------------------------------------------- torchvision backbones
def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    try:
        missing, unexpected = module.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise WeightsError(f"weights do not fit this model ({first})") from e
    if missing or unexpected:
        log.debug("weights loaded with missing=%s unexpected=%s", missing, unexpected)


def _load_torchvision_weights(net: nn.Module, arch: str, weights: str | None) -> dict[str, torch.Tensor] | None:
    """Load ``"imagenet"`` or a torchvision state-dict file into ``net``; a pneumoscan state
    dict of the whole classifier is returned instead, to be loaded once the head exists."""
    if weights == "imagenet":
        _load_into(net, imagenet_state_dict(arch))
    elif weights:
        sd = load_state_dict_file(weights)
        if any(k.startswith(("backbone.", "head.", "adapter.")) for k in sd):
            return sd
        _load_into(net, sd)
    return None


def _tv_classifier(
    arch: str,
    weights: str | None,
    strip: Callable[[nn.Module], int],
    dropout: float,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> XrayClassifier:
    """Build torchvision ``arch``, load weights into it, replace its classifier by
    ``Identity`` (``strip`` does that and returns the feature width) and add a 1-logit head."""
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    own_sd = _load_torchvision_weights(net, arch, weights)
    width = strip(net)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))
    model = XrayClassifier(InputAdapter(mean, std), net, head)
    if own_sd is not None:
        _load_into(model, own_sd)
    return model


def _strip_fc(net: nn.Module) -> int:
    width = net.fc.in_features
    net.fc = nn.Identity()
    return width


def _strip_classifier_last(net: nn.Module) -> int:
    last = net.classifier[-1]
    width = last.in_features
    net.classifier = nn.Identity()
    return width


def _strip_densenet(net: nn.Module) -> int:
    width = net.classifier.in_features
    net.classifier = nn.Identity()
    return width


@register_model(
    "resnet50", input_size=224, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, gradcam_layer="backbone.layer4",
    pretrained="IMAGENET1K_V1", description="ResNet-50, fine-tuned with a new classifier (study)",
)
def resnet50(weights: str | None = None, input_size: int = 224, dropout: float | None = None, **_: object) -> nn.Module:
    """ResNet-50 with a new one-logit classifier, fine-tuned end to end (the study's third model)."""
    return _tv_classifier("resnet50", weights, _strip_fc, 0.0 if dropout is None else dropout)


@register_model(
    "resnet18", input_size=224, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, gradcam_layer="backbone.layer4",
    pretrained="IMAGENET1K_V1", description="ResNet-18 with a one-logit classifier",
)
def resnet18(weights: str | None = None, input_size: int = 224, dropout: float | None = None, **_: object) -> nn.Module:
    """ResNet-18 with a new one-logit classifier."""
    return _tv_classifier("resnet18", weights, _strip_fc, 0.0 if dropout is None else dropout)


@register_model(
    "densenet121", input_size=224, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    gradcam_layer="backbone.features.denseblock4", pretrained="IMAGENET1K_V1",
    description="DenseNet-121 (CheXNet's backbone) with a one-logit classifier",
)
def densenet121(weights: str | None = None, input_size: int = 224, dropout: float | None = None, **_: object) -> nn.Module:
    """DenseNet-121, the backbone of CheXNet, with a new one-logit classifier."""
    return _tv_classifier("densenet121", weights, _strip_densenet, 0.0 if dropout is None else dropout)


@register_model(
    "mobilenet_v2", input_size=224, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    gradcam_layer="backbone.features.18", pretrained="IMAGENET1K_V1",
    description="MobileNetV2 with a one-logit classifier (the shipped default's architecture)",
)
def mobilenet_v2(weights: str | None = None, input_size: int = 224, dropout: float | None = None, **_: object) -> nn.Module:
    """MobileNetV2 with a new one-logit classifier (dropout 0.2 as torchvision's)."""
    return _tv_classifier("mobilenet_v2", weights, _strip_classifier_last, 0.2 if dropout is None else dropout)


@register_model(
    "efficientnet_b0", input_size=224, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    gradcam_layer="backbone.features.8", pretrained="IMAGENET1K_V1",
    description="EfficientNet-B0 with a one-logit classifier",
)
def efficientnet_b0(weights: str | None = None, input_size: int = 224, dropout: float | None = None, **_: object) -> nn.Module:
    """EfficientNet-B0 with a new one-logit classifier (dropout 0.2 as torchvision's)."""
    return _tv_classifier("efficientnet_b0", weights, _strip_classifier_last, 0.2 if dropout is None else dropout)


@register_model(
    "vgg16", input_size=256, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, gradcam_layer="backbone.0.29",
    pretrained="IMAGENET1K_V1", description="VGG-16 features (frozen) + dense 512-128-1 head (study)",
)
def vgg16(
    weights: str | None = None, input_size: int = 256, dropout: float | None = None, freeze: bool = True, **_: object
) -> nn.Module:
    """The study's transfer model: VGG-16 convolutional features (ImageNet, frozen) and a dense
    512 → 128 → 1 head on the flattened feature map (16,843,521 parameters at 256×256).

    Args:
        weights: ``None``, ``"imagenet"`` or a path (torchvision VGG-16 or pneumoscan state dict).
        input_size: square input side, a multiple of 32.
        dropout: dropout between the dense layers (default 0.5).
        freeze: freeze the convolutional features (the study's setting).
    """
    import torchvision

    if input_size % 32:
        raise ModelError(f"vgg16 needs an input size that is a multiple of 32 (got {input_size})")
    net = torchvision.models.vgg16(weights=None)
    own_sd = _load_torchvision_weights(net, "vgg16", weights)
    side = input_size // 32
    p = 0.5 if dropout is None else dropout
    head = nn.Sequential(
        nn.Linear(512 * side * side, 512), nn.ReLU(inplace=True), nn.Dropout(p),
        nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Dropout(p),
        nn.Linear(128, 1),
    )
    model = XrayClassifier(InputAdapter(IMAGENET_MEAN, IMAGENET_STD), nn.Sequential(net.features, nn.Flatten()), head)
    if own_sd is not None:
        _load_into(model, own_sd)
    if freeze:
        model.set_backbone_trainable(False)
    return model
