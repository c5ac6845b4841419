"""The pneumoscan web service (FastAPI): :func:`create_app` and the route handlers.

Routes:

- ``POST /v1/predict`` — multipart field ``file`` (JPEG, PNG or DICOM) → probability, label,
  threshold, model, ``refused`` (not-a-chest-X-ray guard), optional Grad-CAM heatmap
  (``?heatmap=true``) and a preview of the decoded image (``?preview=true``), timing in ms.
- ``GET /v1/model`` — weight name and sha256, operating point, validation metrics, model card.
- ``GET /healthz`` — liveness; never blocked by running predictions, never needs the API key.
- ``GET /`` and ``/static/<file>`` — the browser page; ``/docs`` — OpenAPI docs (Swagger UI
  under a Content-Security-Policy). Every asset is served by pneumoscan itself, so the page
  and the docs work with no internet access. Every ``GET`` route answers ``HEAD`` too.

The rest of the service lives beside this module: :mod:`.settings` (limits),
:mod:`.schemas` (response models, JSON errors), :mod:`.upload` (streamed multipart reading
within a memory budget), :mod:`.service` (the thread pool running the model, ``/v1/model``)
and :mod:`.middleware` (request ids, Host check, ``HEAD``, one log line per request); :mod:`.server` runs it all
under uvicorn with connection-level limits (head and send deadlines, connection cap).

Every request has a deadline (``request_timeout_s``): a stalled upload gets 408, a request
that cannot be served in time 503. Errors are JSON ``{"error": <code>, "detail": <one
line>}``; bad input never gives 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..data.formats import sniff_format
from ..errors import ImageReadError, ImageTooLargeError, PneumoscanError, UnsupportedFormatError
from ..inference.predictor import Predictor
from ..utils.version import __version__
from .middleware import RequestContextMiddleware, set_outcome
from .schemas import (
    PREDICT_BODY, PREDICT_ERRORS, STATUS_CODES, V1_ERRORS, ApiError, Health, ModelInfo, PredictResponse, clean, error_response,
)
from .service import InferenceService, model_info
from .settings import ACCEPTED_FORMATS, PAGE_CSP, ServeSettings
from .upload import ByteBudget, read_upload, reserve_upload

log = logging.getLogger(__name__)

#: Routes open to everyone: liveness and the browser page.
router = APIRouter()
#: The ``/v1`` API (behind the API key when the server has one).
v1 = APIRouter()


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
    app = FastAPIOffline(  # serves Swagger UI's files at /docs-assets; the /docs page is ours (CSP, no inline script)
        title="pneumoscan", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None,
        static_url="/docs-assets",
        description="Pneumonia detection on chest X-rays. Research software: not a medical device; every result "
                    "needs review by a qualified clinician.",
    )
    service = InferenceService(predictor, settings)
    app.state.predictor = predictor
    app.state.settings = settings
    app.state.service = service
    app.state.budget = ByteBudget(settings.upload_memory_bytes)
    app.state.static = load_static()
    app.state.started = time.monotonic()
    app.state.model_info = model_info(predictor, settings, service)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"], allow_credentials=False)
    app.add_middleware(RequestContextMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    app.include_router(v1, dependencies=[Depends(require_api_key)] if settings.api_key else [])
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the decoding workers and log what is served at start-up; stop the inference
    threads at shutdown."""
    predictor, settings = app.state.predictor, app.state.settings
    await asyncio.to_thread(app.state.service.warm_up)
    log.info("serving %s (threshold %.3f); uploads up to %g MB; API key %s; CORS %s; hosts %s", predictor.name,
             predictor.threshold, settings.max_upload_mb, "required" if settings.api_key else "off",
             ", ".join(settings.cors_origins) or "off", ", ".join(settings.allowed_hosts))
    yield
    app.state.service.shutdown()


# ----------------------------------------------------------------------------- errors: always {"error", "detail"} JSON
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    set_outcome(request, exc.code)
    headers = dict(exc.headers)
    if request.method == "POST" and not getattr(request.state, "body_done", False):
        # the body was not read to its end (too large, stalled, unauthorised, ...): close
        # the connection instead of reading and discarding the rest of it
        headers["Connection"] = "close"
    return error_response(exc.status, exc.code, exc.detail, headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = STATUS_CODES.get(exc.status_code, "http_error")
    set_outcome(request, code)
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()))
    set_outcome(request, "invalid_request")
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}"[:200])


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away before its request was read: nobody to answer, nothing went
    wrong here; the request's log line says so (status 499, as nginx logs it)."""
    set_outcome(request, "client_disconnected")
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    rid = getattr(request.state, "request_id", "?")
    log.error("request id=%s internal error: %s", rid, exc.__class__.__name__, exc_info=(type(exc), exc, exc.__traceback__))
    set_outcome(request, "internal_error")
    return error_response(500, "internal_error", f"internal server error (request id {rid})")


def _as_api_error(e: PneumoscanError) -> ApiError:
    """The HTTP answer to an image the service could not process."""
    if isinstance(e, ImageTooLargeError):
        return ApiError(413, "image_too_large", e.reason)
    if isinstance(e, UnsupportedFormatError):
        return ApiError(415, "unsupported_media_type", e.reason)
    if isinstance(e, ImageReadError):
        return ApiError(422, "unreadable_image", e.reason)
    return ApiError(422, "unprocessable", str(e).splitlines()[0][:200])


# ----------------------------------------------------------------------------- API key
_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (or send Authorization: Bearer <key>)")
_BEARER = HTTPBearer(auto_error=False, description="API key as a bearer token")


