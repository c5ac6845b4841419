"""The pneumoscan web service (FastAPI).

Routes:

- ``POST /v1/predict`` — multipart field ``file`` (JPEG, PNG or DICOM) → probability, label,
  threshold, model, ``refused`` (not-a-chest-X-ray guard), optional Grad-CAM heatmap
  (``?heatmap=true``) and a preview of the decoded image (``?preview=true``), timing in ms.
- ``GET /v1/model`` — weight name and sha256, operating point, validation metrics, model card.
- ``GET /healthz`` — liveness; never blocked by running predictions, never needs the API key.
- ``GET /`` and ``/static/<file>`` — the browser page; ``/docs`` — OpenAPI docs. Every asset
  is served by pneumoscan itself, so the page and the docs work with no internet access.

Reliability and privacy:

- The request body is read in chunks by a streaming multipart parser and reading stops as
  soon as the size limit is passed (413); nothing is spooled to disk. Buffered upload bytes
  of all requests together are bounded by a byte budget (``upload_memory_mb``); requests
  beyond it wait, unread, in the kernel's socket buffers, so memory stays bounded however
  many large uploads arrive at once.
- Decoding and inference run in a small bounded thread pool (model calls under a lock), so
  the event loop keeps answering ``/healthz`` while predictions run. Every request has a
  deadline (``request_timeout_s``): a stalled upload gets 408, a request that cannot be
  served in time 503.
- Uploaded images are never written to disk or logged; a request's log line carries its id,
  size, latency, status and outcome only.
- Errors are JSON ``{"error": <code>, "detail": <one line>}``; bad input never gives 500.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hmac
import io
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..utils.version import __version__
from ..data.io import read_image_with_meta, to_uint8
from ..errors import ImageReadError, ImageTooLargeError, NotChestXrayError, PneumoscanError, UnsupportedFormatError
from ..inference.predictor import Prediction, Predictor
from ..utils.io import sha256_file

log = logging.getLogger(__name__)

#: Bytes of multipart framing (boundaries, part headers, small extra fields) allowed on top
#: of the file-size limit.
MULTIPART_OVERHEAD = 64 * 1024
#: Side of the heatmap and preview PNGs returned to clients (longest side, pixels).
OVERLAY_MAX_SIDE = 512
#: Largest model card returned by ``/v1/model`` (characters).
MODEL_CARD_MAX_CHARS = 64_000
MODEL_CARD_NAMES = ("MODEL_CARD.md", "model_card.md", "MODEL_CARD.txt", "model_card.txt")
ACCEPTED_FORMATS = ("JPEG", "PNG", "DICOM")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass
class ServeSettings:
    """Service settings.

    Args:
        max_upload_mb: largest accepted image file (MB, 10^6 bytes); larger uploads get 413.
        api_key: if set, every ``/v1`` route needs it (``X-API-Key`` or ``Authorization:
            Bearer``); 401 otherwise.
        cors_origins: origins allowed to call the API from other sites (CORS is off when
            empty).
        request_timeout_s: deadline of one request, from its arrival to its answer.
        upload_idle_timeout_s: longest pause between two chunks of an upload (408 after).
        upload_memory_mb: budget of upload bytes buffered in memory by all requests together.
        max_pending: most ``/v1/predict`` requests admitted at once; more get 503.
        inference_threads: threads that decode images (model calls are serialised).
        guard: refuse images that are not chest X-rays (the not-a-chest-X-ray guard).
    """

    max_upload_mb: float = 50.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    request_timeout_s: float = 60.0
    upload_idle_timeout_s: float = 15.0
    upload_memory_mb: float = 256.0
    max_pending: int = 256
    inference_threads: int = 2
    guard: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    def validate(self) -> None:
        """Raise :class:`~pneumoscan.errors.ConfigError` on impossible values."""
        from ..errors import ConfigError

        if not self.max_upload_mb > 0:
            raise ConfigError(f"max_upload_mb must be > 0 (got {self.max_upload_mb})")
        if not self.upload_memory_mb > 0:
            raise ConfigError(f"upload_memory_mb must be > 0 (got {self.upload_memory_mb})")
        if self.request_timeout_s <= 0 or self.upload_idle_timeout_s <= 0:
            raise ConfigError("timeouts must be > 0 seconds")
        if self.max_pending < 1 or self.inference_threads < 1:
            raise ConfigError("max_pending and inference_threads must be >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key must not be empty")


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "detail": detail}``.

    Args:
        status: HTTP status code.
        code: short machine-readable error code.
        detail: one human-readable line.
        headers: extra response headers.
    """

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def _error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "unprocessable", 503: "unavailable"}


