"""Export a checkpoint to ONNX (``pneumoscan export``).

The graph takes ``image``: ``(batch, 1, S, S)`` float32 greyscale in [0, 1] (normalisation
and channel expansion are inside the model, as in PyTorch) and returns ``logit``:
``(batch, 1)``. The batch axis is dynamic. Everything else a predictor needs is stored in the
file's ``metadata_props``:

========================  ===========================================================
``pneumoscan.format``     ``pneumoscan-onnx/1``
``model_name``            registry name (``mobilenet_v2``, ...)
``weight_name``           the weights' name shown with predictions
``source_sha256``         sha256 of the checkpoint file it was exported from
``preprocessing``         JSON of :class:`~pneumoscan.data.transforms.Preprocessing`
``threshold``             operating threshold on calibrated probabilities
``temperature``           temperature scaling (probability = sigmoid(logit / T))
``threshold_method``      how the threshold was chosen
``class_names``           JSON list, index 1 = PNEUMONIA
``val_metrics``           JSON of the validation metrics at the threshold (if any)
========================  ===========================================================

The exporter is torch's ``torch.export``-based one (``dynamo=True``, opset 18), with the
TorchScript exporter (``dynamo=False``) as fallback; both run offline. Weights are stored
inside the ``.onnx`` file (no external data file).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from ..errors import CheckpointError, ConfigError, ModelError
from ..utils.io import atomic_path, sha256_file

if TYPE_CHECKING:  # PyTorch is imported by the functions that export
    import torch

log = logging.getLogger(__name__)

ONNX_FORMAT = "pneumoscan-onnx/1"
DEFAULT_OPSET = 18
MIN_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logit"


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ConfigError("ONNX export needs onnx and onnxscript (pip install 'pneumoscan[onnx]')") from e
    return onnx


def onnx_metadata(ckpt: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` written for a checkpoint (all values are strings).

    Args:
        ckpt: a loaded checkpoint dict (``_path`` or ``sha256`` give the source hash).
    """
    from ..utils.version import __version__
    from .predictor import CLASS_NAMES, checkpoint_args

    args = checkpoint_args(ckpt)
    meta = args["metadata"]
    out = {
        "pneumoscan.format": ONNX_FORMAT,
        "pneumoscan.version": __version__,
        "model_name": str(ckpt["model_name"]),
        "weight_name": str(args["name"]),
        "source_sha256": str(meta.get("file_sha256") or ""),
        "preprocessing": json.dumps(args["preprocessing"].to_dict()),
        "threshold": repr(float(args["threshold"])),
        "temperature": repr(float(args["temperature"])),
        "threshold_method": str(ckpt.get("threshold_method") or ""),
        "class_names": json.dumps(list(ckpt.get("class_names") or CLASS_NAMES)),
        "input": f"{INPUT_NAME}: float32 (batch, 1, S, S) greyscale in [0, 1], stretched to S x S",
        "output": f"{OUTPUT_NAME}: float32 (batch, 1); P(pneumonia) = sigmoid({OUTPUT_NAME} / temperature)",
    }
    if ckpt.get("val_metrics"):
        out["val_metrics"] = json.dumps(ckpt["val_metrics"], default=float)
    return out


def _export_graph(model: torch.nn.Module, size: int, path: Path, opset: int, dynamo: bool) -> None:
    import torch

    x = torch.rand(2, 1, size, size)
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    # the exporters print progress and warn about their internals; keep the CLI's output clean
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, external_data=False, verbose=False,
                dynamic_shapes={"x": {0: batch}}, **common,
            )
        else:
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, verbose=False, do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **common,
            )


def export_onnx(
    checkpoint: str | Path | dict[str, Any] | None,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    check: bool = True,
) -> Path:
    """Export a checkpoint to an ONNX file with its calibration in the metadata.

    Args:
        checkpoint: ``.pt`` file, run directory, loaded checkpoint dict, or ``None`` for the
            shipped default model.
        out: destination ``.onnx`` (written atomically).
        opset: ONNX opset (at least 17).
        exporter: ``"dynamo"`` (``torch.export``), ``"legacy"`` (TorchScript) or ``"auto"``
            (dynamo, falling back to legacy if it fails).
        check: run ``onnx.checker`` and compare onnxruntime's logits with PyTorch's on a
            random batch (when onnxruntime is installed).

    Returns:
        The written path.

    Raises:
        CheckpointError: unreadable checkpoint.
        ConfigError: onnx missing, bad opset or exporter name.
        ModelError: the export failed.
    """
    onnx = _require_onnx()
    from ..training.checkpoint import load_checkpoint, model_from_checkpoint
    from .predictor import _load_ckpt

    if opset < MIN_OPSET:
        raise ConfigError(f"opset must be >= {MIN_OPSET} (got {opset})")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ConfigError(f"exporter must be auto, dynamo or legacy (got '{exporter}')")
    if isinstance(checkpoint, dict):
        ckpt = checkpoint
    elif checkpoint is None:
        ckpt = _load_ckpt(None)
    else:
        ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    size = int(ckpt["preprocessing"]["input_size"])
    meta = onnx_metadata(ckpt)
    out = Path(out)
    tries = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    last: Exception | None = None
    with atomic_path(out) as tmp:
        for kind in tries:
            try:
                _export_graph(model, size, tmp, opset, dynamo=kind == "dynamo")
                last = None
                break
            except Exception as e:  # noqa: BLE001 - exporter internals raise many types
                last = e
                log.warning("ONNX export with the %s exporter failed (%s: %s)%s", kind, e.__class__.__name__,
                            str(e).splitlines()[0][:200] if str(e) else "", "; trying the legacy exporter" if kind != tries[-1] else "")
        if last is not None:
            raise ModelError(f"ONNX export failed ({last.__class__.__name__}: {str(last).splitlines()[0][:200] if str(last) else ''})") from last
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.producer_name = "pneumoscan"
        onnx.save(proto, str(tmp))
        if check:
            onnx.checker.check_model(str(tmp))
            _verify(tmp, model, size)
    log.info("exported %s (%s, opset %d) to %s", meta["weight_name"], meta["model_name"], opset, out)
    return out


def _verify(path: Path, model: torch.nn.Module, size: int) -> None:
    """onnxruntime and PyTorch logits must agree on a random batch of 3."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime not installed: skipped the numerical check of the export")
        return
    import numpy as np
    import torch

    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].reshape(-1)
    with torch.inference_mode():
        ref = model(x).float().reshape(-1).numpy()
    err = float(np.max(np.abs(got - ref)))
    if not np.isfinite(err) or err > 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
        raise ModelError(f"the ONNX export does not reproduce PyTorch's logits (max difference {err:.2e})")
    log.debug("ONNX export verified: max |logit difference| %.2e", err)


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an exported file, read with onnxruntime (no onnx needed).

    Raises:
        ConfigError: onnxruntime is not installed.
        CheckpointError: missing file, not an ONNX model, or not exported by pneumoscan.
    """
    from .onnx_backend import open_session, session_metadata

    return session_metadata(open_session(path, 1))


def sha256_of_checkpoint(ckpt: dict[str, Any]) -> str:
    """The sha256 identifying a loaded checkpoint (stored, or hashed from its file)."""
    if ckpt.get("sha256"):
        return str(ckpt["sha256"])
    path = ckpt.get("_path")
    if path and Path(path).is_file():
        return sha256_file(path)
    return ""
