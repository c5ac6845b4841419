"""The one prediction path: a trained model bundle + a runner → calibrated answers.

``predict``, ``evaluate``, the web service and the benchmarks all go through
:class:`Predictor`, so every path applies the same decoding, guard, preprocessing, TTA,
calibration and operating point; only the forward pass differs between backends (a
*runner*, :mod:`pneumoscan.inference.runners`).

Python API (what the CLI and the service use)::

    from pneumoscan.inference import load_predictor   # (defined in inference/loading.py)

    p = load_predictor("runs/x/best.pt", guard=True)       # None → the shipped default model
    pred = p.predict_image("chest.dcm")                    # Prediction (probability, label, ...)
    pred.refused                                           # reason, if not a chest X-ray
    for pred in p.predict_paths(paths, heatmap=True): ...  # input order, per-file errors
    cam = p.explain("chest.jpeg")                          # Grad-CAM at the original resolution
    p.bundle.name, p.bundle.sha256, p.bundle.val_metrics   # what the model is

Heat maps come from the ONNX runner's feature maps in NumPy when its export carries a pooled
linear head (:mod:`pneumoscan.explain.cam_numpy`: the shipped default model, and exports of
MobileNetV2, ResNets, EfficientNet), else from Grad-CAM on the PyTorch model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..core.calibration import sigmoid
from ..core.fingerprint import pixel_digest
from ..core.imaging import resize_float
from ..data.fingerprints import ImageDigest, digest_from_meta, seen_warning
from ..data.io import ImageSource, read_image, read_image_with_meta
from ..data.preprocessing import Preprocessing, preprocess_arrays, preprocess_image
from ..models.bundle import ModelBundle
from ..models.seen import seen_images
from .reading import decode_file, ordered_map
from .records import DecodedImage, Prediction
from .runners import Runner, TorchModelProvider
from .shift import ShiftMonitor
from .tta import check_mode, make_views, merge_views

if TYPE_CHECKING:
    from ..explain import GradCAM, LinearHead

#: With the guard on, images are decoded at least this large (its features were fitted so).
GUARD_READ_SIDE = 224


class Predictor:
    """A trained model ready to answer.

    Args:
        bundle: the model (preprocessing, temperature, threshold, name, sha256, ...).
        runner: its forward pass (:class:`~pneumoscan.inference.runners.TorchRunner`,
            :class:`~pneumoscan.inference.runners.OnnxRunner`).
        batch_size: images per forward pass.
        tta: test-time augmentation: ``"none"``, ``"flip"`` (``True``) or ``"crops"``
            (see :mod:`pneumoscan.inference.tta`).
        guard: the not-a-chest-X-ray guard used by default: ``None``/``False`` (off),
            ``True`` (the shipped guard) or a :class:`pneumoscan.guard.Guard`. Per-call
            ``guard=`` arguments override it.
        torch_model: the PyTorch model Grad-CAM uses (default: the runner's, else built from
            the bundle on first use; see :class:`~pneumoscan.inference.runners.TorchModelProvider`).

    Attributes:
        shift: the distribution-shift check (:class:`~pneumoscan.inference.shift.ShiftMonitor`)
            when the model has a detector and the runner gives its features, else ``None``
            (set it to ``None`` to turn the check off).
        seen: the model's record of its training and calibration images
            (:class:`~pneumoscan.data.fingerprints.SeenImages`), or ``None`` when it has none.
            An answer on one of them carries a warning and ``extra["seen_as"]``
            (``"train"`` or ``"calibration"``).

    Raises:
        CheckpointError: a malformed shift detector, or the default model's sidecar fails its
            checksum.
    """

    def __init__(self, bundle: ModelBundle, runner: Runner, *, batch_size: int = 8, tta: str | bool = "none",
                 guard: Any = None, torch_model: TorchModelProvider | None = None) -> None:
        self.bundle = bundle
        self.runner = runner
        self.torch_model = torch_model or TorchModelProvider.for_bundle(bundle, runner)
        self.batch_size = max(1, int(batch_size))
        self.tta = check_mode(tta)
        self.guard = _resolve_guard(guard)
        self.read_workers = min(4, os.cpu_count() or 1)
        self.shift = ShiftMonitor.for_predictor(bundle, runner)
        self.seen = seen_images(bundle)

    # ------------------------------------------------------------------ the model
    @property
    def backend(self) -> str:
        """What runs the network (one of :data:`~pneumoscan.inference.runners.BACKENDS`)."""
        return self.runner.backend

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def threshold(self) -> float:
        return float(self.bundle.threshold)

    @property
    def temperature(self) -> float:
        return float(self.bundle.temperature)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.bundle.preprocessing

    @property
    def input_size(self) -> int:
        return self.bundle.input_size

    @property
    def weights_id(self) -> str:
        """Short id of the weights: the first 12 hex digits of the checkpoint file's sha256."""
        return self.bundle.weights_id

    @property
    def logit_threshold(self) -> float:
        """The raw logit at which the label turns PNEUMONIA."""
        return self.bundle.logit_threshold

    def label_of(self, probability: float) -> str:
        return self.bundle.label_of(probability)

    # ------------------------------------------------------------------ core
    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Greyscale [0,1] arrays → ``(B,1,S,S)`` float32 model input."""
        return preprocess_arrays(list(images), self.input_size)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits of a preprocessed batch (averaged over the TTA views, if any)."""
        return self._views(batch, None)[0]

    def logits_and_shift(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`logits` and each image's distribution-shift score (of its unaugmented view;
        ``None`` without :attr:`shift`), from the same forward passes."""
        return self._views(batch, self.shift)

    def _views(self, batch: np.ndarray, shift: ShiftMonitor | None) -> tuple[np.ndarray, np.ndarray | None]:
        views = make_views(batch, self.tta)
        forward = shift.forward if shift is not None else lambda v: (self.runner.forward(v), None)
        out = [forward(views[i : i + self.batch_size]) for i in range(0, views.shape[0], self.batch_size)]
        raw = np.concatenate([z for z, _ in out]).astype(np.float64) if out else np.zeros(0, np.float64)
        scores = shift.detector.score(np.concatenate([f for _, f in out])[: batch.shape[0]]) if shift is not None and out else None
        return merge_views(raw, self.tta), scores

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``sigmoid(logit / T)``."""
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated pneumonia probabilities of greyscale [0,1] arrays."""
        if not len(images):
            return np.zeros(0)
        return self.calibrate(self.logits(self.preprocess(images)))

    def _extra(self) -> dict[str, Any]:
        return {"weights": self.weights_id} if self.weights_id else {}

    def _answer(self, name: str | None, prob: float, guard_score: float | None, shift_score: float | None = None) -> Prediction:
        extra = self._extra()
        if guard_score is not None:
            extra["guard_score"] = round(guard_score, 4)
        warnings = []
        if shift_score is not None and self.shift is not None:
            extra["shift_score"] = round(float(shift_score), 3)
            warnings = [w for w in [self.shift.detector.warning(float(shift_score))] if w]
        return Prediction(name, float(prob), self.label_of(prob), self.threshold, self.name, extra=extra, warnings=warnings)

    def _flag_seen(self, pred: Prediction, item: DecodedImage) -> None:
        """Warn on an answer whose input is one of the model's training or calibration images
        (by the digests the reader computed, else by the pixels of an array given directly)."""
        if self.seen is None or item.array is None:
            return
        d = digest_from_meta(item.meta)
        if d is None:
            d = ImageDigest(None, pixel_digest(item.array))
        role = self.seen.match(d)
        if role is not None:
            pred.extra["seen_as"] = role
            pred.warnings.append(seen_warning(role))

    def _failed(self, name: str | None, error: str) -> Prediction:
        return Prediction(name, None, None, self.threshold, self.name, error=error)

    def _refused(self, name: str | None, reason: str, score: float) -> Prediction:
        extra: dict[str, Any] = {"guard_score": round(float(score), 4), **self._extra()}
        return Prediction(name, None, None, self.threshold, self.name, refused=reason, extra=extra)

    def _read_side(self, guard: Any) -> int:
        """Smallest side large JPEGs are decoded at (draft mode)."""
        return max(self.input_size, GUARD_READ_SIDE) if guard is not None else self.input_size

    def _guard_for(self, guard: Any) -> Any:
        """The guard a call uses: its ``guard=`` argument, else the predictor's."""
        return self.guard if guard is None else _resolve_guard(guard)

    # ------------------------------------------------------------------ predictions
    def _predict_decoded(self, items: Sequence[DecodedImage], guard: Any, heatmap: bool, layer: str | None) -> list[Prediction]:
        """Answers for decoded records, in their order: unreadable ones failed, the guard's
        refusals refused (checked here unless a reader thread did), the rest predicted."""
        out: list[Prediction | None] = [None] * len(items)
        keep: list[int] = []
        scores: dict[int, float] = {}
        for i, it in enumerate(items):
            if it.error is not None or it.array is None:
                out[i] = self._failed(it.name, it.error or "no image")
                continue
            if guard is not None:
                res = it.check if it.check is not None else guard.check(it.array, it.meta)
                if not res.ok:
                    out[i] = self._refused(it.name, res.reason or "not a chest X-ray", res.score)
                    continue
                scores[i] = float(res.score)
            keep.append(i)
        if keep:
            inputs = [items[i].input if items[i].input is not None else preprocess_image(items[i].array, self.input_size) for i in keep]
            logits, shift = self.logits_and_shift(np.stack(inputs))
            probs = self.calibrate(logits)
            arrays = [items[i].array for i in keep]
            cams = self.explain_arrays(arrays, layer=layer) if heatmap else [None] * len(keep)  # type: ignore[arg-type]
            for k, (i, p, cam) in enumerate(zip(keep, probs, cams)):
                out[i] = self._answer(items[i].name, p, scores.get(i), None if shift is None else shift[k])
                out[i].heatmap = cam  # type: ignore[union-attr]
        for it, pred in zip(items, out):  # DICOM study/series/instance identifiers travel with the answer
            if pred is not None and it.meta and it.meta.get("identifiers"):
                pred.extra.update(it.meta["identifiers"])
            if pred is not None and pred.error is None:
                self._flag_seen(pred, it)
        return [p for p in out if p is not None]

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
    ) -> list[Prediction]:
        """Predictions for already-decoded greyscale [0,1] arrays.

        Args:
            images: 2-D float arrays in [0, 1].
            names: a name per image (``Prediction.path``).
            metas: the reader's metadata per image (from ``read_image_with_meta``): lets the
                guard see DICOM modality, colour and original size, and (read with
                ``digest=True``) carries the digests that find the model's own training images;
                without them an image is looked up by its pixels.
            guard: ``None`` (the predictor's setting), ``True``/``False`` or a Guard.
            heatmap: also compute Grad-CAM maps (``Prediction.heatmap``, at each array's
                resolution) for the images that were predicted.
            layer: Grad-CAM target layer (default: the model's).
            checks: the guard's result per image when already computed (e.g. by the decoding
                worker, :meth:`pneumoscan.guard.Guard.worker_check`), ``None`` entries checked here.
        """
        names = list(names) if names is not None else [None] * len(images)
        metas = list(metas) if metas is not None else [None] * len(images)
        checks = list(checks) if checks is not None else [None] * len(images)
        items = [DecodedImage(n, a, m, check=c) for n, a, m, c in zip(names, images, metas, checks)]
        return self._predict_decoded(items, self._guard_for(guard), heatmap, layer)

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
        arr, meta = read_image_with_meta(source, max_side=self._read_side(self._guard_for(guard)), name=name, digest=self.seen is not None)
        return self.predict_arrays([arr], [nm], metas=[meta], guard=guard, heatmap=heatmap, layer=layer)[0]

    def predict_paths(
        self,
        paths: Iterable[str | Path],
        *,
        guard: Any = None,
        heatmap: bool = False,
        layer: str | None = None,
        on_heatmap: Callable[[Prediction], None] | None = None,
        decode_timeout: float | None = None,
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
            decode_timeout: decode each file in a worker process killed after this many
                seconds (that file gets an ``error``); ``None``: in the reader threads.
        """
        g = self._guard_for(guard)
        side = self._read_side(g)
        digest = self.seen is not None

        def read(p: str) -> DecodedImage:
            return decode_file(p, max_side=side, input_size=self.input_size, guard=g, timeout_s=decode_timeout, digest=digest)

        pending: list[DecodedImage] = []

        def flush() -> Iterator[Prediction]:
            preds = self._predict_decoded(pending, g, heatmap, layer)
            pending.clear()
            for pred in preds:
                if on_heatmap is not None and pred.heatmap is not None:
                    on_heatmap(pred)
                    pred.heatmap = None
                yield pred

        n_ok = 0
        for item in ordered_map(read, (str(p) for p in paths), self.read_workers, 2 * self.batch_size):
            pending.append(item)
            n_ok += item.error is None
            if n_ok >= self.batch_size:
                yield from flush()
                n_ok = 0
        if pending:
            yield from flush()

    # ------------------------------------------------------------------ explanations
    def _linear_heads(self, layer: str | None) -> tuple[LinearHead, ...]:
        """The runner's pooled linear heads (an ensemble: one per member), when they explain
        ``layer`` (``None``: the default; their layers joined by commas)."""
        heads = tuple(getattr(self.runner, "linear_heads", ()))
        return heads if heads and layer in (None, ",".join(h.layer for h in heads)) else ()

    def heatmap_layer(self, layer: str | None = None) -> str:
        """The layer heat maps explain, checking that this predictor can make them (cheap on
        the NumPy path; on the PyTorch path the model is loaded now, so a bad layer name or a
        missing model is one error before any work).

        Args:
            layer: a ``named_modules`` name (several joined by commas: their maps are
                averaged), ``None`` for the model's default (an ensemble: each member's).

        Returns:
            The layer's name (several: joined by commas).

        Raises:
            ModelError: no PyTorch model (a plain ONNX file without feature maps), PyTorch
                not installed for a model that needs it, or unknown layer.
        """
        heads = self._linear_heads(layer)
        if heads:
            return ",".join(h.layer for h in heads)
        model = self.torch_model.get()  # before importing Grad-CAM: PyTorch may be missing
        from ..explain import resolve_layers

        return ",".join(name for name, _ in resolve_layers(model, layer))

    def gradcam(self, layer: str | None = None, target: str = "predicted") -> GradCAM:
        """A :class:`pneumoscan.explain.GradCAM` on this predictor's PyTorch model (explaining
        the predicted class at this predictor's operating point by default).

        Raises:
            ModelError: no PyTorch model (a plain ONNX file), PyTorch not installed, or
                unknown layer.
        """
        model = self.torch_model.get()
        from ..explain import GradCAM

        return GradCAM(model, layer, target=target, logit_threshold=self.logit_threshold)

    def explain_arrays(self, images: Sequence[np.ndarray], *, layer: str | None = None, target: str = "predicted") -> list[np.ndarray]:
        """Grad-CAM maps in [0, 1] of decoded images, each at its array's resolution: from the
        ONNX runner's feature maps in NumPy when it has a pooled linear head for ``layer``,
        else from the PyTorch model.

        Args:
            images: 2-D float greyscale arrays in [0, 1].
            layer: target layer (``named_modules`` name; default: the model's
                ``gradcam_layer``).
            target: ``"predicted"`` class (default), ``"pneumonia"`` or ``"normal"``.

        Raises:
            ModelError: see :meth:`heatmap_layer`.
        """
        if not len(images):
            return []
        heads = self._linear_heads(layer)
        if heads:
            return self._linear_head_maps(images, heads, target)
        cam = self.gradcam(layer, target)
        import torch

        device = next(cam.model.parameters(), torch.empty(0)).device
        maps: list[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            chunk = list(images[i : i + self.batch_size])
            m = cam(torch.from_numpy(self.preprocess(chunk)).to(device)).cpu().numpy()[:, 0]
            maps += [resize_float(m[k], im.shape[0], im.shape[1]) for k, im in enumerate(chunk)]
        return maps

    def _linear_head_maps(self, images: Sequence[np.ndarray], heads: Sequence[LinearHead], target: str) -> list[np.ndarray]:
        """:meth:`explain_arrays` from the ONNX runner's feature maps (no PyTorch)."""
        from ..explain.cam_numpy import check_target, linear_head_maps

        check_target(target)
        size = (self.input_size, self.input_size)
        maps: list[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            chunk = list(images[i : i + self.batch_size])
            logits, feats = self.runner.forward_feature_maps(self.preprocess(chunk))  # type: ignore[attr-defined]
            m = linear_head_maps(feats, heads, logits, target=target, logit_threshold=self.logit_threshold, size=size)
            maps += [resize_float(m[k], im.shape[0], im.shape[1]) for k, im in enumerate(chunk)]
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


def _resolve_guard(guard: Any) -> Any:
    if guard is None or guard is False:
        return None
    if guard is True:
        from ..guard import Guard

        return Guard.default()
    if not callable(getattr(guard, "check", None)):
        raise TypeError("guard must be None, a bool or an object with check(image, meta)")
    return guard