# ----------------------------------------------------------------------------- response models (OpenAPI)
class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable error code")
    detail: str = Field(description="one human-readable line")


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    bytes: int


class PngImage(BaseModel):
    png_base64: str = Field(description="PNG image, base64-encoded")
    width: int
    height: int


class Heatmap(PngImage):
    method: str = Field("grad-cam", description="explanation method")
    layer: str | None = Field(None, description="network layer the map was computed on")


class PredictResponse(BaseModel):
    request_id: str
    probability: float | None = Field(description="calibrated probability of pneumonia (null when refused)")
    label: str | None = Field(description="PNEUMONIA or NORMAL at the model's operating threshold (null when refused)")
    threshold: float
    model: str
    refused: str | None = Field(None, description="why the input was refused as not a chest X-ray")
    heatmap: Heatmap | None = Field(None, description="Grad-CAM overlay (colour-mapped RGBA PNG, same aspect as the image)")
    preview: PngImage | None = Field(None, description="the decoded image as pneumoscan read it (greyscale PNG)")
    image: ImageInfo
    timing_ms: dict[str, float]
    extra: dict[str, Any] = Field(default_factory=dict, description="additional fields (e.g. guard score)")


class ModelInfo(BaseModel):
    name: str
    weight_id: str
    sha256: str | None
    model_name: str | None
    input_size: int
    operating_point: dict[str, Any]
    val_metrics: dict[str, Any] | None
    class_names: list[str]
    model_card: str | None
    capabilities: dict[str, bool]
    limits: dict[str, Any]
    version: str


class Health(BaseModel):
    status: str
    model: str
    uptime_s: float
    pending: int
    upload_bytes_buffered: int


# ----------------------------------------------------------------------------- memory budget
class ByteBudget:
    """FIFO async semaphore over bytes: at most ``capacity`` bytes reserved at once.

    Args:
        capacity: bytes available.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int, timeout: float) -> int:
        """Reserve ``n`` bytes (capped at capacity), waiting at most ``timeout`` seconds.

        Returns the bytes reserved. Raises :class:`asyncio.TimeoutError` on timeout.
        """
        n = min(int(n), self.capacity)
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=max(timeout, 0.0))
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we gave up
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        """Give back ``n`` reserved bytes and wake waiters that now fit."""
        self.used = max(0, self.used - int(n))
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.capacity:
                break
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)


class _Reservation:
    """Bytes held in a :class:`ByteBudget` by one request, released exactly once (from the
    event loop, also when the release is triggered by a worker thread)."""

    def __init__(self, budget: ByteBudget, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.budget, self.n, self.loop, self._done = budget, n, loop, False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self.budget.release(self.n)

    def release_threadsafe(self, *_: Any) -> None:
        self.loop.call_soon_threadsafe(self.release)


# ----------------------------------------------------------------------------- upload parsing
@dataclass
class _PartState:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field_name: bytes = b""
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class _TooLarge(Exception):
    pass


async def _chunks(request: Request, deadline: float, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body in chunks, with an idle timeout between chunks and an overall deadline."""
    it = request.stream().__aiter__()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError(408, "request_timeout", "the upload took too long")
        try:
            chunk = await asyncio.wait_for(it.__anext__(), timeout=min(idle_timeout, remaining))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError as e:
            raise ApiError(408, "request_timeout", "the upload stalled or took too long") from e
        if chunk:
            yield chunk


