"""``load_predictor``: a :class:`~pneumoscan.inference.Predictor` on any backend, from a
checkpoint, a loaded bundle, an exported ONNX file or the shipped default model.

Its defaults are those of ``pneumoscan predict``, so the Python API gives the answers the
command, the service and the web page give: the backend is chosen the same way
(``backend="auto"``: onnxruntime when installed, else PyTorch) and the not-a-chest-X-ray
guard is on (``guard=True``; ``guard=False`` is the explicit opt-out, like ``--no-guard``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.bundle import ModelBundle, load_bundle
from . import onnx_cache
from .predictor import Predictor
from .runners import BACKENDS, OnnxRunner, TorchRunner, torch_available

log = logging.getLogger(__name__)


def load_predictor(
    checkpoint: str | Path | ModelBundle | None = None,
    *,
    backend: str = "auto",
    onnx: str | Path | None = None,
    guard: Any = True,
    batch_size: int = 8,
    tta: str | bool = "none",
    device: str = "cpu",
    threads: int | None = None,
    lanes: int | None = None,
    cache: str | Path | None = None,
) -> Predictor:
    """A :class:`Predictor` for a checkpoint, a loaded bundle, an exported ONNX file, or the
    shipped default model.

    Args:
        checkpoint: ``.pt`` file, run directory, :class:`~pneumoscan.models.bundle.ModelBundle`,
            or ``None`` for the shipped default model.
        backend: ``"auto"`` (default, as ``pneumoscan predict``: onnx when onnxruntime is
            installed and the export works, else torch), ``"torch"`` (fp32), ``"torch-bf16"``
            (bf16 autocast, channels_last), ``"onnx"`` (onnxruntime; the checkpoint is
            exported to the cache on first use) or ``"onnx-int8"`` (an int8 file given as
            ``onnx``). With ``"onnx"`` or
            ``"auto"`` and a cached export (or the shipped default model, whose export is
            shipped), PyTorch is not imported at all (it is loaded later only if a heat map
            needs it: see :meth:`Predictor.heatmap_layer`).
        onnx: an ONNX file written by ``pneumoscan export`` or the int8 quantiser (everything
            comes from its metadata; ``checkpoint`` is not used). Implies an onnx backend.
        guard: the not-a-chest-X-ray guard: ``True`` (default: the shipped guard, as the
            command line, the service and the web page use it), ``False`` (off: every input
            is answered, even a plot or a photo) or a :class:`pneumoscan.guard.Guard`.
        batch_size: images per forward pass.
        tta: test-time augmentation mode.
        device: torch device of the PyTorch backends.
        threads: onnxruntime CPU threads (default: ``$OMP_NUM_THREADS`` or the usable CPUs).
        lanes: concurrent onnxruntime forward passes sharing ``threads``.
        cache: folder of cached ONNX exports (default ``$PNEUMOSCAN_CACHE`` or
            ``~/.cache/pneumoscan``).

    Raises:
        CheckpointError: missing, corrupt or unverifiable checkpoint or ONNX file.
        ConfigError: unknown backend, onnxruntime missing for ``"onnx"``, or PyTorch missing
            for a ``.pt`` checkpoint that has no ONNX export yet (or a torch backend).
    """
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown backend '{backend}' (auto, {', '.join(BACKENDS)})")
    opts: dict[str, Any] = {"batch_size": batch_size, "tta": tta, "guard": guard}
    if onnx is not None:
        if backend == "torch-bf16":
            raise ConfigError("an ONNX file runs on onnxruntime, not on the torch-bf16 backend")
        runner = OnnxRunner.open(onnx, threads=threads, lanes=lanes)
        if backend == "onnx-int8" and runner.backend != "onnx-int8":
            raise ConfigError(f"{onnx}: not an int8 model (make one with 'pneumoscan benchmark quantize')")
        return Predictor(onnx_cache.bundle_from_metadata(runner.metadata, str(onnx)), runner, **opts)
    if backend == "onnx-int8":
        raise ConfigError("the onnx-int8 backend needs an int8 ONNX file (onnx=...; see 'pneumoscan benchmark quantize')")
    bundle = checkpoint if isinstance(checkpoint, ModelBundle) else None
    if backend in ("auto", "onnx") and bundle is None:
        found = onnx_cache.open_cached_export(checkpoint, cache=cache, threads=threads, lanes=lanes)  # no PyTorch import
        if found is not None:
            return Predictor(*found, **opts)
    if backend == "auto" and not onnx_cache.have_onnxruntime():
        backend = "torch"
    if bundle is None:
        if not torch_available():
            what = "the shipped default model's .pt file" if checkpoint is None else str(checkpoint)
            raise ConfigError(
                f"{what} needs PyTorch (pip install 'pneumoscan[train]'); without it, run an ONNX export "
                "('pneumoscan export' where PyTorch is installed) with --onnx FILE"
                if backend in ("auto", "onnx") else f"the {backend} backend needs PyTorch: pip install 'pneumoscan[train]'"
            )
        bundle = load_bundle(checkpoint)  # type: ignore[arg-type]
    if backend in ("auto", "onnx"):
        try:
            return Predictor(bundle, onnx_cache.cached_export_runner(bundle, cache=cache, threads=threads, lanes=lanes), **opts)
        except Exception as e:  # noqa: BLE001 - any export/runtime failure: the PyTorch path always works
            if backend == "onnx":
                raise
            log.warning("ONNX backend unavailable (%s); using PyTorch", str(e).splitlines()[0] if str(e) else e.__class__.__name__)
    return Predictor(bundle, TorchRunner(bundle.build_model(), device=device, bf16=backend == "torch-bf16"), **opts)
