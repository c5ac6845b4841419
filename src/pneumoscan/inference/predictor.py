"""The one prediction path: checkpoint → model + preprocessing + temperature + threshold.

``predict``, ``evaluate``, the web service and the ONNX export all go through
:class:`Predictor`, so every path applies the same preprocessing, calibration and operating
point.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data.io import ImageSource, read_image
from ..data.transforms import Preprocessing, preprocess_batch
from ..errors import ImageReadError, PneumoscanError
from ..evaluation.calibration import sigmoid

log = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")


@dataclass
class Prediction:
    """One image's answer.

    Attributes:
        path: the input's name.
        probability: calibrated probability of pneumonia (``None`` when refused or failed).
        label: ``"PNEUMONIA"`` or ``"NORMAL"`` at ``threshold`` (``None`` when no prediction).
        threshold: the model's operating threshold.
        model: the weight name.
        error: why the file could not be read (one line), if it could not.
        refused: why the input was refused as not a chest X-ray, if it was.
        heatmap: Grad-CAM map in [0, 1] at the image's resolution (not serialised).
        extra: additional fields (e.g. guard score, timing).
    """

    path: str | None
    probability: float | None
    label: str | None
    threshold: float
    model: str
    error: str | None = None
    refused: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("heatmap", "extra")}
        if d["error"] is None:
            d.pop("error")
        if d["refused"] is None:
            d.pop("refused")
        d.update(self.extra)
        return d


class Predictor:
    """A loaded model ready to answer.

    Args:
        model: a registered model (``(B,1,S,S)`` in [0,1] → ``(B,1)`` logits).
        preprocessing: its preprocessing.
        threshold: operating threshold on calibrated probabilities.
        temperature: temperature-scaling factor (logit / T).
        name: weight name shown with every prediction.
        metadata: checkpoint metadata (model name, metrics, sha256, ...).
        device: torch device.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        threshold: float = 0.5,
        temperature: float = 1.0,
        name: str = "model",
        metadata: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.preprocessing = preprocessing
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.name = name
        self.metadata = metadata or {}
        self.batch_size = batch_size
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | str | Path, **kwargs: Any) -> "Predictor":
        """Build from a checkpoint dict or file/run directory."""
        from ..training.checkpoint import load_checkpoint, model_from_checkpoint

        if not isinstance(ckpt, dict):
            ckpt = load_checkpoint(ckpt)
        model = model_from_checkpoint(ckpt)
        name = ckpt.get("weight_name") or f"{ckpt['model_name']}-res{ckpt['preprocessing']['input_size']}-{Path(ckpt.get('_path', 'checkpoint')).parent.name}"
        meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler", "torch_rng", "val_logits", "val_labels")}
        return cls(
            model, Preprocessing.from_dict(ckpt["preprocessing"]), threshold=ckpt.get("threshold", 0.5),
            temperature=ckpt.get("temperature", 1.0), name=name, metadata=meta, **kwargs,
        )

    # ------------------------------------------------------------------ core
    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Greyscale [0,1] arrays → ``(B,1,S,S)`` model input."""
        return preprocess_batch(list(images), self.input_size)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Raw logits of a preprocessed batch."""
        out = []
        for i in range(0, batch.shape[0], self.batch_size):
            out.append(self.model(batch[i : i + self.batch_size].to(self.device)).float().view(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``sigmoid(logit / T)``."""
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated pneumonia probabilities of greyscale [0,1] arrays."""
        if not images:
            return np.zeros(0)
        return self.calibrate(self.logits(self.preprocess(images)))

    def label_of(self, probability: float) -> str:
        return CLASS_NAMES[int(probability >= self.threshold)]

    def _answer(self, name: str | None, prob: float) -> Prediction:
        return Prediction(name, float(prob), self.label_of(prob), self.threshold, self.name)

    def predict_arrays(self, images: Sequence[np.ndarray], names: Sequence[str | None] | None = None) -> list[Prediction]:
        """Predictions for already-decoded greyscale [0,1] arrays."""
        names = list(names) if names is not None else [None] * len(images)
        probs = self.probabilities(images)
        return [self._answer(n, p) for n, p in zip(names, probs)]

    def predict_image(self, source: ImageSource, name: str | None = None) -> Prediction:
        """Read one image (path, bytes or stream) and predict it; read errors raise
        :class:`ImageReadError`."""
        arr = read_image(source, max_side=self.input_size, name=name)
        return self.predict_arrays([arr], [name or (str(source) if isinstance(source, (str, Path)) else None)])[0]

    def predict_paths(self, paths: Iterable[str | Path]) -> Iterator[Prediction]:
        """Predict many files in batches; a file that cannot be read yields a Prediction
        with ``error`` set while the others are still predicted."""
        batch: list[tuple[str, np.ndarray]] = []
        for p in paths:
            try:
                batch.append((str(p), read_image(p, max_side=self.input_size)))
            except PneumoscanError as e:
                yield Prediction(str(p), None, None, self.threshold, self.name, error=_reason(e))
                continue
            if len(batch) >= self.batch_size:
                yield from self.predict_arrays([a for _, a in batch], [n for n, _ in batch])
                batch = []
        if batch:
            yield from self.predict_arrays([a for _, a in batch], [n for n, _ in batch])


def _reason(e: PneumoscanError) -> str:
    return e.reason if isinstance(e, ImageReadError) else str(e)


def load_predictor(checkpoint: str | Path | None = None, **kwargs: Any) -> Predictor:
    """A :class:`Predictor` for ``checkpoint`` (a ``.pt`` file or run directory), or for the
    shipped default model when ``checkpoint`` is ``None``."""
    if checkpoint is None:
        from .default_model import load_default_checkpoint

        return Predictor.from_checkpoint(load_default_checkpoint(), **kwargs)
    return Predictor.from_checkpoint(checkpoint, **kwargs)