async def require_api_key(
    request: Request, key: str | None = Security(_KEY_HEADER), cred: HTTPAuthorizationCredentials | None = Security(_BEARER),
) -> None:
    """Dependency of the ``/v1`` routes when the server has an API key: 401 unless the
    request carries it (``X-API-Key`` or ``Authorization: Bearer``)."""
    supplied = key or (cred.credentials if cred is not None else None)
    expected = request.app.state.settings.api_key or ""
    if not supplied or not hmac.compare_digest(supplied.encode("utf-8"), expected.encode("utf-8")):
        raise ApiError(401, "unauthorized", "a valid API key is required (X-API-Key header or Authorization: Bearer)",
                       {"WWW-Authenticate": 'Bearer realm="pneumoscan"'})


# ----------------------------------------------------------------------------- routes
@router.get("/healthz", response_model=Health, tags=["service"])
async def healthz(request: Request) -> dict[str, Any]:
    """Liveness: answers while predictions run; never needs the API key."""
    st = request.app.state
    return {"status": "ok", "model": st.predictor.name, "uptime_s": round(time.monotonic() - st.started, 3),
            "pending": st.service.pending, "upload_bytes_buffered": st.budget.used}


@v1.get("/v1/model", response_model=ModelInfo, responses=V1_ERRORS, tags=["model"])
async def get_model(request: Request) -> dict[str, Any]:
    """The loaded model: weight id and sha256, operating point, validation metrics, model card."""
    return request.app.state.model_info


@v1.post("/v1/predict", response_model=PredictResponse, responses=PREDICT_ERRORS, openapi_extra=PREDICT_BODY, tags=["predict"])
async def predict(
    request: Request,
    heatmap: bool = Query(False, description="add a Grad-CAM overlay (RGBA PNG, base64)"),
    preview: bool = Query(False, description="add the decoded image as a greyscale PNG (e.g. to show DICOM in a browser)"),
) -> JSONResponse:
    """Predict one chest X-ray sent as multipart field ``file`` (JPEG, PNG or DICOM)."""
    t_start = time.perf_counter()
    settings, service = request.app.state.settings, request.app.state.service
    deadline = time.monotonic() + settings.request_timeout_s
    if service.pending >= settings.max_pending:
        raise ApiError(503, "busy", "too many requests in progress; retry shortly", {"Retry-After": "2"})
    service.pending += 1
    try:
        result = await _read_and_predict(request, deadline, heatmap, preview)
    except PneumoscanError as e:
        raise _as_api_error(e) from None
    finally:
        service.pending -= 1
    pred = result["prediction"]
    timing = {"upload": result["read_ms"], **result["timing"], "total": (time.perf_counter() - t_start) * 1000.0}
    body = {
        "request_id": request.state.request_id,
        "probability": pred.probability, "label": pred.label, "threshold": pred.threshold, "model": pred.model,
        "refused": pred.refused, "heatmap": result["heatmap"], "preview": result["preview"],
        "image": {**result["image"], "bytes": result["bytes"]},
        "timing_ms": {k: round(v, 2) for k, v in timing.items()},
        "extra": pred.extra,
        "warnings": pred.warnings,
    }
    set_outcome(request, "refused" if pred.refused else "ok")
    return JSONResponse(clean(body))


async def _read_and_predict(request: Request, deadline: float, heatmap: bool, preview: bool) -> dict[str, Any]:
    """Reserve upload memory, read the file, run the prediction job; the reserved bytes are
    freed when the worker has dropped the file. Returns the job's result plus ``read_ms`` and
    ``bytes``."""
    st = request.app.state
    reservation = await reserve_upload(request, st.settings, st.budget, deadline)
    try:
        t_read = time.perf_counter()
        data, upload = await read_upload(request, st.settings, reservation, deadline)
        request.state.body_done = True
        read_ms = (time.perf_counter() - t_read) * 1000.0
        fmt = sniff_format(data)  # the content decides, never the client's file name or media type
        if fmt not in ACCEPTED_FORMATS:
            raise ApiError(415, "unsupported_media_type", "not a JPEG, PNG or DICOM file")
        n_bytes = len(data)
        fut = st.service.submit(data, fmt, heatmap, preview)
        del data
        fut.add_done_callback(reservation.release_threadsafe)  # budget freed when the worker drops the bytes
    except BaseException:
        reservation.release()
        raise
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        fut.cancel()
        raise ApiError(503, "timeout", f"the prediction could not be served within {st.settings.request_timeout_s:g} s",
                       {"Retry-After": "5"}) from None
    return {**result, "read_ms": read_ms, "bytes": n_bytes}


# ----------------------------------------------------------------------------- the page
_PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
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


def _static(request: Request, name: str) -> tuple[bytes, str]:
    """A loaded asset as ``(bytes, media type)``; 404 for any other name."""
    item = request.app.state.static.get(name)
    if item is None:
        raise ApiError(404, "not_found", "no such file")
    return item


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    """The browser page."""
    body, media = request.app.state.static["index.html"]
    return Response(body, media_type=media, headers=_PAGE_HEADERS)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> Response:
    """The API documentation: Swagger UI from ``/docs-assets``, started by ``/static/docs.js``
    (no inline script, so the page's CSP allows scripts from this server only)."""
    body, media = request.app.state.static["docs.html"]
    return Response(body, media_type=media, headers=_PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static_file(request: Request, name: str) -> Response:
    """One of the page's assets (only files loaded by :func:`load_static`)."""
    body, media = _static(request, name)
    return Response(body, media_type=media, headers=_PAGE_HEADERS)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon(request: Request) -> Response:
    """The page's icon, for browsers that ask for ``/favicon.ico``."""
    body, media = _static(request, "favicon.svg")
    return Response(body, media_type=media)
