"""The model behind the service: predictions in a bounded thread pool, the PNG images sent
back to clients, and what ``/v1/model`` says about the model.

Jobs run in a small thread pool (model calls under a lock), so the event loop keeps answering
``/healthz`` while predictions run. Each upload is decoded in a worker process with time and
memory limits (:func:`~pneumoscan.data.isolated.decode_isolated`), killed when it overruns: a
hostile image costs at most ``decode_timeout_s`` of one worker and gets a 4xx. Uploaded images
are never written to disk.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.calibration import sigmoid
from ..core.imaging import fit_within, heatmap_rgba, resize_float, to_uint8
from ..core.labels import CLASS_NAMES
from ..data.isolated import decode_isolated
from ..errors import PneumoscanError
from ..guard.core import decode_checked
from ..inference.predictor import Predictor
from ..utils.io import sha256_file
from ..utils.version import __version__
from .schemas import clean
from .settings import ACCEPTED_FORMATS, MODEL_CARD_MAX_CHARS, MODEL_CARD_NAMES, OVERLAY_MAX_SIDE, ServeSettings

log = logging.getLogger(__name__)

#: Time allowed to the first decode, which starts the decoding workers' server.
WARM_UP_TIMEOUT_S = 60.0
#: Threshold step of ``/v1/model``'s ``operating_curve`` (the page's threshold slider).
CURVE_STEP = 0.005


# ----------------------------------------------------------------------------- inference
class InferenceService:
    """Runs decode + guard + predict (+ Grad-CAM) jobs in a bounded thread pool, through
    :meth:`Predictor.predict_arrays` (the path ``pneumoscan predict`` takes).

    Args:
        predictor: the loaded model.
        settings: worker threads (decoding runs in parallel; model calls hold a lock), the
            not-a-chest-X-ray guard (the predictor's own if it has one, else the shipped guard
            when its parameters are installed) and the decoding limits.
    """

    def __init__(self, predictor: Predictor, settings: ServeSettings) -> None:
        threads, guard = settings.inference_threads, settings.guard
        self.decode_limits = {"timeout_s": settings.decode_timeout_s, "max_memory": settings.decode_memory_bytes,
                              "formats": ACCEPTED_FORMATS}
        self.predictor = predictor
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pneumoscan-infer")
        self.model_lock = threading.Lock()
        self.pending = 0
        self.gradcam_layer = _gradcam_layer(predictor)
        self.heatmap_supported = self.gradcam_layer is not None
        self.guard = _load_guard(predictor) if guard else None
        self.guard_enabled = self.guard is not None

    def warm_up(self) -> None:
        """Decode a tiny image in a worker process, so that the first upload does not pay for
        starting the decoding workers' server (about a second) out of its time limit."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("L", (8, 8)).save(buf, format="PNG")
        limits = {**self.decode_limits, "timeout_s": max(WARM_UP_TIMEOUT_S, self.decode_limits["timeout_s"])}
        try:
            decode_isolated(buf.getvalue(), "warm-up.png", **limits)  # the workers are forked with the guard loaded
        except PneumoscanError as e:
            log.warning("decoding workers did not start (%s): the first upload will try again", str(e).splitlines()[0])

    def shutdown(self) -> None:
        """Stop the workers; queued jobs are cancelled."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, data: bytes, fmt: str, want_heatmap: bool, want_preview: bool) -> concurrent.futures.Future[dict[str, Any]]:
        """Queue :meth:`run` on the thread pool.

        Args:
            data: the image file's bytes (the worker holds the only reference once the
                caller drops its own).
            fmt: ``"JPEG"``, ``"PNG"`` or ``"DICOM"``.
            want_heatmap: add a Grad-CAM overlay.
            want_preview: add the decoded image as a PNG.
        """
        return self.executor.submit(self.run, data, fmt, want_heatmap, want_preview, time.perf_counter())

    def run(self, data: bytes, fmt: str, want_heatmap: bool, want_preview: bool, submitted: float) -> dict[str, Any]:
        """One job (in a worker thread): decode, guard, predict, optional heatmap and preview.

        Args:
            data: the image file's bytes.
            fmt: ``"JPEG"``, ``"PNG"`` or ``"DICOM"``.
            want_heatmap: add a Grad-CAM overlay.
            want_preview: add the decoded image as a PNG.
            submitted: ``time.perf_counter()`` when the job was queued.

        Returns:
            ``prediction``, ``heatmap`` and ``preview`` (dicts or None), ``timing`` (ms) and
            ``image`` (format and original size).

        Raises:
            ImageReadError: unreadable image, or its decode overran the time limit (its
                subclasses say unsupported or too large, also past the memory limit).
        """
        t0 = time.perf_counter()
        timing = {"queue": (t0 - submitted) * 1000.0}
        p = self.predictor
        name = {"DICOM": "upload.dcm", "PNG": "upload.png"}.get(fmt, "upload.jpg")
        # exactly the decode of Predictor.predict_image (JPEG draft mode down to the side the
        # model, and the guard when it is on, read at): the service answers what `pneumoscan predict` answers
        # the shipped guard checks it in the decoding worker: in parallel, outside the model lock
        arr, meta, check = decode_checked(data, self.guard, name, max_side=p._read_side(self.guard), digest=p.seen is not None,
                                          **self.decode_limits)
        view = arr
        if want_preview and fmt == "JPEG" and max(arr.shape) < OVERLAY_MAX_SIDE < max(meta.get("original_size", (0, 0))):
            view = decode_isolated(data, name, max_side=OVERLAY_MAX_SIDE, **self.decode_limits)[0]  # a sharper preview
        del data
        t1 = time.perf_counter()
        timing["decode"] = (t1 - t0) * 1000.0
        with self.model_lock:  # (guard,) predict and explain (a refusal is a Prediction with ``refused`` set)
            pred = p.predict_arrays([arr], metas=[meta], guard=self.guard if self.guard is not None else False,
                                    checks=[check], heatmap=want_heatmap and self.heatmap_supported)[0]
        t2 = time.perf_counter()
        timing["inference"] = (t2 - t1) * 1000.0
        ow, oh = meta.get("original_size", (arr.shape[1], arr.shape[0]))
        h, w = fit_within(int(oh), int(ow), min(OVERLAY_MAX_SIDE, max(view.shape)))
        heat = None
        if want_heatmap and pred.heatmap is not None and pred.refused is None:
            heat = {"png_base64": png_base64(heatmap_rgba(pred.heatmap, h, w)), "width": w, "height": h, "method": "grad-cam",
                    "layer": self.gradcam_layer}
        preview = None
        if want_preview:
            preview = {"png_base64": png_base64(to_uint8(resize_float(view, h, w))), "width": w, "height": h}
        timing["render"] = (time.perf_counter() - t2) * 1000.0
        return {
            "prediction": pred, "heatmap": heat, "preview": preview, "timing": timing,
            "image": {"format": str(meta.get("format", fmt)), "width": int(ow), "height": int(oh)},
        }


def png_base64(img: np.ndarray) -> str:
    """A uint8 greyscale or RGBA image as a base64-encoded PNG.

    Args:
        img: ``(H, W)`` or ``(H, W, 4)`` uint8.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _gradcam_layer(predictor: Predictor) -> str | None:
    """The layer Grad-CAM explains on this predictor's model, or None (with a warning) when
    the predictor cannot explain (e.g. no PyTorch model)."""
    try:
        return predictor.heatmap_layer()
    except (ImportError, AttributeError, PneumoscanError) as e:
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        log.warning("Grad-CAM unavailable (%s): predictions come without heatmaps", reason)
        return None


