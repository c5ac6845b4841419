"""The onnxruntime backend (``pneumoscan predict --backend onnx``).

:class:`OnnxPredictor` is a :class:`~pneumoscan.inference.Predictor` whose forward pass runs
in onnxruntime; decoding, preprocessing, TTA, calibration, threshold and guard are shared, so
both backends give the same answers (within 1e-4 in probability).

Two ways to get one:

* ``OnnxPredictor.from_onnx("model.onnx")`` — a file from ``pneumoscan export``; everything
  (preprocessing, temperature, threshold, name) comes from its metadata, no PyTorch
  checkpoint needed (Grad-CAM is then unavailable);
* ``OnnxPredictor.from_checkpoint(ckpt)`` — exports the checkpoint to the cache on first use
  (``$PNEUMOSCAN_CACHE`` or ``~/.cache/pneumoscan``, ``onnx/<weight>-<sha256[:16]>.onnx``) and
  reuses that file afterwards; Grad-CAM uses the PyTorch model.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import Preprocessing
from ..errors import CheckpointError, ConfigError
from .onnx_export import export_onnx, read_onnx_metadata, sha256_of_checkpoint
from .predictor import Predictor, checkpoint_args

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where on-the-fly ONNX exports are kept: ``$PNEUMOSCAN_CACHE``, else
    ``$XDG_CACHE_HOME/pneumoscan``, else ``~/.cache/pneumoscan``."""
    env = os.environ.get("PNEUMOSCAN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pneumoscan"


class OnnxPredictor(Predictor):
    """A Predictor running an exported model with onnxruntime.

    Args:
        onnx_path: the ``.onnx`` file.
        preprocessing, threshold, temperature, name, metadata: as :class:`Predictor`.
        torch_model: the PyTorch model, if available (only used by Grad-CAM).
        threads: onnxruntime intra-op threads (default: torch's thread count).
        **kwargs: other :class:`Predictor` options (``batch_size``, ``tta``, ``guard``).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        preprocessing: Preprocessing,
        *,
        torch_model: torch.nn.Module | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ConfigError("the ONNX backend needs onnxruntime (pip install 'pneumoscan[onnx]')") from e
        super().__init__(torch_model, preprocessing, **kwargs)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError(f"{onnx_path}: not a loadable ONNX model ({str(e).splitlines()[0][:160] if str(e) else e})") from e
        self.onnx_path = Path(onnx_path)
        self.input_name = self.session.get_inputs()[0].name

    def _forward(self, chunk: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(chunk.detach().cpu().numpy(), dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32).reshape(-1)

    @classmethod
    def from_onnx(cls, path: str | Path, **kwargs: Any) -> "OnnxPredictor":
        """Load a file written by ``pneumoscan export`` (calibration from its metadata).

        Raises:
            CheckpointError: missing file, not ONNX, or not exported by pneumoscan.
        """
        meta = read_onnx_metadata(path)
        try:
            pre = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
            threshold = float(meta["threshold"])
            temperature = float(meta["temperature"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: malformed pneumoscan ONNX metadata ({e})") from e
        info: dict[str, Any] = {
            "model_name": meta.get("model_name"), "weight_name": meta.get("weight_name"),
            "file_sha256": meta.get("source_sha256") or None, "threshold_method": meta.get("threshold_method") or None,
            "onnx_file": str(path),
        }
        if meta.get("val_metrics"):
            try:
                info["val_metrics"] = json.loads(meta["val_metrics"])
            except ValueError:
                pass
        return cls(path, pre, threshold=threshold, temperature=temperature, name=meta.get("weight_name") or Path(path).stem,
                   metadata=info, **kwargs)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | str | Path, *, cache: str | Path | None = None, **kwargs: Any) -> "OnnxPredictor":
        """Export (once, into the cache) and load a checkpoint.

        Args:
            ckpt: checkpoint dict, ``.pt`` file or run directory.
            cache: cache folder (default :func:`cache_dir`).
            **kwargs: predictor options.
        """
        from ..training.checkpoint import load_checkpoint, model_from_checkpoint

        if not isinstance(ckpt, dict):
            ckpt = load_checkpoint(ckpt)
        args = checkpoint_args(ckpt)
        sha = sha256_of_checkpoint(ckpt) or "unhashed"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in args["name"])[:80]
        target = Path(cache or cache_dir()) / "onnx" / f"{safe}-{sha[:16]}.onnx"
        if sha == "unhashed" or not target.is_file() or _stale(target, sha):
            log.info("exporting %s to ONNX (%s)", args["name"], target)
            export_onnx(ckpt, target)
        else:
            log.debug("using cached ONNX export %s", target)
        model = model_from_checkpoint(ckpt)
        pre = args.pop("preprocessing")
        return cls(target, pre, torch_model=model, **args, **kwargs)


def _stale(path: Path, sha: str) -> bool:
    try:
        return read_onnx_metadata(path).get("source_sha256") != sha
    except Exception:  # noqa: BLE001 - an unreadable cache entry is re-exported
        return True
