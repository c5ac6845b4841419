"""Settings and fixed limits of the web service."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.limits import DECODE_MEMORY, DECODE_TIMEOUT_S
from ..errors import ConfigError

#: Bytes of multipart framing (boundaries, part headers, small extra fields) allowed on top
#: of the file-size limit.
MULTIPART_OVERHEAD = 64 * 1024
#: Side of the heatmap and preview PNGs returned to clients (longest side, pixels).
OVERLAY_MAX_SIDE = 512
#: Largest model card returned by ``/v1/model`` (characters).
MODEL_CARD_MAX_CHARS = 64_000
#: File names of a model card looked up beside the checkpoint.
MODEL_CARD_NAMES = ("MODEL_CARD.md", "model_card.md", "MODEL_CARD.txt", "model_card.txt")
#: Image formats ``/v1/predict`` accepts.
ACCEPTED_FORMATS = ("JPEG", "PNG", "DICOM")
#: ``Host`` values a server accepts by default (plus the address it is bound to).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Bytes reserved up front for a chunked upload (no Content-Length); it grows as bytes arrive.
CHUNKED_RESERVE_STEP = 1 << 20
#: Grace before an upload's pace is checked while other uploads wait for the memory budget.
UPLOAD_CONTENDED_GRACE_S = 1.0
#: Content-Security-Policy of the browser page, its assets and ``/docs`` (Swagger UI, started by
#: ``static/docs.js``: no inline script or style): everything from this server.
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
        allowed_hosts: values of the ``Host`` header accepted (names or addresses, no port;
            ``"*"`` accepts any); others get 400. Guards a server without an API key against
            DNS rebinding.
        header_timeout_s: a request head must arrive in full within this time of the
            connection opening or of the previous response (idle and slow clients are closed).
        send_timeout_s: a client that does not read its response for this long is dropped.
        max_connections: open connections; past it the connection idle the longest is closed
            (503 at once when all are busy with requests).
        upload_min_rate_kb_s: slowest accepted upload pace (kB/s, averaged from the start of
            the body) once ``upload_grace_s`` has passed; slower uploads get 408. An upload
            with a declared length must also keep the pace that brings it in before the
            request deadline.
        upload_grace_s: seconds an upload may take before its pace is checked (shortened to
            ``UPLOAD_CONTENDED_GRACE_S`` while other uploads wait for the memory budget).
        decode_timeout_s: longest decode of one image (in a worker process that is killed
            after it); 422 after.
        decode_memory_mb: address-space limit of the decoding worker process (MB).
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
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    header_timeout_s: float = 5.0
    send_timeout_s: float = 30.0
    max_connections: int = 1024
    upload_min_rate_kb_s: float = 10.0
    upload_grace_s: float = 5.0
    decode_timeout_s: float = DECODE_TIMEOUT_S
    decode_memory_mb: float = DECODE_MEMORY / 1e6

    @property
    def max_upload_bytes(self) -> int:
        """The file-size limit in bytes."""
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_body_bytes(self) -> int:
        """The request-body limit in bytes: the file limit plus multipart framing."""
        return self.max_upload_bytes + MULTIPART_OVERHEAD

    @property
    def decode_memory_bytes(self) -> int:
        """The decoding worker's memory limit in bytes."""
        return int(self.decode_memory_mb * 1_000_000)

    @property
    def upload_memory_bytes(self) -> int:
        """The upload memory budget in bytes."""
        return int(self.upload_memory_mb * 1_000_000)

    def validate(self) -> None:
        """Raise :class:`~pneumoscan.errors.ConfigError` on impossible values."""
        if not self.max_upload_mb > 0:
            raise ConfigError(f"max_upload_mb must be > 0 (got {self.max_upload_mb})")
        if not self.upload_memory_mb > 0:
            raise ConfigError(f"upload_memory_mb must be > 0 (got {self.upload_memory_mb})")
        if self.request_timeout_s <= 0 or self.upload_idle_timeout_s <= 0:
            raise ConfigError("timeouts must be > 0 seconds")
        if min(self.header_timeout_s, self.send_timeout_s, self.upload_grace_s, self.decode_timeout_s) <= 0:
            raise ConfigError("timeouts must be > 0 seconds")
        if self.max_pending < 1 or self.inference_threads < 1 or self.max_connections < 1:
            raise ConfigError("max_pending, inference_threads and max_connections must be >= 1")
        if self.upload_min_rate_kb_s < 0 or self.decode_memory_mb <= 0:
            raise ConfigError("upload_min_rate_kb_s must be >= 0 and decode_memory_mb > 0")
        if not self.allowed_hosts:
            raise ConfigError("allowed_hosts must name at least one host (or '*')")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key must not be empty")
