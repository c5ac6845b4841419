"""What the service answers: the JSON error type, the response models of the OpenAPI schema
and the documented error responses of each route."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..core.labels import CLASS_NAMES

#: Error code of each HTTP status raised by FastAPI/Starlette itself (404 route, 405, ...).
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "unprocessable", 503: "unavailable"}


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


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer ``{"error": code, "detail": detail}``.

    Args:
        status: HTTP status code.
        code: short machine-readable error code.
        detail: one human-readable line.
        headers: extra response headers.
    """
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars → Python, NaN/inf → None, small arrays → lists.

    Args:
        obj: dicts, lists, tuples, arrays and scalars, nested.
    """
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist()) if obj.size <= 64 else None
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


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
    label: str | None = Field(
        description=f"{CLASS_NAMES[1]} or {CLASS_NAMES[0]} at the model's operating threshold (null when refused)")
    threshold: float
    model: str
    refused: str | None = Field(None, description="why the input was refused as not a chest X-ray")
    heatmap: Heatmap | None = Field(None, description="Grad-CAM overlay (colour-mapped RGBA PNG, same aspect as the image)")
    preview: PngImage | None = Field(None, description="the decoded image as pneumoscan read it (greyscale PNG)")
    image: ImageInfo
    timing_ms: dict[str, float]
    extra: dict[str, Any] = Field(default_factory=dict, description="additional fields (e.g. guard score, shift score)")
    warnings: list[str] = Field(default_factory=list, description="what the reader of this answer must know, e.g. that the "
                                "image is unlike those the model was validated on (empty when there is nothing to say)")


class OperatingCurve(BaseModel):
    source: str = Field(description="what the figures were measured on (the model's validation or site-calibration images)")
    n: dict[str, int] = Field(description="images per class")
    thresholds: list[float] = Field(description="increasing thresholds on the calibrated probability (the operating one included)")
    sensitivity: list[float] = Field(description="sensitivity at each threshold (PNEUMONIA when probability >= threshold)")
    specificity: list[float] = Field(description="specificity at each threshold")


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
    operating_curve: OperatingCurve | None = Field(None, description="validation sensitivity/specificity by threshold")
    shift: dict[str, Any] | None = Field(None, description="the distribution-shift check: threshold, population, flag rate")
    capabilities: dict[str, bool]
    limits: dict[str, Any]
    version: str


class Health(BaseModel):
    status: str
    model: str
    uptime_s: float
    pending: int
    upload_bytes_buffered: int


# ----------------------------------------------------------------------------- documented errors (OpenAPI)
#: Errors of every ``/v1`` route.
V1_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong API key (only when the server has one)"},
}
#: Errors of ``POST /v1/predict``.
PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **V1_ERRORS,
    408: {"model": ErrorBody, "description": "the upload stalled or took too long"},
    413: {"model": ErrorBody, "description": "file larger than the upload limit (or too many pixels)"},
    415: {"model": ErrorBody, "description": "not a JPEG, PNG or DICOM file, or not multipart/form-data"},
    422: {"model": ErrorBody, "description": "unreadable image, missing 'file' field or malformed body"},
    503: {"model": ErrorBody, "description": "the server is busy or the request could not be served in time"},
}
#: The request body of ``POST /v1/predict`` (read by hand, so described by hand).
PREDICT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "chest X-ray: JPEG, PNG or DICOM"}},
}}}}}