async def read_upload(request: Request, settings: ServeSettings, deadline: float) -> tuple[bytes, dict[str, Any]]:
    """Stream a multipart body, keep the first ``file`` part in memory and stop reading as
    soon as the size limit is passed.

    Args:
        request: the incoming request (its body not yet read).
        settings: limits and timeouts.
        deadline: ``time.monotonic()`` by which the body must have arrived.

    Returns:
        The file's bytes and a dict with ``filename``, ``content_type`` and ``body_bytes``.

    Raises:
        ApiError: 413 too large, 415 not multipart, 422 malformed or no ``file`` field,
            408 stalled upload.
    """
    limit = settings.max_upload_bytes
    body_limit = limit + MULTIPART_OVERHEAD
    ctype = request.headers.get("content-type")
    if not ctype:
        raise ApiError(422, "missing_file", "send the image as multipart/form-data field 'file'")
    mime, params = parse_options_header(ctype)
    if mime != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       f"expected multipart/form-data with an image in field 'file', got {mime.decode('latin-1')[:60] or 'no type'}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(422, "malformed_body", "multipart/form-data without a boundary")

    state = _PartState()
    file_chunks: list[bytes] = []
    file_size = 0
    info: dict[str, Any] = {"filename": None, "content_type": None}
    found = {"file": False, "file_done": False, "ended": False}

    def on_part_begin() -> None:
        nonlocal state
        state = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[bytes(state.header_field).strip().lower()] = bytes(state.header_value).strip()
        state.header_field.clear()
        state.header_value.clear()

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state.headers.get(b"content-disposition", b""))
        state.field_name = disp.get(b"name", b"")
        if state.field_name == b"file" and not found["file"]:
            found["file"] = True
            state.is_file = True
            fn = disp.get(b"filename")
            info["filename"] = fn.decode("utf-8", "replace") if fn is not None else None
            ct = state.headers.get(b"content-type")
            info["content_type"] = ct.decode("latin-1").lower() if ct else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal file_size
        if state.is_file:
            file_size += end - start
            if file_size > limit:
                raise _TooLarge()
            file_chunks.append(data[start:end])

    def on_part_end() -> None:
        if state.is_file:
            found["file_done"] = True

    def on_end() -> None:
        found["ended"] = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })
    too_large = ApiError(413, "payload_too_large", f"upload larger than the {settings.max_upload_mb:g} MB limit")
    received = 0
    try:
        async for chunk in _chunks(request, deadline, settings.upload_idle_timeout_s):
            received += len(chunk)
            if received > body_limit:
                raise too_large
            parser.write(chunk)
            if found["ended"]:
                break
        parser.finalize()
    except _TooLarge:
        raise too_large from None
    except MultipartParseError as e:
        raise ApiError(422, "malformed_body", f"malformed multipart body ({str(e).splitlines()[0][:120]})") from None
    info["body_bytes"] = received
    if not found["file"]:
        raise ApiError(422, "missing_file", "no 'file' field in the form (send the image as multipart field 'file')")
    if not found["file_done"]:
        raise ApiError(422, "malformed_body", "the multipart body ended before the file did")
    data = b"".join(file_chunks)
    file_chunks.clear()
    if not data:
        raise ApiError(422, "empty_file", "the uploaded file is empty (0 bytes)")
    return data, info