def _load_guard(predictor: Predictor) -> Any:
    """The predictor's own not-a-chest-X-ray guard if it carries one, else the shipped guard
    (:mod:`pneumoscan.guard`); None, with a warning, when no guard parameters are installed."""
    own = getattr(predictor, "guard", None)
    if own is not None:
        return own
    try:
        from ..guard import Guard

        return Guard.default()
    except (ImportError, PneumoscanError) as e:
        log.warning("not-a-chest-X-ray guard unavailable (%s): every image will be answered", str(e).splitlines()[0])
        return None


# ----------------------------------------------------------------------------- model info
@dataclass(frozen=True)
class _Identity:
    """What a predictor says about its weights."""

    weight_id: str
    sha256: str | None
    model_name: str | None
    threshold_method: str | None
    val_metrics: dict[str, Any] | None
    class_names: list[str]
    path: Path | None
    card_text: Any


def _identity(predictor: Predictor) -> _Identity:
    """The model's identity: from ``predictor.bundle`` (a
    :class:`~pneumoscan.models.bundle.ModelBundle`) when the predictor has one, else from its
    checkpoint metadata."""
    bundle = getattr(predictor, "bundle", None)
    if bundle is not None:
        path = Path(bundle.path) if bundle.path else None
        return _Identity(
            weight_id=bundle.name or predictor.name, sha256=bundle.sha256 or _file_sha256(path),
            model_name=bundle.arch, threshold_method=bundle.threshold_method, val_metrics=dict(bundle.val_metrics) or None,
            class_names=list(bundle.class_names or CLASS_NAMES), path=path, card_text=bundle.provenance.get("model_card"),
        )
    meta = predictor.metadata
    path = Path(meta["_path"]) if meta.get("_path") else None
    return _Identity(
        weight_id=meta.get("weight_name") or predictor.name, sha256=meta.get("sha256") or _file_sha256(path),
        model_name=meta.get("model_name"), threshold_method=meta.get("threshold_method"), val_metrics=meta.get("val_metrics"),
        class_names=list(meta.get("class_names") or CLASS_NAMES), path=path, card_text=meta.get("model_card"),
    )


