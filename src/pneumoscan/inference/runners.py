"""What runs the network: a *runner* maps a preprocessed batch to logits.

A :class:`~pneumoscan.inference.Predictor` does everything around the forward pass (decoding,
guard, preprocessing, TTA, calibration, threshold, Grad-CAM); a runner only does::

    runner.forward(batch)   # (B, 1, S, S) float32 in [0, 1] -> (B,) float32 logits

* :class:`TorchRunner` — the PyTorch model in fp32, or under bf16 autocast with channels_last
  tensors (backend ``torch-bf16``: CPUs with AVX512-BF16/AMX, and CUDA);
* :class:`OnnxRunner` — an onnxruntime CPU session on a file written by ``pneumoscan export``
  (backend ``onnx``) or by the int8 quantiser (``onnx-int8``), a batch split between a few
  concurrent forward passes ("lanes"). An export of a model with a pooled linear head also
  returns the Grad-CAM layer's output (``features``) and carries the head in its metadata
  (``pneumoscan.cam``): its :meth:`OnnxRunner.forward_features` is what PyTorch-free heat
  maps are made of (:mod:`pneumoscan.explain.cam_numpy`). An ensemble's export returns one
  such output per member (``features_0``, ``features_1``, ...) and lists their heads
  (:meth:`OnnxRunner.forward_feature_maps`).

:class:`TorchModelProvider` is the PyTorch model Grad-CAM needs otherwise, built on first use.
PyTorch is imported only inside functions: the ONNX runner never imports it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from ..errors import CheckpointError, ConfigError, ModelError
from ..explain.cam_numpy import LinearHead, heads_from_json
from ..models.bundle import BundleRef, ModelBundle, load_bundle

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: The backends a predictor can run on (``load_predictor(backend=...)`` also takes ``"auto"``).
BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")
#: ``metadata_props`` format key of files written by ``pneumoscan export``.
ONNX_FORMAT = "pneumoscan-onnx/1"
#: Metadata key holding the whole model description (``ModelBundle.info()`` as JSON).
BUNDLE_KEY = "pneumoscan.bundle"
#: Metadata key the int8 quantiser adds (its settings, as JSON).
QUANTIZATION_KEY = "pneumoscan.quantization"
#: Metadata key of the pooled linear head (:meth:`LinearHead.to_dict` as JSON) of an export
#: whose second output is the Grad-CAM layer's feature maps (an ensemble's export: a list, one
#: head per member, and one feature output per member: :func:`feature_output_names`).
CAM_KEY = "pneumoscan.cam"
#: Names of an export's input and outputs.
INPUT_NAME, LOGIT_NAME, FEATURES_NAME = "image", "logit", "features"
#: One line for every place that finds PyTorch missing.
NEED_TORCH_HEATMAPS = "heatmaps for this model need PyTorch: pip install 'pneumoscan[train]'"
#: Most concurrent forward passes ("lanes") one ONNX runner uses.
MAX_LANES = 4
#: Images per onnxruntime call within a batch (measured fastest on CPUs: docs/benchmarks.md).
LANE_BATCH = 2


def feature_output_names(n: int) -> list[str]:
    """The names of an export's feature outputs for ``n`` linear heads: ``features`` for one
    network, ``features_0`` .. ``features_<n-1>`` for an ensemble's members."""
    return [FEATURES_NAME] if n == 1 else [f"{FEATURES_NAME}_{i}" for i in range(n)]


class Runner(Protocol):
    """The forward pass of a predictor.

    Attributes:
        backend: one of :data:`BACKENDS`.
    """

    backend: str

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits ``(B,)`` float32 of a preprocessed ``(B, 1, S, S)`` float32 batch."""
        ...


# ----------------------------------------------------------------------------- PyTorch
def torch_available() -> bool:
    """Whether PyTorch is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken install, or ``sys.modules["torch"]`` without a spec
        return False


def prepare_model(model: nn.Module, device: str | torch.device = "cpu", channels_last: bool | None = None) -> tuple[nn.Module, bool]:
    """Make a model ready for inference: eval mode, no gradients, on ``device``, in
    channels-last memory format when asked (``None``: on CPUs, where oneDNN prefers it).

    Returns:
        ``(model, channels_last)``.
    """
    import torch

    dev = torch.device(device)
    model = model.eval().to(dev)
    cl = dev.type == "cpu" if channels_last is None else bool(channels_last)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cl


