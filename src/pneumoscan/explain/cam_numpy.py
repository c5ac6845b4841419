"""Grad-CAM maps in NumPy: the map post-processing shared with the PyTorch Grad-CAM, and the
PyTorch-free Grad-CAM of networks whose head is global average pooling and one linear unit.

For such a head the logit of an image is ``z = w · GAP(A) + b``, ``A`` the target layer's
``(C, H, W)`` output, so ``∂z/∂A[c, i, j] = w[c] / (H·W)`` at every position: Grad-CAM's
channel weights (the spatial mean of the gradient) are ``±w / (H·W)`` and its map is
``relu(±w · A)`` up to a positive factor, which the normalisation to [0, 1] removes
(CAM, Zhou et al. 2016, is Grad-CAM's special case). An ONNX export of such a model returns
``A`` as a second output (``features``) and stores ``w`` and ``b`` in its metadata
(:class:`LinearHead`), so :func:`linear_head_maps` explains a prediction with onnxruntime
alone. MobileNetV2, the ResNets and EfficientNet-B0 qualify; which models do is decided
numerically at export time (:func:`pneumoscan.explain.gradcam.linear_head`). An ensemble of
such networks exports one feature output and one head per member (a list: :func:`heads_from_json`),
and its map is the mean of the members' maps, as its PyTorch Grad-CAM.

NumPy and Pillow only: this module never imports PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.imaging import resize_float
from ..errors import ModelError

#: What a map can explain: the predicted class, the pneumonia logit, or its negation.
TARGETS = ("predicted", "pneumonia", "normal")


@dataclass(frozen=True)
class LinearHead:
    """A one-logit head ``z = weight · GAP(A) + bias`` on the output ``A`` of ``layer``.

    Attributes:
        layer: the target layer's ``named_modules`` name (``backbone.features.18``).
        weight: ``(C,)`` float32, one weight per channel of ``A``.
        bias: the linear unit's bias.
    """

    layer: str
    weight: np.ndarray
    bias: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (exact: float32 weights survive a float64 round trip)."""
        return {"layer": self.layer, "weight": [float(v) for v in np.asarray(self.weight, np.float32)], "bias": float(self.bias)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LinearHead":
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ModelError: missing or non-finite values.
        """
        try:
            w = np.asarray(d["weight"], dtype=np.float32).reshape(-1)
            head = cls(str(d["layer"]), w, float(d.get("bias", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed linear head description ({e})") from e
        if not head.layer or w.size == 0 or not np.all(np.isfinite(w)) or not np.isfinite(head.bias):
            raise ModelError("malformed linear head description (empty layer or weights, or non-finite values)")
        return head


def heads_from_json(value: Any) -> list[LinearHead]:
    """The heads an export's ``pneumoscan.cam`` metadata describes: one
    :meth:`LinearHead.to_dict` (one network) or a list of them (an ensemble, one per member).

    Args:
        value: the decoded JSON.

    Raises:
        ModelError: an empty list or a malformed head.
    """
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ModelError("malformed linear head description (an empty list)")
    return [LinearHead.from_dict(d) for d in items]


def check_target(target: str) -> str:
    """``target`` if it is one of :data:`TARGETS`.

    Raises:
        ModelError: anything else.
    """
    if target not in TARGETS:
        raise ModelError(f"Grad-CAM target must be one of {', '.join(TARGETS)} (got '{target}')")
    return target


def target_signs(logits: np.ndarray, target: str = "predicted", logit_threshold: float = 0.0) -> np.ndarray:
    """``+1`` where a map explains the logit, ``-1`` where it explains its negation (evidence
    for NORMAL): always +1 for ``"pneumonia"``, -1 for ``"normal"``, and for ``"predicted"``
    +1 exactly where ``logit >= logit_threshold``.

    Args:
        logits: ``(B,)`` raw logits.
        target: one of :data:`TARGETS`.
        logit_threshold: the logit at which the prediction turns PNEUMONIA.
    """
    z = np.asarray(logits, dtype=np.float32).reshape(-1)
    if check_target(target) == "pneumonia":
        return np.ones_like(z)
    if target == "normal":
        return -np.ones_like(z)
    return np.where(z >= np.float32(logit_threshold), 1.0, -1.0).astype(np.float32)


def finish_maps(raw: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Grad-CAM's post-processing of rectified maps: bilinear upsampling to ``size``
    (:func:`~pneumoscan.core.imaging.resize_float`, pixel centres aligned) and per-map
    min-max scaling to [0, 1]; a map without positive evidence (flat) becomes all zeros.

    Args:
        raw: ``(B, h, w)`` non-negative maps at the target layer's resolution.
        size: ``(H, W)`` to upsample to; ``None`` keeps ``(h, w)``.

    Returns:
        ``(B, H, W)`` float32 in [0, 1].
    """
    raw = np.asarray(raw, dtype=np.float32)
    h, w = size if size is not None else raw.shape[-2:]
    maps = np.stack([resize_float(m, int(h), int(w), clip=False) for m in raw]) if len(raw) else np.zeros((0, h, w), np.float32)
    flat = maps.reshape(len(maps), -1)
    lo = flat.min(axis=1, keepdims=True) if flat.size else np.zeros((len(maps), 1), np.float32)
    span = (flat.max(axis=1, keepdims=True) if flat.size else lo) - lo
    tiny = np.finfo(np.float32).tiny  # randomly initialised nets have minute activations
    out = np.where(span > tiny, (flat - lo) / np.maximum(span, tiny), 0.0).astype(np.float32)
    return np.clip(out, 0.0, 1.0).reshape(maps.shape)


def linear_head_maps(
    features: np.ndarray | Sequence[np.ndarray],
    head: LinearHead | Sequence[LinearHead],
    logits: Sequence[float] | np.ndarray,
    *,
    target: str = "predicted",
    logit_threshold: float = 0.0,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Grad-CAM maps of a global-average-pooling + linear head, from the target layer's output.

    Args:
        features: ``(B, C, h, w)`` output of ``head.layer`` (an ONNX export's ``features``);
            for an ensemble, one such array per member.
        head: the linear unit; for an ensemble, one per member (the maps are then the mean of
            the members' maps).
        logits: ``(B,)`` the images' raw logits (they choose the explained class; an
            ensemble's: the mean of its members').
        target: ``"predicted"`` class, ``"pneumonia"`` or ``"normal"``.
        logit_threshold: the logit at which the prediction turns PNEUMONIA.
        size: ``(H, W)`` of the maps (the model's input side), ``None``: ``(h, w)`` (an
            ensemble: the finest of its members').

    Returns:
        ``(B, H, W)`` float32 maps in [0, 1], equal to PyTorch Grad-CAM's
        (:class:`pneumoscan.explain.GradCAM`) up to float rounding.

    Raises:
        ModelError: features that do not fit the head(s).
    """
    if not isinstance(head, LinearHead):
        heads, feats = list(head), [np.asarray(f, dtype=np.float32) for f in features]
        if not heads or len(heads) != len(feats):
            raise ModelError(f"{len(feats)} feature maps for {len(heads)} linear heads")
        size = size or max(tuple(f.shape[-2:]) for f in feats)
        maps = [linear_head_maps(f, h, logits, target=target, logit_threshold=logit_threshold, size=size) for f, h in zip(feats, heads)]
        return maps[0] if len(maps) == 1 else np.mean(np.stack(maps), axis=0, dtype=np.float32)
    a = np.asarray(features, dtype=np.float32)
    if a.ndim != 4 or a.shape[1] != head.weight.size:
        raise ModelError(f"features of shape {a.shape} do not fit a linear head of {head.weight.size} channels")
    signs = target_signs(np.asarray(logits), target, logit_threshold)
    if signs.size != a.shape[0]:
        raise ModelError(f"{signs.size} logits for {a.shape[0]} feature maps")
    raw = np.einsum("c,bchw->bhw", np.asarray(head.weight, np.float32), a, optimize=True) * signs[:, None, None]
    return finish_maps(np.maximum(raw, 0.0), size)
