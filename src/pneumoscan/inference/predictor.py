"""The one prediction path: checkpoint → model + preprocessing + temperature + threshold.

``predict``, ``evaluate``, the web service and the ONNX export all go through
:class:`Predictor`, so every path applies the same preprocessing, calibration and operating
point.

Python API (what the CLI and the service use)::

    from pneumoscan.inference import load_predictor

    p = load_predictor("runs/x/best.pt", guard=True)       # None → the shipped default model
    pred = p.predict_image("chest.dcm")                    # Prediction (probability, label, ...)
    pred.refused                                           # reason, if not a chest X-ray
    for pred in p.predict_paths(paths, heatmap=True): ...  # input order, per-file errors
    cam = p.explain("chest.jpeg")                          # Grad-CAM at the original resolution
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..data.io import ImageSource, read_image, read_image_with_meta
from ..data.preprocessing import Preprocessing, preprocess_arrays
from ..errors import ImageReadError, ModelError, PneumoscanError
from ..core.calibration import sigmoid
from .tta import check_mode, make_views, merge_views

if TYPE_CHECKING:  # PyTorch is imported only where a PyTorch model is used
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
#: With the guard on, images are decoded at least this large (its features were fitted so).
GUARD_READ_SIDE = 224


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
        heatmap: Grad-CAM map in [0, 1] at the resolution of the decoded image (not
            serialised).
        extra: additional fields (``weights``: the weights' sha256 prefix, ``guard_score``,
            ``heatmap_file``, ...), merged into :meth:`to_dict`.
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

    @property
    def status(self) -> str:
        """``"ok"``, ``"refused"`` or ``"error"``."""
        return "error" if self.error is not None else "refused" if self.refused is not None else "ok"

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

    Decoding, preprocessing (NumPy/Pillow), test-time augmentation, the guard, calibration
    and the threshold live here and are shared by every backend; a backend only supplies
    :meth:`_forward` (this class runs a PyTorch model, :class:`~pneumoscan.inference.
    onnx_backend.OnnxPredictor` onnxruntime). PyTorch is imported only when there is a
    PyTorch model.

    Args:
        model: a registered model (``(B,1,S,S)`` in [0,1] → ``(B,1)`` logits).
        preprocessing: its preprocessing.
        threshold: operating threshold on calibrated probabilities.
        temperature: temperature-scaling factor (logit / T).
        name: weight name shown with every prediction.
        metadata: checkpoint metadata (model name, metrics, sha256, ...).
        device: torch device (of the PyTorch model).
        batch_size: images per forward pass.
        tta: test-time augmentation: ``"none"``, ``"flip"`` (``True``) or ``"crops"``
            (see :mod:`pneumoscan.inference.tta`).
        guard: the not-a-chest-X-ray guard used by default: ``None``/``False`` (off),
            ``True`` (the shipped guard) or a :class:`pneumoscan.guard.Guard`. Per-call
            ``guard=`` arguments override it.
        channels_last: store the model in channels-last memory format (faster convolutions
            with oneDNN; same results up to float rounding). ``None``: on CPUs.
    """

    #: What runs the network: ``"torch"`` here, ``"onnx"`` for the onnxruntime backend.
    backend = "torch"

    def __init__(
        self,
        model: nn.Module | None,
        preprocessing: Preprocessing,
        *,
        threshold: float = 0.5,
        temperature: float = 1.0,
        name: str = "model",
        metadata: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        tta: str | bool = "none",
        guard: Any = None,
        channels_last: bool | None = None,
    ) -> None:
        self.device: Any = str(device)
        self.channels_last = False
        self.model: nn.Module | None = None
        if model is not None:
            self._set_model(model, device, channels_last)
        self.preprocessing = preprocessing
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.name = name
        self.metadata = metadata or {}
        self.batch_size = max(1, int(batch_size))
        self.tta = check_mode(tta)
        self.guard = _resolve_guard(guard)
        self.read_workers = min(4, os.cpu_count() or 1)

    def _set_model(self, model: nn.Module, device: Any = "cpu", channels_last: bool | None = None) -> None:
        """Install the PyTorch model (eval mode, no gradients, on ``device``)."""
        import torch

        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.channels_last = (self.device.type == "cpu") if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | str | Path, **kwargs: Any) -> "Predictor":
        """Build from a checkpoint dict or file/run directory.

        Args:
            ckpt: checkpoint dict (from :func:`~pneumoscan.training.checkpoint.load_checkpoint`)
                or a ``.pt`` file / run directory.
            **kwargs: constructor options (``batch_size``, ``tta``, ``guard``, ``device``).
        """
        from ..training.checkpoint import load_checkpoint, model_from_checkpoint

        if not isinstance(ckpt, dict):
            ckpt = load_checkpoint(ckpt)
        model = model_from_checkpoint(ckpt)
        args = checkpoint_args(ckpt)
        return cls(model, args.pop("preprocessing"), **args, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def weights_id(self) -> str:
        """Short id of the weights: the first 12 hex digits of the checkpoint file's sha256."""
        return str(self.metadata.get("sha256") or self.metadata.get("file_sha256") or "")[:12]

    @property
    def logit_threshold(self) -> float:
        """The raw logit at which the label turns PNEUMONIA."""
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return self.temperature * math.log(t / (1 - t))

    # ------------------------------------------------------------------ core
    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Greyscale [0,1] arrays → ``(B,1,S,S)`` float32 model input."""
        return preprocess_arrays(list(images), self.input_size)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        """Raw logits of at most ``batch_size`` preprocessed images (backends override this)."""
        if self.model is None:
            raise ModelError("this predictor has no PyTorch model")
        import torch

        x = self._as_tensor(chunk)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(x).float().reshape(-1).cpu().numpy()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits of a preprocessed batch (averaged over the TTA views, if any)."""
        views = make_views(batch, self.tta)
        out = [self._forward(views[i : i + self.batch_size]) for i in range(0, views.shape[0], self.batch_size)]
        raw = np.concatenate(out).astype(np.float64) if out else np.zeros(0, np.float64)
        return merge_views(raw, self.tta)

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``sigmoid(logit / T)``."""
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated pneumonia probabilities of greyscale [0,1] arrays."""
        if not len(images):
            return np.zeros(0)
        return self.calibrate(self.logits(self.preprocess(images)))

    def label_of(self, probability: float) -> str:
        return CLASS_NAMES[int(probability >= self.threshold)]

    def _answer(self, name: str | None, prob: float) -> Prediction:
        extra = {"weights": self.weights_id} if self.weights_id else {}
        return Prediction(name, float(prob), self.label_of(prob), self.threshold, self.name, extra=extra)

    def _failed(self, name: str | None, error: str) -> Prediction:
        return Prediction(name, None, None, self.threshold, self.name, error=error)

    def _refused(self, name: str | None, reason: str, score: float) -> Prediction:
        extra: dict[str, Any] = {"guard_score": round(float(score), 4)}
        if self.weights_id:
            extra["weights"] = self.weights_id
        return Prediction(name, None, None, self.threshold, self.name, refused=reason, extra=extra)

    def _read_side(self, guard: Any) -> int:
        """Smallest side large JPEGs are decoded at (draft mode)."""
        return max(self.input_size, GUARD_READ_SIDE) if guard is not None else self.input_size

    def _guard_for(self, guard: Any) -> Any:
        """The guard a call uses: its ``guard=`` argument, else the predictor's."""
        if guard is None:
            return self.guard
        return _resolve_guard(guard)

    # ------------------------------------------------------------------ predictions
    def predict_arrays(
        self,
        images: Sequence[np.ndarray],
        names: Sequence[str | None] | None = None,
        *,
        metas: Sequence[dict[str, Any] | None] | None = None,
        guard: Any = None,
        heatmap: bool = False,
        layer: str | None = None,
        checks: Sequence[Any] | None = None,
        inputs: Sequence[np.ndarray | None] | None = None,
    ) -> list[Prediction]:
        """Predictions for already-decoded greyscale [0,1] arrays.

        Args:
            images: 2-D float arrays in [0, 1].
            names: a name per image (``Prediction.path``).
            metas: the reader's metadata per image (from ``read_image_with_meta``): lets the
                guard see DICOM modality, colour and original size.
            guard: ``None`` (the predictor's setting), ``True``/``False`` or a Guard.
            heatmap: also compute Grad-CAM maps (``Prediction.heatmap``, at each array's
                resolution) for the images that were predicted.
            layer: Grad-CAM target layer (default: the model's).
            checks: the guard's results for these images, already computed (as
                :meth:`predict_paths` does in its reader threads); ``None`` entries, or
                ``checks=None``, are checked here.
            inputs: the images already preprocessed (``(1, S, S)`` each, by
                :meth:`preprocess`), as :meth:`predict_paths`' reader threads do; used when
                every predicted image has one.
        """
        names = list(names) if names is not None else [None] * len(images)
        metas = list(metas) if metas is not None else [None] * len(images)
        g = self._guard_for(guard)
        out: list[Prediction | None] = [None] * len(images)
        keep: list[int] = []
        scores: dict[int, float] = {}
        for i, img in enumerate(images):
            if g is not None:
                res = checks[i] if checks is not None and checks[i] is not None else g.check(img, metas[i])
                if not res.ok:
                    out[i] = self._refused(names[i], res.reason or "not a chest X-ray", res.score)
                    continue
                scores[i] = res.score
            keep.append(i)
        if keep:
            if inputs is not None and all(inputs[i] is not None for i in keep):
                batch = np.stack([inputs[i] for i in keep])  # type: ignore[misc]
            else:
                batch = self.preprocess([images[i] for i in keep])
            probs = self.calibrate(self.logits(batch))
            cams = self.explain_arrays([images[i] for i in keep], layer=layer) if heatmap else [None] * len(keep)
            for i, p, cam in zip(keep, probs, cams):
                pred = self._answer(names[i], p)
                if i in scores:
                    pred.extra["guard_score"] = round(scores[i], 4)
                pred.heatmap = cam
                out[i] = pred
        return [p for p in out if p is not None]

    def predict_image(
        self, source: ImageSource, name: str | None = None, *, guard: Any = None, heatmap: bool = False, layer: str | None = None
    ) -> Prediction:
        """Read one image (path, bytes or stream) and predict it.

        Args:
            source: a path, raw bytes or a binary stream (JPEG, PNG, DICOM, ...).
            name: the name used in the answer and in error messages.
            guard: ``True`` to refuse inputs that are not chest X-rays (``Prediction.refused``
                is then set and ``probability`` is ``None``); ``None`` uses the predictor's
                setting.
            heatmap: also compute the Grad-CAM map (``Prediction.heatmap``).
            layer: Grad-CAM target layer.

        Raises:
            ImageReadError: the input cannot be read as an image.
        """
        nm = name or (str(source) if isinstance(source, (str, Path)) else None)
        arr, meta = read_image_with_meta(source, max_side=self._read_side(self._guard_for(guard)), name=name)
        return self.predict_arrays([arr], [nm], metas=[meta], guard=guard, heatmap=heatmap, layer=layer)[0]

    def predict_paths(
        self,
        paths: Iterable[str | Path],
        *,
        guard: Any = None,
        heatmap: bool = False,
        layer: str | None = None,
        on_heatmap: Callable[[Prediction], None] | None = None,
    ) -> Iterator[Prediction]:
        """Predict many files in batches, yielding one Prediction per path **in input
        order**. A file that cannot be read yields a Prediction with ``error`` set (and a
        refused one ``refused``) while the others are still predicted.

        Files are decoded, checked by the guard and preprocessed in a few threads ahead of
        the model (JPEGs at reduced size), so all of that overlaps the forward passes.

        Args:
            paths: image files.
            guard: the not-a-chest-X-ray guard (``None``: the predictor's setting).
            heatmap: compute Grad-CAM maps of the predicted images.
            layer: Grad-CAM target layer.
            on_heatmap: called with each predicted Prediction (with its heatmap) before it
                is yielded, e.g. to save an overlay; the map is then dropped to save memory.
        """
        g = self._guard_for(guard)
        side = self._read_side(g)

        def load(p: str) -> tuple[np.ndarray | None, dict[str, Any] | None, str | None, Any, np.ndarray | None]:
            try:
                arr, meta = read_image_with_meta(p, max_side=side)
            except PneumoscanError as e:
                return None, None, _reason(e), None, None
            except MemoryError:
                return None, None, "image too large to decode in memory", None, None
            check = g.check(arr, meta) if g is not None else None
            x = self.preprocess([arr])[0] if check is None or check.ok else None
            return arr, meta, None, check, x

        pending: list[tuple[str, np.ndarray | None, dict[str, Any] | None, str | None, Any, np.ndarray | None]] = []

        def flush() -> list[Prediction]:
            ok = [(n, a, m, c, x) for n, a, m, e, c, x in pending if e is None]
            preds = iter(self.predict_arrays([a for _, a, _, _, _ in ok], [n for n, _, _, _, _ in ok], metas=[m for _, _, m, _, _ in ok],
                                             guard=g if g is not None else False, heatmap=heatmap, layer=layer,
                                             checks=[c for _, _, _, c, _ in ok], inputs=[x for _, _, _, _, x in ok])) if ok else iter(())
            out = []
            for n, a, m, e, _, _ in pending:
                if e is not None:
                    out.append(self._failed(n, e))
                    continue
                pred = next(preds)
                if heatmap and on_heatmap is not None and pred.heatmap is not None:
                    on_heatmap(pred)
                    pred.heatmap = None
                out.append(pred)
            pending.clear()
            return out

        n_ok = 0
        for name, (arr, meta, err, check, x) in _ordered_map(load, (str(p) for p in paths), self.read_workers, 2 * self.batch_size):
            pending.append((name, arr, meta, err, check, x))
            n_ok += err is None
            if n_ok >= self.batch_size:
                yield from flush()
                n_ok = 0
        if pending:
            yield from flush()

    # ------------------------------------------------------------------ explanations
    def _as_tensor(self, batch: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)

    def gradcam(self, layer: str | None = None, target: str = "predicted") -> Any:
        """A :class:`pneumoscan.explain.GradCAM` on this predictor's model (explaining the
        predicted class at this predictor's operating point by default)."""
        from ..explain import GradCAM

        if self.model is None:
            raise ModelError("Grad-CAM needs the PyTorch model (this predictor has none; use --backend torch)")
        return GradCAM(self.model, layer, target=target, logit_threshold=self.logit_threshold)

    def explain_arrays(self, images: Sequence[np.ndarray], *, layer: str | None = None, target: str = "predicted") -> list[np.ndarray]:
        """Grad-CAM maps in [0, 1] of decoded images, each at its array's resolution.

        Args:
            images: 2-D float greyscale arrays in [0, 1].
            layer: target layer (``named_modules`` name; default: the model's
                ``gradcam_layer``).
            target: ``"predicted"`` class (default), ``"pneumonia"`` or ``"normal"``.
        """
        from ..explain import resize_map

        if not len(images):
            return []
        cam = self.gradcam(layer, target)
        maps: list[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            chunk = list(images[i : i + self.batch_size])
            m = cam(self._as_tensor(self.preprocess(chunk))).cpu().numpy()[:, 0]
            maps += [resize_map(m[k], im.shape[0], im.shape[1]) for k, im in enumerate(chunk)]
        return maps

    def explain(self, image: np.ndarray | ImageSource, *, layer: str | None = None, name: str | None = None, target: str = "predicted") -> np.ndarray:
        """The Grad-CAM map of one image, in [0, 1].

        Args:
            image: a decoded 2-D array (the map has its resolution) or a path/bytes/stream
                (read at full resolution: the map has the image's original resolution).
            layer: target layer (default: the model's ``gradcam_layer``).
            name: name for error messages when ``image`` is bytes or a stream.
            target: ``"predicted"`` class (default), ``"pneumonia"`` or ``"normal"``.

        Raises:
            ImageReadError: ``image`` is a file that cannot be read.
            ModelError: unknown layer, or no PyTorch model (ONNX from a file).
        """
        arr = image if isinstance(image, np.ndarray) else read_image(image, name=name)
        return self.explain_arrays([arr], layer=layer, target=target)[0]


# ----------------------------------------------------------------------------- helpers
def checkpoint_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Predictor arguments stored in a checkpoint: preprocessing, threshold, temperature,
    weight name and metadata. The metadata keeps the checkpoint's own keys (``sha256`` is set
    only for the shipped default model, from its manifest) and adds ``file_sha256``, the hash
    of the checkpoint file."""
    from ..utils.io import sha256_file

    path = ckpt.get("_path")
    name = ckpt.get("weight_name") or f"{ckpt['model_name']}-res{ckpt['preprocessing']['input_size']}-{Path(path or 'checkpoint').parent.name}"
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler", "torch_rng", "val_logits", "val_labels")}
    if meta.get("sha256"):
        meta["file_sha256"] = meta["sha256"]
    elif path and Path(path).is_file():
        meta["file_sha256"] = sha256_file(path)
    return {
        "preprocessing": Preprocessing.from_dict(ckpt["preprocessing"]),
        "threshold": float(ckpt.get("threshold", 0.5) if ckpt.get("threshold") is not None else 0.5),
        "temperature": float(ckpt.get("temperature", 1.0) if ckpt.get("temperature") is not None else 1.0),
        "name": name,
        "metadata": meta,
    }


def _resolve_guard(guard: Any) -> Any:
    if guard is None or guard is False:
        return None
    if guard is True:
        from ..guard import Guard

        return Guard.default()
    if not callable(getattr(guard, "check", None)):
        raise TypeError("guard must be None, a bool or an object with check(image, meta)")
    return guard


def _ordered_map(fn: Callable[[str], Any], items: Iterable[str], workers: int, ahead: int) -> Iterator[tuple[str, Any]]:
    """``(item, fn(item))`` in input order, computed by ``workers`` threads at most ``ahead``
    items in advance (bounded memory for long lists)."""
    it = iter(items)
    if workers <= 1:
        for x in it:
            yield x, fn(x)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pneumoscan-read") as ex:
        q: collections.deque[tuple[str, concurrent.futures.Future]] = collections.deque()
        for x in it:
            q.append((x, ex.submit(fn, x)))
            if len(q) >= ahead:
                x0, f0 = q.popleft()
                yield x0, f0.result()
        while q:
            x0, f0 = q.popleft()
            yield x0, f0.result()


def _reason(e: PneumoscanError) -> str:
    return e.reason if isinstance(e, ImageReadError) else str(e)


def load_predictor(
    checkpoint: str | Path | None = None, *, backend: str = "torch", onnx: str | Path | None = None, **kwargs: Any
) -> Predictor:
    """A :class:`Predictor` for ``checkpoint`` (a ``.pt`` file or run directory), or for the
    shipped default model when ``checkpoint`` is ``None``.

    Args:
        checkpoint: checkpoint file or run directory; ``None`` for the default model.
        backend: ``"torch"``, ``"onnx"`` (onnxruntime; the model is exported to the cache
            on first use unless ``onnx`` names an exported file) or ``"auto"`` (onnx when
            onnxruntime is installed and the export works, else torch). With ``"onnx"`` or
            ``"auto"`` and a cached export, PyTorch is not imported at all (it is loaded
            later only if Grad-CAM is asked for).
        onnx: an ONNX file written by ``pneumoscan export`` (implies ``backend="onnx"``).
        **kwargs: constructor options (``batch_size``, ``tta``, ``guard``, ``device``).

    Raises:
        CheckpointError: missing, corrupt or unverifiable checkpoint.
        ConfigError: unknown backend.
    """
    from ..errors import ConfigError

    if backend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"unknown backend '{backend}' (auto, torch or onnx)")
    if backend in ("auto", "onnx") and onnx is None:
        from .onnx_backend import cached_predictor

        fast = cached_predictor(checkpoint, **kwargs)  # no PyTorch import when the export is cached
        if fast is not None:
            return fast
    if backend == "auto" and onnx is None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            backend = "torch"
        else:
            ckpt = _load_ckpt(checkpoint)
            try:
                from .onnx_backend import OnnxPredictor

                return OnnxPredictor.from_checkpoint(ckpt, **kwargs)
            except Exception as e:  # noqa: BLE001 - any export/runtime failure: the PyTorch path always works
                log.warning("ONNX backend unavailable (%s); using PyTorch", str(e).splitlines()[0] if str(e) else e.__class__.__name__)
                return Predictor.from_checkpoint(ckpt, **kwargs)
    if onnx is not None or backend == "onnx":
        from .onnx_backend import OnnxPredictor

        if onnx is not None:
            return OnnxPredictor.from_onnx(onnx, **kwargs)
        return OnnxPredictor.from_checkpoint(_load_ckpt(checkpoint), **kwargs)
    return Predictor.from_checkpoint(_load_ckpt(checkpoint), **kwargs)


def _load_ckpt(checkpoint: str | Path | None) -> dict[str, Any]:
    if checkpoint is None:
        from .default_model import load_default_checkpoint

        return load_default_checkpoint()
    from ..training.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)
