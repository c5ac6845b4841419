"""Reading uploads with bounded memory.

The request body is read in chunks by a streaming multipart parser and reading stops as soon
as the size limit is passed (413); nothing is spooled to disk. Buffered upload bytes of all
requests together are bounded by a :class:`ByteBudget`. A request reserves its declared
Content-Length before reading (:func:`reserve_upload`), so that an admitted upload can always
finish and requests beyond the budget wait, unread, in the kernel's socket buffers; a chunked
upload (no declared length) reserves a small step and grows its reservation as bytes arrive.

A reservation cannot be squatted: every upload must keep a minimum pace (:class:`UploadPace`),
and one with a declared length the pace that brings it in before its deadline, so holding
N bytes of the budget costs sending them. Slower uploads get 408, after a grace period that
is short while other uploads wait for the budget.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from .schemas import ApiError
from .settings import CHUNKED_RESERVE_STEP, UPLOAD_CONTENDED_GRACE_S, ServeSettings

#: Longest sleep of an upload waiting for its next chunk before its pace is checked again.
PACE_POLL_S = 0.5


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

    @property
    def waiting(self) -> int:
        """Requests waiting for bytes."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    async def acquire(self, n: int, timeout: float, first: bool = False) -> int:
        """Reserve ``n`` bytes (capped at capacity), waiting at most ``timeout`` seconds.

        Args:
            n: bytes wanted.
            timeout: seconds to wait for them.
            first: wait ahead of the queue (an upload already being read grows its
                reservation before new uploads are admitted, so admitted uploads finish).

        Returns:
            The bytes reserved.

        Raises:
            asyncio.TimeoutError: not granted in time.
        """
        n = min(int(n), self.capacity)
        if (first or not self._waiters) and self.used + n <= self.capacity:
            self.used += n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        if first:
            self._waiters.appendleft(entry)
        else:
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


