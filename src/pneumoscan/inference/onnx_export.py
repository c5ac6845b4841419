"""Export a checkpoint to ONNX (``pneumoscan export``).

The graph takes ``image``: ``(batch, 1, S, S)`` float32 greyscale in [0, 1] (normalisation
and channel expansion are inside the model, as in PyTorch) and returns ``logit``:
``(batch, 1)``. For a model whose head is global average pooling and one linear unit (MobileNetV2,
the ResNets, EfficientNet-B0: :func:`pneumoscan.explain.gradcam.linear_head` decides) it also
returns ``features``: ``(batch, C, h, w)``, the Grad-CAM layer's output, and the head's weights
are stored as ``pneumoscan.cam``; Grad-CAM heat maps then need no PyTorch
(:mod:`pneumoscan.explain.cam_numpy`). An ensemble (:mod:`pneumoscan.models.ensemble`) is one
graph returning the mean logit; when every member has such a head it also returns
``features_0`` .. ``features_<n-1>``, one per member, and ``pneumoscan.cam`` lists the members'
heads (its map is the mean of theirs). The batch axis is dynamic. Everything else a predictor
needs is stored in the file's ``metadata_props``:

========================  ===========================================================
``pneumoscan.format``     ``pneumoscan-onnx/1``
``model_name``            registry name (``mobilenet_v2``, ...)
``weight_name``           the weights' name shown with predictions
``source_sha256``         sha256 of the checkpoint file it was exported from
``preprocessing``         JSON of :class:`~pneumoscan.data.preprocessing.Preprocessing`
``threshold``             operating threshold on calibrated probabilities
``temperature``           temperature scaling (probability = sigmoid(logit / T))
``threshold_method``      how the threshold was chosen
``class_names``           JSON list, index 1 = PNEUMONIA
``val_metrics``           JSON of the validation metrics at the threshold (if any)
``pneumoscan.bundle``     JSON of the whole model description (``ModelBundle.info()``),
                          read back by :func:`~pneumoscan.inference.onnx_cache.bundle_from_metadata`
                          (the keys above stay for files and tools that predate it)
``pneumoscan.cam``        JSON ``{"layer", "weight", "bias"}`` of the pooled linear head
                          (only with the ``features`` output; an ensemble: a list of them)
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
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError, ModelError
from ..models.bundle import ModelBundle, default_manifest, default_model_dir, load_bundle, record_default_onnx
from ..utils.io import atomic_path
from ..utils.version import __version__
from .runners import (
    BUNDLE_KEY, CAM_KEY, INPUT_NAME, LOGIT_NAME, ONNX_FORMAT, feature_output_names, open_session, session_metadata,
)

if TYPE_CHECKING:  # PyTorch is imported by the functions that export
    import torch

    from ..explain.cam_numpy import LinearHead

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ONNX_FORMAT", "export_default_onnx", "export_onnx", "onnx_metadata", "read_onnx_metadata"]

DEFAULT_OPSET = 18
MIN_OPSET = 17


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ConfigError("ONNX export needs onnx and onnxscript (pip install 'pneumoscan[onnx]')") from e
    return onnx


def onnx_metadata(bundle: ModelBundle, heads: Sequence[LinearHead] | None = None) -> dict[str, str]:
    """The ``metadata_props`` written for a model (all values are strings).

    Args:
        bundle: the model (its ``sha256`` becomes ``source_sha256``).
        heads: the pooled linear head(s), when the graph also returns feature maps (one
            network: one head and ``features``; an ensemble: one per member).
    """
    out = {
        "pneumoscan.format": ONNX_FORMAT,
        "pneumoscan.version": __version__,
        "model_name": bundle.arch,
        "weight_name": bundle.name,
        "source_sha256": bundle.sha256,
        "preprocessing": json.dumps(bundle.preprocessing.to_dict()),
        "threshold": repr(float(bundle.threshold)),
        "temperature": repr(float(bundle.temperature)),
        "threshold_method": str(bundle.threshold_method or ""),
        "class_names": json.dumps(list(bundle.class_names)),
        "input": f"{INPUT_NAME}: float32 (batch, 1, S, S) greyscale in [0, 1], stretched to S x S",
        "output": f"{LOGIT_NAME}: float32 (batch, 1); P(pneumonia) = sigmoid({LOGIT_NAME} / temperature)",
        BUNDLE_KEY: json.dumps(bundle.info()),
    }
    if bundle.val_metrics:
        out["val_metrics"] = json.dumps(bundle.val_metrics, default=float)
    if heads:
        names = feature_output_names(len(heads))
        out["output"] += "".join(f"; {n}: float32 (batch, C, h, w), the output of {h.layer}" for n, h in zip(names, heads))
        out["output"] += f"; Grad-CAM = relu(±weight · {names[0]}) with {CAM_KEY}'s weight"
        if len(heads) == 1:
            out[CAM_KEY] = json.dumps(heads[0].to_dict())
        else:
            out["output"] += " (one head per member, in order; the ensemble's map is the mean of the members' maps)"
            out[CAM_KEY] = json.dumps([h.to_dict() for h in heads])
    return out


def _logit_and_features(model: torch.nn.Module, layers: Sequence[str]) -> torch.nn.Module:
    """``model`` returning ``(logit, output of each layer...)`` (forward hooks keep the latter)."""
    from torch import nn

    modules = dict(model.named_modules())
    targets = [modules[name] for name in layers]

    class LogitAndFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.kept: dict[int, torch.Tensor] = {}
            self.hooks = [t.register_forward_hook(self._keeper(i)) for i, t in enumerate(targets)]

        def _keeper(self, i: int) -> Any:
            return lambda _m, _i, out: self.kept.__setitem__(i, out)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            self.kept.clear()
            logit = self.model(x)
            return (logit, *(self.kept[i] for i in range(len(targets))))

    return LogitAndFeatures()


def _export_graph(model: torch.nn.Module, size: int, path: Path, opset: int, dynamo: bool, outputs: list[str]) -> None:
    import torch

    x = torch.rand(2, 1, size, size)
    common = {"input_names": [INPUT_NAME], "output_names": outputs, "opset_version": opset}
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
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)}, **common,
            )


def export_onnx(
    checkpoint: str | Path | ModelBundle | None,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    check: bool = True,
    features: bool = True,
) -> Path:
    """Export a checkpoint to an ONNX file with its calibration in the metadata.

    Args:
        checkpoint: ``.pt`` file, run directory, loaded bundle, or ``None`` for the shipped
            default model.
        out: destination ``.onnx`` (written atomically).
        opset: ONNX opset (at least 17).
        exporter: ``"dynamo"`` (``torch.export``), ``"legacy"`` (TorchScript) or ``"auto"``
            (dynamo, falling back to legacy if it fails).
        check: run ``onnx.checker`` and compare onnxruntime's logits (and feature maps) with
            PyTorch's on a random batch (when onnxruntime is installed).
        features: for a model with a pooled linear head, also return the Grad-CAM layer's
            feature maps and store the head (PyTorch-free heat maps; an ensemble: when every
            member has one, each member's); ``False``: the logit only.

    Returns:
        The written path.

    Raises:
        CheckpointError: unreadable checkpoint.
        ConfigError: onnx missing, bad opset or exporter name.
        ModelError: the export failed.
    """
    import torch  # noqa: F401 - the export runs the PyTorch model: without it, say that first

    onnx = _require_onnx()
    if opset < MIN_OPSET:
        raise ConfigError(f"opset must be >= {MIN_OPSET} (got {opset})")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ConfigError(f"exporter must be auto, dynamo or legacy (got '{exporter}')")
    bundle = checkpoint if isinstance(checkpoint, ModelBundle) else load_bundle(checkpoint)
    model = bundle.build_model()
    for p in model.parameters():
        p.requires_grad_(False)
    size = bundle.input_size
    heads = None
    if features:
        from ..explain.gradcam import linear_heads

        heads = linear_heads(model, size)
    graph = _logit_and_features(model, [h.layer for h in heads]) if heads else model
    outputs = [LOGIT_NAME, *feature_output_names(len(heads))] if heads else [LOGIT_NAME]
    meta = onnx_metadata(bundle, heads)
    out = Path(out)
    tries = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    last: Exception | None = None
    with atomic_path(out) as tmp:
        for kind in tries:
            try:
                _export_graph(graph, size, tmp, opset, dynamo=kind == "dynamo", outputs=outputs)
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
            _verify(tmp, graph, size, outputs)
    for hook in getattr(graph, "hooks", ()):
        hook.remove()
    log.info("exported %s (%s, opset %d%s) to %s", meta["weight_name"], meta["model_name"], opset,
             f", feature maps of {', '.join(h.layer for h in heads)}" if heads else "", out)
    return out


def _verify(path: Path, model: torch.nn.Module, size: int, outputs: Sequence[str]) -> None:
    """onnxruntime and PyTorch outputs (logits, and feature maps if any) must agree on a
    random batch of 3."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime not installed: skipped the numerical check of the export")
        return
    import numpy as np
    import torch

    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        ref = model(x)
    refs = [t.float().numpy() for t in (ref if isinstance(ref, tuple) else (ref,))]
    if len(got) != len(refs):
        raise ModelError(f"the ONNX export has {len(got)} outputs, PyTorch {len(refs)}")
    for name, g, r in zip(outputs, got, refs):
        err = float(np.max(np.abs(np.asarray(g).reshape(-1) - r.reshape(-1))))
        if not np.isfinite(err) or err > 1e-3 * max(1.0, float(np.max(np.abs(r)))):
            raise ModelError(f"the ONNX export does not reproduce PyTorch's {name} (max difference {err:.2e})")
        log.debug("ONNX export verified: max |%s difference| %.2e", name, err)


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an exported file, read with onnxruntime (no onnx needed).

    Raises:
        ConfigError: onnxruntime is not installed.
        CheckpointError: missing file, not an ONNX model, or not exported by pneumoscan.
    """
    return session_metadata(open_session(path, 1))


def export_default_onnx(dest_dir: str | Path | None = None) -> Path:
    """Export the shipped default model (in ``dest_dir``, default the installed package's
    ``assets/default``) to ``<name>.onnx`` beside it and record the file and its sha256 in its
    manifest (``onnx_file``, ``onnx_sha256``): what a PyTorch-free install runs.

    Args:
        dest_dir: the folder holding ``default.json`` and the ``.pt`` file.

    Returns:
        The written ONNX file.

    Raises:
        CheckpointError: the default model is missing or fails its checksum.
        ConfigError, ModelError: see :func:`export_onnx`.
    """
    folder = Path(dest_dir) if dest_dir is not None else default_model_dir()
    man = default_manifest(folder)
    bundle = load_bundle(folder / str(man["file"]))
    if bundle.sha256 != man["sha256"]:
        raise ModelError(f"{bundle.path}: sha256 {bundle.sha256[:12]}… does not match its manifest ({str(man['sha256'])[:12]}…)")
    bundle.name = str(man.get("name") or bundle.name)
    out = export_onnx(bundle, folder / f"{Path(str(man['file'])).stem}.onnx")
    record_default_onnx(out)
    return out