def _file_sha256(path: Path | None) -> str | None:
    return sha256_file(path) if path is not None and path.is_file() else None


def model_info(predictor: Predictor, settings: ServeSettings, service: InferenceService) -> dict[str, Any]:
    """What ``/v1/model`` answers (computed once at start-up).

    Args:
        predictor: the loaded model.
        settings: the service's limits.
        service: the running service (its heatmap and guard capabilities).
    """
    ident = _identity(predictor)
    return clean({
        "name": predictor.name,
        "weight_id": ident.weight_id,
        "sha256": ident.sha256,
        "model_name": ident.model_name,
        "input_size": predictor.input_size,
        "operating_point": {
            "threshold": predictor.threshold, "threshold_method": ident.threshold_method,
            "temperature": predictor.temperature,
        },
        "val_metrics": ident.val_metrics,
        "class_names": ident.class_names,
        "model_card": _model_card(ident),
        "operating_curve": operating_curve(predictor),
        "shift": None if predictor.shift is None else {
            "threshold": predictor.shift.detector.threshold, "population": predictor.shift.detector.population,
            "val_flag_rate": predictor.shift.detector.stats.get("val_flag_rate")},
        "capabilities": {"heatmap": service.heatmap_supported, "guard": service.guard_enabled, "dicom": True,
                         "shift": predictor.shift is not None},
        "limits": {"max_upload_mb": settings.max_upload_mb, "formats": list(ACCEPTED_FORMATS),
                   "request_timeout_s": settings.request_timeout_s},
        "version": __version__,
    })


def operating_curve(predictor: Predictor) -> dict[str, Any] | None:
    """Sensitivity and specificity on the model's validation images (or those it was calibrated
    on) at thresholds every :data:`CURVE_STEP` and at its operating threshold, from its stored
    validation logits and its temperature; ``None`` when it has none of both classes.

    Args:
        predictor: the loaded model.
    """
    from ..inference.shift import validation_logits

    bundle = predictor.bundle
    val = validation_logits(bundle)
    if val is None or val[1].min() == val[1].max():
        return None
    p, y = sigmoid(val[0] / bundle.temperature), val[1]
    thr = np.unique(np.round(np.append(np.arange(0.0, 1.0 + CURVE_STEP / 2, CURVE_STEP), bundle.threshold), 6))
    pred = p[None, :] >= thr[:, None]
    pos, neg = y == 1, y == 0
    source = bundle.provenance.get("val_logits_source") == "site-calibration"
    return {"source": "site-calibration images" if source else "validation images",
            "n": {CLASS_NAMES[0]: int(neg.sum()), CLASS_NAMES[1]: int(pos.sum())}, "thresholds": thr.tolist(),
            "sensitivity": np.round((pred & pos).sum(1) / pos.sum(), 4).tolist(),
            "specificity": np.round(1 - (pred & neg).sum(1) / neg.sum(), 4).tolist()}


def _model_card(ident: _Identity) -> str | None:
    """The model card: text stored with the weights, else the checkpoint's own
    ``<stem>.MODEL_CARD.md`` or a MODEL_CARD file beside it (or, for the shipped default model,
    the card its manifest names)."""
    text = ident.card_text
    if isinstance(text, str) and text.strip():
        return text[:MODEL_CARD_MAX_CHARS]
    folders = [ident.path.parent] if ident.path is not None else []
    if ident.sha256:
        default_dir, card = _default_model_card(ident.sha256)
        if card is not None and (default_dir / card).is_file():
            return (default_dir / card).read_text(encoding="utf-8", errors="replace")[:MODEL_CARD_MAX_CHARS]
        if card is not None:
            folders.append(default_dir)
    own = ident.path.parent / f"{ident.path.stem}.{MODEL_CARD_NAMES[0]}" if ident.path is not None else None
    if own is not None and own.is_file():  # the card of a bundle written by `pneumoscan calibrate --data`
        return own.read_text(encoding="utf-8", errors="replace")[:MODEL_CARD_MAX_CHARS]
    for folder in folders:
        for name in MODEL_CARD_NAMES:
            f = folder / name
            if f.is_file():
                return f.read_text(encoding="utf-8", errors="replace")[:MODEL_CARD_MAX_CHARS]
    return None


def _default_model_card(sha256: str) -> tuple[Path, str | None]:
    """The shipped default model's folder and the card file its manifest names, when these
    weights are the default model's (else ``None`` as the card)."""
    from ..models.bundle import default_manifest, default_model_dir

    d = default_model_dir()
    try:
        manifest = default_manifest()
    except PneumoscanError:  # no default model installed
        return d, None
    card = manifest.get("model_card") if manifest.get("sha256") == sha256 else None
    return d, card if isinstance(card, str) else None