class Reservation:
    """Bytes held in a :class:`ByteBudget` by one request, released exactly once (from the
    event loop, also when the release is triggered by a worker thread).

    Args:
        budget: the budget the bytes were acquired from.
        n: bytes held.
        loop: the event loop the budget lives on.
    """

    def __init__(self, budget: ByteBudget, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.budget, self.n, self.loop, self._done = budget, n, loop, False

    def release(self) -> None:
        """Give the bytes back (no-op after the first call)."""
        if not self._done:
            self._done = True
            self.budget.release(self.n)

    async def grow(self, n: int, timeout: float) -> None:
        """Hold ``n`` more bytes, ahead of uploads waiting to be admitted.

        Args:
            n: bytes wanted.
            timeout: seconds to wait for them.

        Raises:
            ApiError: 503 when the bytes are not granted in time.
        """
        try:
            self.n += await self.budget.acquire(n, timeout, first=True)
        except asyncio.TimeoutError:
            raise ApiError(503, "busy", "the server is busy with other uploads; retry shortly", {"Retry-After": "5"}) from None

    def trim(self, n: int) -> None:
        """Keep only ``n`` bytes (e.g. the file once the body has been read), give back the rest.

        Args:
            n: bytes still held.
        """
        if not self._done and n < self.n:
            self.budget.release(self.n - n)
            self.n = n

    def release_threadsafe(self, *_: Any) -> None:
        """:meth:`release` from any thread (usable as a future's done callback)."""
        self.loop.call_soon_threadsafe(self.release)


async def reserve_upload(request: Request, settings: ServeSettings, budget: ByteBudget, deadline: float) -> Reservation:
    """Reserve the bytes a request's body needs: its Content-Length, or a first step of a
    chunked body (grown by :func:`read_upload` as bytes arrive).

    Args:
        request: the incoming request (its body not yet read).
        settings: limits.
        budget: the service's upload memory budget.
        deadline: ``time.monotonic()`` by which the reservation must be granted.

    Raises:
        ApiError: 400 invalid Content-Length, 413 declared body too large, 503 budget busy
            until the deadline.
    """
    declared = content_length(request)
    body_limit = settings.max_body_bytes
    if declared is not None and declared > body_limit:
        raise ApiError(413, "payload_too_large", f"upload larger than the {settings.max_upload_mb:g} MB limit")
    want = min(declared if declared is not None else CHUNKED_RESERVE_STEP, body_limit)
    try:
        got = await budget.acquire(want, timeout=deadline - time.monotonic())
    except asyncio.TimeoutError:
        raise ApiError(503, "busy", "the server is busy with other uploads; retry shortly", {"Retry-After": "5"}) from None
    return Reservation(budget, got, asyncio.get_running_loop())


def content_length(request: Request) -> int | None:
    """The request's declared body size, or None when it declares none.

    Raises:
        ApiError: 400 when the header is not a non-negative integer.
    """
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


# ----------------------------------------------------------------------------- multipart parsing
@dataclass
class _PartState:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field_name: bytes = b""
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class _TooLarge(Exception):
    pass


class _FilePartCollector:
    """Callbacks of :class:`MultipartParser` that keep the first ``file`` part in memory.

    Args:
        limit: largest file accepted (bytes); :class:`_TooLarge` is raised past it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.part = _PartState()
        self.chunks: list[bytes] = []
        self.size = 0
        self.filename: str | None = None
        self.content_type: str | None = None
        self.found = self.file_done = self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end, "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.part = _PartState()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        part = self.part
        part.headers[bytes(part.header_field).strip().lower()] = bytes(part.header_value).strip()
        part.header_field.clear()
        part.header_value.clear()

    def on_headers_finished(self) -> None:
        part = self.part
        _, disp = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.field_name = disp.get(b"name", b"")
        if part.field_name == b"file" and not self.found:
            self.found = part.is_file = True
            fn = disp.get(b"filename")
            self.filename = fn.decode("utf-8", "replace") if fn is not None else None
            ct = part.headers.get(b"content-type")
            self.content_type = ct.decode("latin-1").lower() if ct else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.is_file:
            self.size += end - start
            if self.size > self.limit:
                raise _TooLarge()
            self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self.part.is_file:
            self.file_done = True

    def on_end(self) -> None:
        self.ended = True


class UploadPace:
    """How fast an upload must arrive: from the start of its body, at least
    ``upload_min_rate_kb_s`` on average, and for a declared length the pace that brings the
    whole body in before the request deadline; checked once ``upload_grace_s`` has passed
    (:data:`UPLOAD_CONTENDED_GRACE_S` while other uploads wait for the budget).

    Args:
        settings: the pace limits.
        budget: the upload budget (its queue shortens the grace).
        declared: the body's Content-Length, None for a chunked body.
        deadline: ``time.monotonic()`` of the request deadline.
    """

    def __init__(self, settings: ServeSettings, budget: ByteBudget, declared: int | None, deadline: float) -> None:
        self.start = time.monotonic()
        self.deadline = deadline
        self.budget = budget
        self.grace = settings.upload_grace_s
        floor = settings.upload_min_rate_kb_s * 1000.0
        self.rate = max(floor, declared / max(deadline - self.start, 1e-3)) if declared else floor

    def check(self, received: int, now: float) -> None:
        """Raise 408 when the upload is past its deadline or behind its pace.

        Args:
            received: body bytes received so far.
            now: ``time.monotonic()``.
        """
        if now >= self.deadline:
            raise ApiError(408, "request_timeout", "the upload took too long")
        elapsed = now - self.start
        grace = min(self.grace, UPLOAD_CONTENDED_GRACE_S) if self.budget.waiting else self.grace
        if elapsed > grace and received < self.rate * elapsed:
            raise ApiError(408, "request_timeout", f"the upload is too slow ({received / elapsed / 1000:.1f} kB/s; "
                                                   f"this one needs at least {self.rate / 1000:.1f} kB/s)")


async def _chunks(request: Request, pace: UploadPace, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body in chunks, checked against ``pace``, an idle timeout between chunks
    and the request deadline.

    Raises:
        ApiError: 408 stalled, too slow or past the deadline.
        ClientDisconnect: the client went away.
    """
    received = 0
    last = time.monotonic()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            now = time.monotonic()
            pace.check(received, now)
            if now - last >= idle_timeout:
                raise ApiError(408, "request_timeout", "the upload stalled")
            if pending is None:
                pending = asyncio.ensure_future(request.receive())
            wait = min(PACE_POLL_S, idle_timeout - (now - last), pace.deadline - now)
            done, _ = await asyncio.wait({pending}, timeout=max(wait, 0.0))
            if not done:
                continue
            message, pending = pending.result(), None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                received += len(chunk)
                last = time.monotonic()
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        if pending is not None:
            pending.cancel()


def _boundary(request: Request) -> bytes:
    """The multipart boundary of the request's Content-Type (415/422 when there is none)."""
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
    return boundary


async def read_upload(request: Request, settings: ServeSettings, reservation: Reservation, deadline: float) -> tuple[bytes, dict[str, Any]]:
    """Stream a multipart body, keep the first ``file`` part in memory and stop reading as
    soon as the size limit is passed.

    Args:
        request: the incoming request (its body not yet read).
        settings: limits and timeouts.
        reservation: the request's bytes in the upload budget (grown for a chunked body as
            bytes arrive, trimmed to the file's size at the end).
        deadline: ``time.monotonic()`` by which the body must have arrived.

    Returns:
        The file's bytes and a dict with ``filename``, ``content_type`` and ``body_bytes``.

    Raises:
        ApiError: 413 too large, 415 not multipart, 422 malformed or no ``file`` field,
            408 stalled or too slow upload, 503 no budget to grow a chunked upload.
        ClientDisconnect: the client went away.
    """
    body_limit = settings.max_body_bytes
    declared = content_length(request)
    collector = _FilePartCollector(settings.max_upload_bytes)
    parser = MultipartParser(_boundary(request), collector.callbacks())
    too_large = ApiError(413, "payload_too_large", f"upload larger than the {settings.max_upload_mb:g} MB limit")
    pace = UploadPace(settings, reservation.budget, declared, deadline)
    received = 0
    try:
        async for chunk in _chunks(request, pace, settings.upload_idle_timeout_s):
            received += len(chunk)
            if received > body_limit:
                raise too_large
            if received > reservation.n:  # a chunked body: hold the next step before keeping the bytes
                step = min(max(CHUNKED_RESERVE_STEP, received - reservation.n), body_limit - reservation.n)
                t_wait = time.monotonic()
                await reservation.grow(step, timeout=min(settings.upload_idle_timeout_s, deadline - t_wait))
                pace.start += time.monotonic() - t_wait  # our wait is not the client's slowness
            parser.write(chunk)
            if collector.ended:
                break
        parser.finalize()
    except _TooLarge:
        raise too_large from None
    except MultipartParseError as e:
        raise ApiError(422, "malformed_body", f"malformed multipart body ({str(e).splitlines()[0][:120]})") from None
    if not collector.found:
        raise ApiError(422, "missing_file", "no 'file' field in the form (send the image as multipart field 'file')")
    if not collector.file_done:
        raise ApiError(422, "malformed_body", "the multipart body ended before the file did")
    data = b"".join(collector.chunks)
    collector.chunks.clear()
    reservation.trim(len(data))
    if not data:
        raise ApiError(422, "empty_file", "the uploaded file is empty (0 bytes)")
    return data, {"filename": collector.filename, "content_type": collector.content_type, "body_bytes": received}