def sniff_format(data: bytes, filename: str | None, content_type: str | None) -> str | None:
    """``"JPEG"``, ``"PNG"`` or ``"DICOM"`` from the file's leading bytes (DICOM files
    without the Part-10 preamble are recognised by name or ``application/dicom``), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if (filename or "").lower().endswith((".dcm", ".dicom")) or (content_type or "").startswith("application/dicom"):
        return "DICOM"
    return None


# ----------------------------------------------------------------------------- images for clients
def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fit_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def _resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize a float [0,1] 2-D map with Pillow (bilinear)."""
    from PIL import Image

    if arr.shape == (h, w):
        return arr.astype(np.float32)
    im = Image.fromarray(np.asarray(arr, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def heatmap_rgba(cam: np.ndarray, h: int, w: int) -> np.ndarray:
    """A [0,1] Grad-CAM map as an RGBA overlay of ``h``×``w`` pixels: a jet colour map whose
    alpha grows with the map, so regions the network ignored stay transparent."""
    m = np.clip(np.nan_to_num(_resize(cam, h, w), nan=0.0), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * m - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * m - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * m - 1.0), 0.0, 1.0)
    a = np.clip(0.15 + 0.85 * m, 0.0, 1.0)
    return np.stack([to_uint8(r), to_uint8(g), to_uint8(b), to_uint8(a)], axis=-1)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars → Python, NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist()) if obj.size <= 64 else None
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ----------------------------------------------------------------------------- inference
class InferenceService:
    """Runs decode + guard + predict (+ Grad-CAM) jobs in a bounded thread pool, through
    :meth:`Predictor.predict_arrays` (the path ``pneumoscan predict`` takes).

    Args:
        predictor: the loaded model.
        threads: worker threads (decoding runs in parallel; model calls hold a lock).
        guard: refuse inputs that are not chest X-rays: the predictor's own guard if it has
            one, else the shipped guard when its parameters are installed.
    """

    def __init__(self, predictor: Predictor, threads: int = 2, guard: bool = True) -> None:
        self.predictor = predictor
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pneumoscan-infer")
        self.model_lock = threading.Lock()
        self.pending = 0
        self.gradcam_layer = _gradcam_layer(predictor)
        self.heatmap_supported = self.gradcam_layer is not None
        self.guard = _load_guard(predictor) if guard else None
        self.guard_enabled = self.guard is not None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def run(self, data: bytes, fmt: str, want_heatmap: bool, want_preview: bool, submitted: float) -> dict[str, Any]:
        """One job (in a worker thread): decode, guard, predict, optional heatmap and preview.

        Raises:
            ImageReadError: unreadable image (its subclasses say unsupported or too large).
        """
        t0 = time.perf_counter()
        timing = {"queue": (t0 - submitted) * 1000.0}
        p = self.predictor
        name = {"DICOM": "upload.dcm", "PNG": "upload.png"}.get(fmt, "upload.jpg")
        # exactly the decode of Predictor.predict_image (JPEG draft mode down to the model's
        # input size): the service answers what `pneumoscan predict` answers
        arr, meta = read_image_with_meta(data, max_side=p.input_size, name=name)
        view = arr
        if want_preview and fmt == "JPEG" and max(arr.shape) < OVERLAY_MAX_SIDE < max(meta.get("original_size", (0, 0))):
            view = read_image_with_meta(data, max_side=OVERLAY_MAX_SIDE, name=name)[0]  # a sharper preview
        del data
        t1 = time.perf_counter()
        timing["decode"] = (t1 - t0) * 1000.0
        with self.model_lock:
            pred = _predict(p, arr, meta, self.guard, want_heatmap and self.heatmap_supported)
        t2 = time.perf_counter()
        timing["inference"] = (t2 - t1) * 1000.0
        ow, oh = meta.get("original_size", (arr.shape[1], arr.shape[0]))
        h, w = _fit_size(int(oh), int(ow), min(OVERLAY_MAX_SIDE, max(view.shape)))
        heat = None
        if want_heatmap and pred.heatmap is not None and pred.refused is None:
            heat = {"png_base64": _png_b64(heatmap_rgba(pred.heatmap, h, w)), "width": w, "height": h, "method": "grad-cam",
                    "layer": self.gradcam_layer}
        preview = None
        if want_preview:
            preview = {"png_base64": _png_b64(to_uint8(_resize(view, h, w))), "width": w, "height": h}
        timing["render"] = (time.perf_counter() - t2) * 1000.0
        return {
            "prediction": pred, "heatmap": heat, "preview": preview, "timing": timing,
            "image": {"format": str(meta.get("format", fmt)), "width": int(ow), "height": int(oh)},
        }


def _gradcam_layer(predictor: Predictor) -> str | None:
    """The layer Grad-CAM explains on this predictor's model, or None (with a warning) when
    the predictor cannot explain (e.g. no PyTorch model)."""
    try:
        return str(predictor.gradcam().layer_name)
    except (ImportError, AttributeError, PneumoscanError) as e:
        log.warning("Grad-CAM unavailable (%s): predictions come without heatmaps", str(e).splitlines()[0] if str(e) else e.__class__.__name__)
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


def _predict(predictor: Predictor, arr: np.ndarray, meta: dict[str, Any], guard: Any, heatmap: bool) -> Prediction:
    """Guard, predict and explain one decoded image (the caller holds the model lock); a
    refusal raised as NotChestXrayError becomes a refused Prediction."""
    try:
        return predictor.predict_arrays([arr], metas=[meta], guard=guard if guard is not None else False, heatmap=heatmap)[0]
    except NotChestXrayError as e:
        return Prediction(None, None, None, predictor.threshold, predictor.name, refused=str(e))