class TorchRunner:
    """A PyTorch model's forward pass, in fp32 or under bf16 autocast.

    Args:
        model: a registered model (``(B, 1, S, S)`` in [0, 1] → ``(B, 1)`` logits).
        device: torch device.
        bf16: run under ``torch.autocast(dtype=torch.bfloat16)`` (fp32 logits out); the model
            itself stays fp32, so Grad-CAM on it is unchanged.
        channels_last: channels-last tensors (faster oneDNN/cuDNN convolutions, same results
            up to float rounding); ``None``: on CPUs, and always with ``bf16``.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", bf16: bool = False, channels_last: bool | None = None) -> None:
        import torch

        self.device = torch.device(device)
        self.bf16 = bool(bf16)
        self.model, self.channels_last = prepare_model(model, self.device, True if self.bf16 and channels_last is None else channels_last)
        self.backend = "torch-bf16" if self.bf16 else "torch"

    def forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = self.model(x)
        return out.float().reshape(-1).cpu().numpy()


class TorchModelProvider:
    """The PyTorch model Grad-CAM uses, built on first use (once, even when service threads
    ask at the same time).

    Args:
        build: makes the model (``None``: there is none, e.g. a plain ONNX file).
        model: an already built model (a :class:`TorchRunner`'s), used as it is.
        device, channels_last: how a built model is placed (see :func:`prepare_model`).
    """

    def __init__(self, build: Callable[[], nn.Module] | None = None, *, model: nn.Module | None = None,
                 device: str | torch.device = "cpu", channels_last: bool | None = None) -> None:
        self._build = build
        self._model = model
        self._device = device
        self._channels_last = channels_last
        self._lock = threading.Lock()

    @classmethod
    def for_bundle(cls, bundle: ModelBundle, runner: Runner, *, device: str | torch.device = "cpu") -> "TorchModelProvider":
        """The model of a predictor: its :class:`TorchRunner`'s; else built from the bundle's
        weights; else, for a bundle described by a cached export (no weights, but the source
        file and its hash), loaded from that file, which must still hash the same."""
        if isinstance(runner, TorchRunner):
            return cls(model=runner.model)
        if bundle.state_dict is not None:
            return cls(bundle.build_model, device=device)
        if bundle.path is not None and bundle.sha256:
            ref = BundleRef(Path(bundle.path), bundle.sha256)
            return cls(lambda: load_bundle(ref).build_model(), device=device)
        return cls()

    @property
    def available(self) -> bool:
        """Whether there is (or can be: PyTorch installed and weights known) a PyTorch model."""
        return self._model is not None or (self._build is not None and torch_available())

    @property
    def loaded(self) -> bool:
        """Whether the model has been built."""
        return self._model is not None

    def get(self) -> nn.Module:
        """The model (built now if needed).

        Raises:
            ModelError: there is no PyTorch model, or PyTorch is not installed.
            CheckpointError: the source file cannot be loaded or changed since.
        """
        if self._model is None:
            with self._lock:
                if self._model is None:
                    if self._build is None and not torch_available():
                        raise ModelError(f"{NEED_TORCH_HEATMAPS}, and the model's .pt checkpoint (--checkpoint)")
                    if self._build is None:
                        raise ModelError("Grad-CAM needs the PyTorch model (this predictor has none; use --backend torch or --checkpoint)")
                    if not torch_available():
                        raise ModelError(NEED_TORCH_HEATMAPS)
                    log.info("loading the PyTorch model for Grad-CAM")
                    self._model = prepare_model(self._build(), self._device, self._channels_last)[0]
                    self._build = None
        return self._model


# ----------------------------------------------------------------------------- onnxruntime
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


def session_metadata(session: Any) -> dict[str, str]:
    """The ``metadata_props`` of an open session's model."""
    return dict(session.get_modelmeta().custom_metadata_map)


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """A :func:`cpu_session` on a file written by ``pneumoscan export`` (or the quantiser).

    Raises:
        ConfigError: onnxruntime is not installed.
        CheckpointError: missing file, not a loadable ONNX model, or not exported by pneumoscan.
    """
    sess = cpu_session(path, threads)
    if session_metadata(sess).get("pneumoscan.format") != ONNX_FORMAT:
        raise CheckpointError(f"{path}: not exported by pneumoscan (no {ONNX_FORMAT} metadata); use 'pneumoscan export'")
    return sess


class OnnxRunner:
    """An exported model's forward pass in onnxruntime.

    Args:
        session: an open session (its intra-op threads set by the caller).
        path: the ``.onnx`` file.
        lanes: concurrent forward passes a batch is split between.

    Attributes:
        metadata: the file's ``metadata_props``.
        backend: ``"onnx-int8"`` for a quantised file, else ``"onnx"``.
        linear_heads: the pooled linear heads when the (fp32) file also returns their
            layers' feature maps (one network: one; an ensemble: one per member), else ``()``.
        linear_head: the one pooled linear head of a single network's export, else ``None``.
    """

    def __init__(self, session: Any, path: str | Path, *, lanes: int = 1) -> None:
        self.session = session
        self.path = Path(path)
        self.lanes = max(1, int(lanes))
        self.input_name = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        self.logit_name = outputs[0]
        self.metadata = session_metadata(session)
        self.backend = "onnx-int8" if QUANTIZATION_KEY in self.metadata else "onnx"
        heads = _linear_heads(self.metadata, self.path) if self.backend == "onnx" else ()
        self.feature_names = feature_output_names(len(heads)) if heads else []
        if not set(self.feature_names) <= set(outputs):
            heads, self.feature_names = (), []
        self.linear_heads: tuple[LinearHead, ...] = heads
        self.linear_head = heads[0] if len(heads) == 1 else None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, path: str | Path, *, threads: int | None = None, lanes: int | None = None) -> "OnnxRunner":
        """A runner on a pneumoscan ONNX file, ``threads`` split into ``lanes``
        (see :func:`plan_threads`).

        Raises:
            ConfigError: onnxruntime is not installed.
            CheckpointError: missing file, not ONNX, or not exported by pneumoscan.
        """
        n, intra = plan_threads(threads, lanes)
        return cls(open_session(path, intra), path, lanes=n)

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.logit_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def _run_maps(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.session.run([self.logit_name, *self.feature_names], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32).reshape(-1), [np.asarray(f, dtype=np.float32) for f in out[1:]]

    def forward_feature_maps(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Raw logits ``(B,)`` and the ``(B, C, h, w)`` feature maps of each of
        :attr:`linear_heads` (the batch split between the lanes, as :meth:`forward`).

        Raises:
            ModelError: the file has no feature-map output.
        """
        if not self.linear_heads:
            raise ModelError(f"{self.path.name}: this ONNX file has no feature-map output")
        parts = self._in_lanes(self._run_maps, batch)
        return np.concatenate([z for z, _ in parts]), [np.concatenate([f[i] for _, f in parts]) for i in range(len(self.feature_names))]

    def forward_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits ``(B,)`` and the Grad-CAM layer's ``(B, C, h, w)`` feature maps of a
        preprocessed batch (:meth:`forward_feature_maps`) of a single network's export.

        Raises:
            ModelError: the file has no ``features`` output (or one per ensemble member).
        """
        if self.linear_head is None:
            raise ModelError(f"{self.path.name}: this ONNX file has no single feature-map output")
        logits, feats = self.forward_feature_maps(batch)
        return logits, feats[0]

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate(self._in_lanes(self._run, batch))

    def _in_lanes(self, fn: Callable[[np.ndarray], Any], batch: np.ndarray) -> list[Any]:
        """``fn`` of pieces of ``batch`` run concurrently in the lanes, in order (one call for one
        lane or one image)."""
        n = batch.shape[0]
        if self.lanes <= 1 or n <= 1:
            return [fn(batch)]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="pneumoscan-onnx")
        # small pieces: a convolution's working set of LANE_BATCH images stays in the core's cache
        parts = np.array_split(batch, max(min(self.lanes, n), -(-n // LANE_BATCH)))
        return list(self._pool.map(fn, parts))


def _linear_heads(meta: dict[str, str], path: Path) -> tuple[LinearHead, ...]:
    """The :data:`CAM_KEY` heads of a file's metadata; ``()`` (logged) when absent or malformed."""
    if CAM_KEY not in meta:
        return ()
    try:
        return tuple(heads_from_json(json.loads(meta[CAM_KEY])))
    except (ValueError, TypeError, AttributeError, ModelError) as e:
        log.warning("%s: ignoring malformed %s metadata (%s); heat maps will need PyTorch", path.name, CAM_KEY, e)
        return ()
