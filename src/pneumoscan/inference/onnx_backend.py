"""The onnxruntime backend (``pneumoscan predict --backend onnx``, and ``auto`` when
onnxruntime is installed).

:class:`OnnxPredictor` is a :class:`~pneumoscan.inference.Predictor` whose forward pass runs
in onnxruntime; decoding, preprocessing, TTA, calibration, threshold and guard are shared, so
both backends give the same answers (within 1e-4 in probability).

Three ways to get one:

* ``OnnxPredictor.from_onnx("model.onnx")`` — a file from ``pneumoscan export``; everything
  (preprocessing, temperature, threshold, name) comes from its metadata, no PyTorch
  checkpoint needed (Grad-CAM is then unavailable);
* ``OnnxPredictor.from_checkpoint(ckpt)`` — exports the checkpoint to the cache on first use
  (``$PNEUMOSCAN_CACHE`` or ``~/.cache/pneumoscan``, ``onnx/<weight>-<sha256[:16]>.onnx``) and
  reuses that file afterwards; Grad-CAM uses the PyTorch model;
* :func:`cached_predictor` — the cached export of a checkpoint file (or of the shipped default
  model), found by the file's sha256 **without importing PyTorch**: this is what makes
  ``pneumoscan predict`` start in a fraction of a second. The PyTorch model is loaded only if
  Grad-CAM is asked for.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..data.preprocessing import Preprocessing
from ..errors import CheckpointError, ConfigError, ModelError
from ..utils.io import sha256_file
from .onnx_export import ONNX_FORMAT, export_onnx, sha256_of_checkpoint
from .predictor import Predictor, checkpoint_args

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where on-the-fly ONNX exports are kept: ``$PNEUMOSCAN_CACHE``, else
    ``$XDG_CACHE_HOME/pneumoscan``, else ``~/.cache/pneumoscan``."""
    env = os.environ.get("PNEUMOSCAN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pneumoscan"


#: Most concurrent forward passes ("lanes") one predictor runs (see :class:`OnnxPredictor`).
MAX_LANES = 4
#: Images per onnxruntime call within a batch (measured fastest on CPUs: docs/benchmarks.md).
LANE_BATCH = 2


def default_threads() -> int:
    """onnxruntime intra-op threads: ``$OMP_NUM_THREADS`` if set, else the CPUs this process
    may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_threads(threads: int | None = None, lanes: int | None = None) -> tuple[int, int]:
    """Split ``threads`` CPU threads into concurrent forward passes ("lanes") of a few
    intra-op threads each: small CNNs use cores better batch-parallel than op-parallel.

    Returns:
        ``(lanes, intra_op_threads)``; by default one lane per thread, at most
        :data:`MAX_LANES`.
    """
    threads = max(1, int(threads or default_threads()))
    lanes = max(1, min(int(lanes), threads)) if lanes else min(threads, MAX_LANES)
    return lanes, max(1, threads // lanes)


def cpu_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on any ONNX file (all graph optimisations, ``threads``
    intra-op threads, idle threads not spinning).

    Raises:
        ConfigError: onnxruntime is not installed.
        CheckpointError: missing file or not a loadable ONNX model.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("the ONNX backend needs onnxruntime (pip install 'pneumoscan[onnx]')") from e
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"ONNX file not found: {p}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or default_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.environ.get("PNEUMOSCAN_ORT_SPIN", "0") == "0":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CheckpointError(f"{p}: not a loadable ONNX model ({str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__})") from e


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """A :func:`cpu_session` on a file written by ``pneumoscan export``.

    Raises:
        ConfigError: onnxruntime is not installed.
        CheckpointError: missing file, not a loadable ONNX model, or not exported by pneumoscan.
    """
    sess = cpu_session(path, threads)
    if session_metadata(sess).get("pneumoscan.format") != ONNX_FORMAT:
        raise CheckpointError(f"{path}: not exported by pneumoscan (no {ONNX_FORMAT} metadata); use 'pneumoscan export'")
    return sess


def open_export_of(path: str | Path, sha: str, threads: int | None = None) -> Any:
    """A session on ``path`` if it is a pneumoscan export of the checkpoint whose file hashes to
    ``sha``; ``None`` when it is not (another checkpoint, unreadable, not a pneumoscan file)."""
    try:
        sess = open_session(path, threads)
    except CheckpointError as e:
        log.debug("ignoring %s (%s)", path, e)
        return None
    return sess if session_metadata(sess).get("source_sha256") == sha else None


def session_metadata(session: Any) -> dict[str, str]:
    """The ``metadata_props`` of an open session's model."""
    return dict(session.get_modelmeta().custom_metadata_map)


class OnnxPredictor(Predictor):
    """A Predictor running an exported model with onnxruntime.

    Args:
        onnx_path: the ``.onnx`` file.
        preprocessing, threshold, temperature, name, metadata: as :class:`Predictor`.
        torch_model: the PyTorch model, if available (only used by Grad-CAM).
        torch_model_loader: builds the PyTorch model when Grad-CAM first needs it.
        threads: onnxruntime intra-op threads (default :func:`default_threads`).
        lanes: concurrent forward passes, each on its share of ``threads`` (default
            :func:`plan_threads`); a batch is split between them.
        session: an already open onnxruntime session on ``onnx_path`` (its intra-op threads
            set by the caller; ``lanes`` then defaults to 1).
        **kwargs: other :class:`Predictor` options (``batch_size``, ``tta``, ``guard``,
            ``device`` and ``channels_last`` of the PyTorch model).
    """

    backend = "onnx"

    def __init__(
        self,
        onnx_path: str | Path,
        preprocessing: Preprocessing,
        *,
        torch_model: nn.Module | None = None,
        torch_model_loader: Callable[[], nn.Module] | None = None,
        threads: int | None = None,
        lanes: int | None = None,
        session: Any = None,
        **kwargs: Any,
    ) -> None:
        self._torch_model: nn.Module | None = None
        self._torch_model_loader = torch_model_loader
        self._model_lock = threading.Lock()
        self._model_options = {k: kwargs.pop(k) for k in ("device", "channels_last") if k in kwargs}
        super().__init__(torch_model, preprocessing, **kwargs, **self._model_options)
        if session is None:
            self.lanes, intra = plan_threads(threads, lanes)
            session = open_session(onnx_path, intra)
        else:  # opened by the caller with plan_threads' intra-op share
            self.lanes = max(1, int(lanes or 1))
        self.session = session
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.onnx_path = Path(onnx_path)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def model(self) -> nn.Module | None:  # type: ignore[override]
        """The PyTorch model (used only by Grad-CAM): loaded on first use when this predictor
        came from a cached export, ``None`` for a plain ONNX file."""
        if self._torch_model is None and self._torch_model_loader is not None:
            with self._model_lock:  # service threads may ask at once: load once
                if self._torch_model is None and self._torch_model_loader is not None:
                    log.info("loading the PyTorch model of %s for Grad-CAM", self.name)
                    self._set_model(self._torch_model_loader(), **self._model_options)
                    self._torch_model_loader = None
        return self._torch_model

    @model.setter
    def model(self, value: nn.Module | None) -> None:
        self._torch_model = value

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0], dtype=np.float32).reshape(-1)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        n = chunk.shape[0]
        if self.lanes <= 1 or n <= 1:
            return self._run(chunk)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="pneumoscan-onnx")
        # small pieces: a convolution's working set of LANE_BATCH images stays in the core's cache
        parts = np.array_split(chunk, max(min(self.lanes, n), -(-n // LANE_BATCH)))
        return np.concatenate(list(self._pool.map(self._run, parts)))

    @classmethod
    def from_onnx(cls, path: str | Path, *, threads: int | None = None, lanes: int | None = None, **kwargs: Any) -> "OnnxPredictor":
        """Load a file written by ``pneumoscan export`` (calibration from its metadata).

        Raises:
            CheckpointError: missing file, not ONNX, or not exported by pneumoscan.
        """
        lanes, intra = plan_threads(threads, lanes)
        return cls._from_session(path, open_session(path, intra), lanes=lanes, **kwargs)

    @classmethod
    def _from_session(cls, path: str | Path, sess: Any, **kwargs: Any) -> "OnnxPredictor":
        """A predictor on an open session of a pneumoscan export (calibration from its metadata)."""
        meta = session_metadata(sess)
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
        for key in ("val_metrics", "class_names"):
            if meta.get(key):
                with contextlib.suppress(ValueError):
                    info[key] = json.loads(meta[key])
        return cls(path, pre, threshold=threshold, temperature=temperature, name=meta.get("weight_name") or Path(path).stem,
                   metadata=info, session=sess, **kwargs)

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
        target = export_dir(cache) / f"{safe}-{sha[:16]}.onnx"
        lanes, intra = plan_threads(kwargs.pop("threads", None), kwargs.pop("lanes", None))
        sess = open_export_of(target, sha, intra) if sha != "unhashed" and target.is_file() else None
        if sess is None:
            log.info("exporting %s to ONNX (%s)", args["name"], target)
            export_onnx(ckpt, target)
            sess = open_session(target, intra)
        else:
            log.debug("using cached ONNX export %s", target)
        model = model_from_checkpoint(ckpt)
        pre = args.pop("preprocessing")
        return cls(target, pre, torch_model=model, session=sess, lanes=lanes, **args, **kwargs)


def export_dir(cache: str | Path | None = None) -> Path:
    """The folder of cached ONNX exports (``<cache>/onnx``)."""
    return Path(cache or cache_dir()) / "onnx"


def resolve_checkpoint_file(checkpoint: str | Path | None) -> tuple[Path, str]:
    """The checkpoint file and its sha256, without loading it: a run directory means its
    ``best.pt``, ``None`` the shipped default model (verified against its manifest).

    Raises:
        CheckpointError: missing file, or the default model fails its checksum.
    """
    if checkpoint is None:
        from .default_model import default_checkpoint_path, default_manifest

        path = default_checkpoint_path()  # verifies the shipped file's sha256
        return path, str(default_manifest()["sha256"])
    p = Path(checkpoint)
    if p.is_dir():
        p = p / "best.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p, sha256_file(p)


def checkpoint_file_sha256(checkpoint: str | Path | None) -> str:
    """The sha256 identifying a checkpoint file (see :func:`resolve_checkpoint_file`)."""
    return resolve_checkpoint_file(checkpoint)[1]


def cached_predictor(checkpoint: str | Path | None, *, cache: str | Path | None = None, **kwargs: Any) -> OnnxPredictor | None:
    """An :class:`OnnxPredictor` on the cached export of ``checkpoint``, or ``None`` when there
    is none yet (or onnxruntime is missing). Imports no PyTorch: the export is found by the
    checkpoint file's sha256 and must carry that hash as its ``source_sha256``. The PyTorch
    model is loaded (and checked against the same hash) only if Grad-CAM is used.

    Args:
        checkpoint: ``.pt`` file, run directory, or ``None`` for the default model.
        cache: cache folder (default :func:`cache_dir`).
        **kwargs: predictor options (``batch_size``, ``tta``, ``guard``, ``threads``, ...).

    Raises:
        CheckpointError: missing checkpoint file, or the default model fails its checksum.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    path, sha = resolve_checkpoint_file(checkpoint)
    lanes, intra = plan_threads(kwargs.pop("threads", None), kwargs.pop("lanes", None))
    for f in sorted(export_dir(cache).glob(f"*-{sha[:16]}.onnx")):
        sess = open_export_of(f, sha, intra)
        if sess is None:
            continue
        pred = OnnxPredictor._from_session(f, sess, lanes=lanes, **kwargs)
        pred._torch_model_loader = _model_loader(checkpoint, sha)
        # the metadata a predictor built from the checkpoint itself has (model card lookup, ...)
        pred.metadata["_path"] = str(path)
        if checkpoint is None:
            pred.metadata["sha256"] = sha
        log.debug("using cached ONNX export %s", f)
        return pred
    return None


def _model_loader(checkpoint: str | Path | None, sha: str) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        from ..training.checkpoint import model_from_checkpoint
        from .predictor import _load_ckpt

        ckpt = _load_ckpt(checkpoint)
        if sha256_of_checkpoint(ckpt) != sha:
            raise ModelError(f"{checkpoint or 'the default model'} changed since its ONNX export was loaded; run again")
        return model_from_checkpoint(ckpt)

    return load
