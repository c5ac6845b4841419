"""The CPU inference fast path on top of :class:`pneumoscan.inference.Predictor`.

* :class:`Bf16Predictor` — the PyTorch model under bf16 autocast in channels_last format
  (CPUs with AVX512-BF16/AMX, and CUDA): a Predictor whose ``_forward`` differs, so
  decoding, guard, calibration, threshold and Grad-CAM (fp32) are the shipped ones;
* ONNX Runtime — :class:`pneumoscan.inference.onnx_backend.OnnxPredictor` on an fp32 export
  (``pneumoscan export``) or on an int8 model from :mod:`pneumoscan.bench.quantize`
  (``pneumoscan benchmark quantize``), which keeps the export's metadata and so loads with
  ``pneumoscan predict --onnx model.int8.onnx``.

:func:`fast_predictor` builds any of them from a checkpoint; the model or session is created
once and reused for every image (decoding runs on the Predictor's reader threads, JPEGs at
reduced size).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..inference.predictor import Predictor

log = logging.getLogger(__name__)

BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")


class Bf16ChannelsLast(nn.Module):
    """Run ``model`` under bf16 autocast with channels_last tensors; return fp32 logits.

    Args:
        model: a registered pneumoscan model (eval mode is set).
        dtype: autocast dtype (``torch.bfloat16``; ``torch.float16`` on CUDA).
        channels_last: convert model and input to NHWC (faster oneDNN/cuDNN convolutions).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        self.dtype = dtype
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.model(x)
        return out.float()


class Bf16Predictor(Predictor):
    """A :class:`~pneumoscan.inference.Predictor` whose forward pass runs under bf16
    autocast with channels_last tensors (fp32 logits out; Grad-CAM stays fp32).

    Args:
        *args, **kwargs: as :class:`~pneumoscan.inference.Predictor`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise ModelError("Bf16Predictor needs a PyTorch model")
        self.model = self.model.to(memory_format=torch.channels_last)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        x = self._as_tensor(chunk).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            out = self.model(x)
        return out.float().reshape(-1).cpu().numpy()


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path`` (any ONNX file, e.g. an intermediate of the
    quantiser) with the backend's settings.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: torch's thread count, so that ``--threads`` or
            ``OMP_NUM_THREADS`` governs both engines alike).
    """
    from ..inference.onnx_backend import cpu_session

    return cpu_session(path, threads or torch.get_num_threads())


def fast_predictor(
    checkpoint: str | Path | dict[str, Any] | None,
    backend: str = "torch-bf16",
    *,
    onnx_path: str | Path | None = None,
    batch_size: int = 8,
    **kwargs: Any,
) -> Predictor:
    """A Predictor running on one of :data:`BACKENDS`.

    Threshold, temperature, preprocessing and name come from the checkpoint (or, for ONNX
    files, from their metadata, which the int8 model copies from its export).

    Args:
        checkpoint: checkpoint file, run directory or loaded dict (``None``: the shipped
            default); not needed for the ``onnx-*`` backends.
        backend: ``torch-fp32``, ``torch-bf16``, ``onnx-fp32`` or ``onnx-int8``.
        onnx_path: the ONNX file of the ``onnx-*`` backends (``pneumoscan export`` output or an
            int8 model from ``pneumoscan benchmark quantize``).
        batch_size: images per forward pass (small batches are fastest on CPUs).
        **kwargs: further Predictor options (``guard``, ``tta``, ``threads`` for ONNX).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend.startswith("onnx"):
        if onnx_path is None:
            raise ConfigError(f"backend {backend} needs an ONNX file ('pneumoscan export' / 'pneumoscan benchmark quantize')")
        from ..inference.onnx_backend import OnnxPredictor

        return OnnxPredictor.from_onnx(onnx_path, batch_size=batch_size, **kwargs)
    from ..inference.predictor import _load_ckpt

    ckpt = checkpoint if isinstance(checkpoint, dict) else _load_ckpt(checkpoint)
    cls = Bf16Predictor if backend == "torch-bf16" else Predictor
    return cls.from_checkpoint(ckpt, batch_size=batch_size, **kwargs)