# ----------------------------------------------------------------------------- model info
def model_info(predictor: Predictor, settings: ServeSettings, service: InferenceService) -> dict[str, Any]:
    """What ``/v1/model`` answers (computed once at start-up)."""
    meta = predictor.metadata
    path = meta.get("_path")
    sha = meta.get("sha256")
    if not sha and path and Path(path).is_file():
        sha = sha256_file(path)
    return _clean({
        "name": predictor.name,
        "weight_id": meta.get("weight_name") or predictor.name,
        "sha256": sha,
        "model_name": meta.get("model_name"),
        "input_size": predictor.input_size,
        "operating_point": {
            "threshold": predictor.threshold, "threshold_method": meta.get("threshold_method"),
            "temperature": predictor.temperature,
        },
        "val_metrics": meta.get("val_metrics"),
        "class_names": list(meta.get("class_names") or ("NORMAL", "PNEUMONIA")),
        "model_card": _model_card(meta),
        "capabilities": {"heatmap": service.heatmap_supported, "guard": service.guard_enabled, "dicom": True},
        "limits": {"max_upload_mb": settings.max_upload_mb, "formats": list(ACCEPTED_FORMATS),
                   "request_timeout_s": settings.request_timeout_s},
        "version": __version__,
    })


def _model_card(meta: dict[str, Any]) -> str | None:
    """The model card: text stored in the checkpoint, else a MODEL_CARD file beside it (or
    beside the shipped default model)."""
    text = meta.get("model_card")
    if isinstance(text, str) and text.strip():
        return text[:MODEL_CARD_MAX_CHARS]
    folders = []
    if meta.get("_path"):
        folders.append(Path(meta["_path"]).parent)
    if meta.get("sha256"):  # the shipped default model
        with contextlib.suppress(Exception):
            from ..inference.default_model import default_manifest, default_model_dir

            d = default_model_dir()
            manifest = default_manifest()
            card = manifest.get("model_card") if manifest.get("sha256") == meta["sha256"] else None
            if isinstance(card, str) and (d / card).is_file():
                return (d / card).read_text(encoding="utf-8", errors="replace")[:MODEL_CARD_MAX_CHARS]
            if card is not None:
                folders.append(d)
    for folder in folders:
        for name in MODEL_CARD_NAMES:
            f = folder / name
            if f.is_file():
                return f.read_text(encoding="utf-8", errors="replace")[:MODEL_CARD_MAX_CHARS]
    return None


