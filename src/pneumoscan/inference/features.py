"""Pooled features of a model, next to its logits, from any runner: the input of the
distribution-shift check (:mod:`pneumoscan.inference.shift`).

The features are the global-average-pooled output of a layer (the model's Grad-CAM layer: its
last feature maps), from a forward hook on the PyTorch model (:class:`TorchRunner`) or from the
``features`` output of an ONNX export (:class:`OnnxRunner`), in the same forward pass as the
logits. PyTorch is never imported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ModelError
from .reading import decode_file, ordered_map
from .runners import OnnxRunner, Runner, TorchRunner

#: ``(logits (B,), pooled features (B, C))`` of a preprocessed batch.
FeatureForward = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


def pool_features(features: np.ndarray) -> np.ndarray:
    """``(B, C, h, w)`` feature maps → ``(B, C)`` means over ``h, w`` (other shapes: flattened)."""
    f = np.asarray(features, dtype=np.float32)
    return f.mean(axis=(2, 3)) if f.ndim == 4 else f.reshape(f.shape[0], -1)


class _TorchTap:
    """Logits and the pooled output of one layer of a :class:`TorchRunner`'s model (a forward
    hook, registered for the duration of each call)."""

    def __init__(self, runner: TorchRunner, module: Any) -> None:
        self.runner, self.module = runner, module

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kept: list[np.ndarray] = []

        def hook(_m: Any, _i: Any, out: Any) -> None:
            t = out.detach().float()
            kept.append((t.mean(dim=(2, 3)) if t.dim() == 4 else t.reshape(t.shape[0], -1)).cpu().numpy())

        handle = self.module.register_forward_hook(hook)
        try:
            logits = self.runner.forward(batch)
        finally:
            handle.remove()
        return logits, kept[-1]


def feature_forward(runner: Runner, layer: str) -> FeatureForward | None:
    """What gives a runner's logits together with the pooled features of ``layer``, or ``None``
    when it cannot (an ONNX file without that layer's ``features`` output, an int8 file, an
    unknown layer, another kind of runner).

    Args:
        runner: a predictor's runner.
        layer: the feature layer (``named_modules`` name).
    """
    if isinstance(runner, OnnxRunner):
        head = runner.linear_head
        if head is None or head.layer != layer:
            return None

        def onnx_forward(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, feats = runner.forward_features(batch)
            return logits, pool_features(feats)

        return onnx_forward
    if isinstance(runner, TorchRunner):
        try:
            return _TorchTap(runner, runner.model.get_submodule(layer))
        except AttributeError:
            return None
    return None


def default_layer(runner: Runner) -> str:
    """The feature layer of a runner's model: its ONNX export's ``features`` layer, else the
    PyTorch model's default Grad-CAM layer.

    Raises:
        ModelError: the runner has neither (an ONNX file without feature maps).
    """
    head = getattr(runner, "linear_head", None)
    if head is not None:
        return str(head.layer)
    if isinstance(runner, TorchRunner):
        from ..explain import resolve_layer

        return resolve_layer(runner.model, None)[0]
    raise ModelError(f"the {getattr(runner, 'backend', '?')} runner gives no feature maps: use the PyTorch backend")


@dataclass
class FeatureSet:
    """Logits and pooled features of readable images.

    Attributes:
        logits: ``(n,)`` raw logits (one view, no TTA).
        features: ``(n, C)`` pooled features.
        index: the input position of each row.
        errors: input position → why it could not be read.
    """

    logits: np.ndarray
    features: np.ndarray
    index: list[int]
    errors: dict[int, str]


def forward_files(predictor: Any, paths: Sequence[str | Path], layer: str | None = None, *, features: bool = True) -> FeatureSet:
    """Logits (one view: no TTA) and pooled features of image files through a predictor's
    reader, preprocessing and runner (no guard), in batches of ``predictor.batch_size``.

    Args:
        predictor: a :class:`~pneumoscan.inference.Predictor` (a PyTorch runner, or an ONNX
            export with feature maps).
        paths: image files; unreadable ones are skipped and listed in ``errors``.
        layer: the feature layer (default :func:`default_layer`).
        features: ``False``: logits only (``features`` then has no columns).

    Raises:
        ModelError: the runner gives no features of that layer.
    """
    forward: FeatureForward | None
    if features:
        layer = layer or default_layer(predictor.runner)
        forward = feature_forward(predictor.runner, layer)
        if forward is None:
            raise ModelError(f"the {predictor.backend} runner gives no feature maps of {layer}: use the PyTorch backend")
    else:
        def forward(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return predictor.runner.forward(batch), np.zeros((batch.shape[0], 0), np.float32)
    size = predictor.input_size

    def read(p: str) -> Any:
        return decode_file(p, max_side=size, input_size=size)

    logits: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    index: list[int] = []
    errors: dict[int, str] = {}
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        z, f = forward(np.stack([x for _, x in pending]))
        logits.append(np.asarray(z, np.float64).reshape(-1))
        feats.append(np.asarray(f, np.float64))
        index.extend(i for i, _ in pending)
        pending.clear()

    for i, item in enumerate(ordered_map(read, [str(p) for p in paths], predictor.read_workers, 4 * predictor.batch_size)):
        if item.error is not None or item.input is None:
            errors[i] = item.error or "no image"
            continue
        pending.append((i, item.input))
        if len(pending) >= predictor.batch_size:
            flush()
    if pending:
        flush()
    width = feats[0].shape[1] if feats else 0
    return FeatureSet(np.concatenate(logits) if logits else np.zeros(0), np.concatenate(feats) if feats else np.zeros((0, width)),
                      index, errors)
