"""The CPU inference fast path: drop-in models for :class:`pneumoscan.inference.Predictor`.

Each backend is an ``nn.Module`` mapping the usual ``(B, 1, S, S)`` greyscale input in [0, 1]
to ``(B, 1)`` fp32 logits, so it slots into ``Predictor(model, preprocessing, ...)`` and
therefore into ``predict``, ``evaluate`` and the web service without changing them:

* :class:`Bf16ChannelsLast` — the PyTorch model under bf16 autocast in channels_last format
  (CPUs with AVX512-BF16/AMX; CUDA);
* :class:`OrtModel` — an ONNX Runtime session (fp32 or int8, see :mod:`.quantize`), created
  once and reused for every call.

:func:`fast_predictor` builds a Predictor from a checkpoint with one of them, and
:func:`decode_paths` decodes files on a thread pool (Pillow releases the GIL; large JPEGs are
decoded at reduced size by draft mode) in input order, overlapping decoding with inference.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data.io import read_image
from ..errors import ConfigError, ModelError, PneumoscanError

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


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path`` with all graph optimisations.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: torch's thread count, so that ``OMP_NUM_THREADS``
            or ``torch.set_num_threads`` governs both engines alike).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("the ONNX backends need onnxruntime: pip install 'pneumoscan[onnx]'") from e
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"{path}: onnxruntime cannot load this model ({str(e).splitlines()[0][:200]})") from e


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` interface Predictor expects.

    Args:
        path: the ONNX file (input ``(B, 1, S, S)`` float32, output ``(B, 1)`` logits).
        threads: intra-op threads (default: torch's).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(arr.shape[0], -1)[:, :1].copy())


def fast_predictor(
    checkpoint: str | Path | dict[str, Any] | None,
    backend: str = "torch-bf16",
    *,
    onnx_path: str | Path | None = None,
    batch_size: int = 8,
    threads: int | None = None,
) -> Any:
    """A :class:`~pneumoscan.inference.Predictor` whose model runs on a fast backend.

    Threshold, temperature, preprocessing and name come from the checkpoint, so answers are
    the same as the plain Predictor's up to the backend's numerics.

    Args:
        checkpoint: checkpoint file, run directory or loaded dict (``None``: the shipped default).
        backend: ``torch-fp32``, ``torch-bf16``, ``onnx-fp32`` or ``onnx-int8``.
        onnx_path: the ONNX file for the ``onnx-*`` backends (fp32 export or int8 model).
        batch_size: images per forward pass (small batches are fastest on CPUs).
        threads: ONNX Runtime intra-op threads.
    """
    from ..inference.predictor import Predictor
    from ..training.checkpoint import load_checkpoint

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if checkpoint is None:
        from ..inference.default_model import load_default_checkpoint

        ckpt = load_default_checkpoint()
    else:
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    base = Predictor.from_checkpoint(ckpt, batch_size=batch_size)
    if backend == "torch-fp32":
        return base
    if backend == "torch-bf16":
        model: nn.Module = Bf16ChannelsLast(base.model)
    else:
        if onnx_path is None:
            raise ConfigError(f"backend {backend} needs an ONNX file (export one with 'pneumoscan benchmark quantize')")
        model = OrtModel(onnx_path, threads)
    return Predictor(
        model, base.preprocessing, threshold=base.threshold, temperature=base.temperature, name=base.name,
        metadata={**base.metadata, "backend": backend}, batch_size=batch_size,
    )


def decode_paths(
    paths: Iterable[str | Path], max_side: int | None, threads: int | None = None, prefetch: int = 32
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Decode images on a thread pool, yielding ``(path, array, None)`` or ``(path, None,
    reason)`` in input order with at most ``prefetch`` images in flight.

    Args:
        paths: image files.
        max_side: decode large JPEGs at reduced size, never below this side (the model input).
        threads: decoder threads (default: ``min(4, cpu_count)``).
        prefetch: bound on decoded-but-not-consumed images (memory bound).
    """

    def work(p: str) -> tuple[str, np.ndarray | None, str | None]:
        try:
            return p, read_image(p, max_side=max_side), None
        except PneumoscanError as e:
            return p, None, getattr(e, "reason", str(e))

    n = threads or min(4, os.cpu_count() or 1)
    it = iter(str(p) for p in paths)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="pneumoscan-decode") as pool:
        pending = [pool.submit(work, p) for p in _take(it, prefetch)]
        while pending:
            head = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
            yield head.result()


def _take(it: Iterator[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        x = next(it, None)
        if x is None:
            break
        out.append(x)
    return out


def predict_folder(predictor: Any, paths: Sequence[str | Path], threads: int | None = None) -> list[Any]:
    """Predict many files with threaded decoding overlapped with batched inference.

    Args:
        predictor: a Predictor (any backend).
        paths: image files, answered in this order.
        threads: decoder threads.

    Returns:
        One :class:`~pneumoscan.inference.Prediction` per path (``error`` set for unreadable files).
    """
    from ..inference.predictor import Prediction

    out: list[Any] = []
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if batch:
            out.extend(predictor.predict_arrays([a for _, a in batch], [n for n, _ in batch]))
            batch.clear()

    for p, arr, err in decode_paths(paths, predictor.input_size, threads):
        if arr is None:
            flush()  # keep input order
            out.append(Prediction(p, None, None, predictor.threshold, predictor.name, error=err))
            continue
        batch.append((p, arr))
        if len(batch) >= predictor.batch_size:
            flush()
    flush()
    return out