# ----------------------------------------------------------------------------- static assets
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json"}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's assets, read into memory once: ``{file name: (bytes, media type)}``.
    Only these names are ever served, so no request path can reach another file."""
    root = resources.files("pneumoscan").joinpath("serving/static")
    out: dict[str, tuple[bytes, str]] = {}
    for entry in root.iterdir():
        suffix = Path(entry.name).suffix.lower()
        if entry.is_file() and suffix in _MEDIA_TYPES and not entry.name.startswith("."):
            out[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    return out


# ----------------------------------------------------------------------------- middleware
class RequestContextMiddleware:
    """Pure ASGI middleware: request id, security headers, one log line per request (id,
    method, route, bytes received, status, latency, outcome; never the body or file name)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[dict[str, Any]]], send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                rid = cand if _REQUEST_ID_RE.match(cand) else None
        rid = rid or uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        counters = {"in": 0, "status": 0}

        async def receive_counted() -> dict[str, Any]:
            msg = await receive()
            if msg["type"] == "http.request":
                counters["in"] += len(msg.get("body", b""))
            return msg

        async def send_with_headers(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                counters["status"] = msg["status"]
                headers = list(msg.get("headers", []))
                headers += [(b"x-request-id", rid.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer")]
                msg = dict(msg, headers=headers)
            await send(msg)

        try:
            await self.app(scope, receive_counted, send_with_headers)
        finally:
            ms = (time.perf_counter() - start) * 1000.0
            outcome = state.get("outcome") or ("ok" if 0 < counters["status"] < 400 else "error")
            lvl = logging.DEBUG if scope.get("path") == "/healthz" else logging.INFO
            log.log(lvl, "request id=%s method=%s path=%s bytes_in=%d status=%d latency_ms=%.1f outcome=%s",
                    rid, scope.get("method"), _route_of(scope.get("path", "")), counters["in"], counters["status"], ms, outcome)


def _route_of(path: str) -> str:
    """The path for the log, shortened (unknown paths could carry anything)."""
    return path if len(path) <= 64 else path[:61] + "..."


# ----------------------------------------------------------------------------- app
def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``predictor``.

    Args:
        predictor: the model, loaded once (e.g. ``pneumoscan.inference.load_predictor``).
        settings: limits, API key, CORS origins and timeouts (defaults if None).
    """
    from fastapi_offline import FastAPIOffline

    settings = settings or ServeSettings()
    settings.validate()
    service = InferenceService(predictor, settings.inference_threads, settings.guard)
    budget = ByteBudget(int(settings.upload_memory_mb * 1_000_000))
    static = load_static()
    started = time.monotonic()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("serving %s (threshold %.3f); uploads up to %g MB; API key %s; CORS %s", predictor.name, predictor.threshold,
                 settings.max_upload_mb, "required" if settings.api_key else "off", ", ".join(settings.cors_origins) or "off")
        yield
        service.shutdown()

    app = FastAPIOffline(
        title="pneumoscan", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
        static_url="/docs-assets",
        description="Pneumonia detection on chest X-rays. Research software: not a medical device; every result "
                    "needs review by a qualified clinician.",
    )
    app.state.settings = settings
    app.state.service = service
    app.state.budget = budget
    info = model_info(predictor, settings, service)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"], allow_credentials=False)
    app.add_middleware(RequestContextMiddleware)

    # -- errors: always {"error", "detail"} JSON
    def _set_outcome(request: Request, outcome: str) -> None:
        request.state.outcome = outcome

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _set_outcome(request, exc.code)
        headers = dict(exc.headers)
        if request.method == "POST" and not getattr(request.state, "body_done", False):
            # the body was not read to its end (too large, stalled, unauthorised, ...): close
            # the connection instead of reading and discarding the rest of it
            headers["Connection"] = "close"
        return _error_response(exc.status, exc.code, exc.detail, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        _set_outcome(request, code)
        return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        _set_outcome(request, "invalid_request")
        return _error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}"[:200])

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "?")
        log.error("request id=%s internal error: %s", rid, exc.__class__.__name__, exc_info=(type(exc), exc, exc.__traceback__))
        _set_outcome(request, "internal_error")
        return _error_response(500, "internal_error", f"internal server error (request id {rid})")

    # -- API key
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (or send Authorization: Bearer <key>)")
    bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")

    async def require_api_key(
        key: str | None = Security(key_header), cred: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> None:
        supplied = key or (cred.credentials if cred is not None else None)
        expected = settings.api_key or ""
        if not supplied or not hmac.compare_digest(supplied.encode("utf-8"), expected.encode("utf-8")):
            raise ApiError(401, "unauthorized", "a valid API key is required (X-API-Key header or Authorization: Bearer)",
                           {"WWW-Authenticate": 'Bearer realm="pneumoscan"'})

    v1_deps = [Depends(require_api_key)] if settings.api_key else []
    errors_doc: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody, "description": "missing or wrong API key (only when the server has one)"},
    }

    # -- routes
    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness: answers while predictions run; never needs the API key."""
        return {"status": "ok", "model": predictor.name, "uptime_s": round(time.monotonic() - started, 3),
                "pending": service.pending, "upload_bytes_buffered": budget.used}

    @app.get("/v1/model", response_model=ModelInfo, dependencies=v1_deps, responses=errors_doc, tags=["model"])
    async def get_model() -> dict[str, Any]:
        """The loaded model: weight id and sha256, operating point, validation metrics, model card."""
        return info

    predict_doc = {
        **errors_doc,
        408: {"model": ErrorBody, "description": "the upload stalled or took too long"},
        413: {"model": ErrorBody, "description": "file larger than the upload limit (or too many pixels)"},
        415: {"model": ErrorBody, "description": "not a JPEG, PNG or DICOM file, or not multipart/form-data"},
        422: {"model": ErrorBody, "description": "unreadable image, missing 'file' field or malformed body"},
        503: {"model": ErrorBody, "description": "the server is busy or the request could not be served in time"},
    }
    predict_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary", "description": "chest X-ray: JPEG, PNG or DICOM"}},
    }}}}}

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=v1_deps, responses=predict_doc,
              openapi_extra=predict_body, tags=["predict"])
    async def predict(
        request: Request,
        heatmap: bool = Query(False, description="add a Grad-CAM overlay (RGBA PNG, base64)"),
        preview: bool = Query(False, description="add the decoded image as a greyscale PNG (e.g. to show DICOM in a browser)"),
    ) -> JSONResponse:
        """Predict one chest X-ray sent as multipart field ``file`` (JPEG, PNG or DICOM)."""
        t_start = time.perf_counter()
        deadline = time.monotonic() + settings.request_timeout_s
        if service.pending >= settings.max_pending:
            raise ApiError(503, "busy", "too many requests in progress; retry shortly", {"Retry-After": "2"})
        service.pending += 1
        reservation: _Reservation | None = None
        try:
            declared = _content_length(request)
            body_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
            if declared is not None and declared > body_limit:
                raise ApiError(413, "payload_too_large", f"upload larger than the {settings.max_upload_mb:g} MB limit")
            want = min(declared if declared is not None else body_limit, body_limit)
            try:
                got = await budget.acquire(want, timeout=deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise ApiError(503, "busy", "the server is busy with other uploads; retry shortly", {"Retry-After": "5"}) from None
            reservation = _Reservation(budget, got, asyncio.get_running_loop())
            t_read = time.perf_counter()
            data, upload = await read_upload(request, settings, deadline)
            request.state.body_done = True
            read_ms = (time.perf_counter() - t_read) * 1000.0
            fmt = sniff_format(data, upload["filename"], upload["content_type"])
            if fmt is None:
                raise ApiError(415, "unsupported_media_type", "not a JPEG, PNG or DICOM file")
            n_bytes = len(data)
            fut = service.executor.submit(service.run, data, fmt, heatmap, preview, time.perf_counter())
            del data
            fut.add_done_callback(reservation.release_threadsafe)  # budget freed when the worker drops the bytes
            reservation = None
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                fut.cancel()
                raise ApiError(503, "timeout", f"the prediction could not be served within {settings.request_timeout_s:g} s",
                               {"Retry-After": "5"}) from None
        except ImageTooLargeError as e:
            raise ApiError(413, "image_too_large", e.reason) from None
        except UnsupportedFormatError as e:
            raise ApiError(415, "unsupported_media_type", e.reason) from None
        except ImageReadError as e:
            raise ApiError(422, "unreadable_image", e.reason) from None
        except PneumoscanError as e:
            raise ApiError(422, "unprocessable", str(e).splitlines()[0][:200]) from None
        finally:
            service.pending -= 1
            if reservation is not None:
                reservation.release()
        pred: Prediction = result["prediction"]
        timing = {"upload": read_ms, **result["timing"], "total": (time.perf_counter() - t_start) * 1000.0}
        body = {
            "request_id": request.state.request_id,
            "probability": pred.probability, "label": pred.label, "threshold": pred.threshold, "model": pred.model,
            "refused": pred.refused, "heatmap": result["heatmap"], "preview": result["preview"],
            "image": {**result["image"], "bytes": n_bytes},
            "timing_ms": {k: round(v, 2) for k, v in timing.items()},
            "extra": pred.extra,
        }
        _set_outcome(request, "refused" if pred.refused else "ok")
        return JSONResponse(_clean(body))

    # -- the page
    page_headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        body, media = static["index.html"]
        return Response(body, media_type=media, headers=page_headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        item = static.get(name)
        if item is None:
            raise ApiError(404, "not_found", "no such file")
        return Response(item[0], media_type=item[1], headers=page_headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        item = static.get("favicon.svg")
        if item is None:
            raise ApiError(404, "not_found", "no such file")
        return Response(item[0], media_type=item[1])

    return app


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "invalid Content-Length header") from None
    if n < 0:
        raise ApiError(400, "bad_request", "invalid Content-Length header")
    return n
