"""The HTTP server under the service: uvicorn with connection-level limits.

uvicorn alone has no deadline on reading a request head: its keep-alive timer is armed only
after a response and is cancelled by every byte received, so a connection that never sends
anything, or trickles its head a byte at a time, is held for ever. Its ``limit_concurrency``
counts *open connections*, idle ones included, so a thousand silent sockets make every request
(``/healthz`` too) answer 503. :class:`GuardedH11Protocol` is uvicorn's h11 protocol with:

- a **head deadline**: a request head must arrive in full within ``header_timeout_s`` of the
  connection opening or of the previous response ending; the deadline is absolute (trickled
  bytes do not extend it). Idle, silent and slow-header connections are closed (408 when part
  of a head had arrived). After a response, an unread request body cannot keep the connection
  open either.
- a **send deadline**: a client that does not read its response for ``send_timeout_s`` is
  dropped.
- a **connection cap** that counts connections, not requests: past ``max_connections`` the
  connection that has waited longest for a request head is closed to make room; only when every
  connection is busy with a request is a newcomer answered 503 at once. uvicorn's own
  ``limit_concurrency`` is not used; ``/v1/predict`` bounds its requests itself
  (``max_pending``).

Request bodies are the application's business (:mod:`.upload`: idle timeout, minimum pace,
request deadline).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeSettings

log = logging.getLogger(__name__)

#: File descriptors kept free for everything but client connections (model files, threads, logs).
FD_RESERVE = 128


def _canned(status: int, reason: str, code: str, detail: str, extra: str = "") -> bytes:
    body = ('{"error": "%s", "detail": "%s"}' % (code, detail)).encode("ascii")
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


#: Answer to a connection whose request head did not arrive in time.
RESPONSE_408 = _canned(408, "Request Timeout", "request_timeout", "the request head did not arrive in time")
#: Answer to a connection beyond the cap when every open connection is busy with a request.
RESPONSE_503 = _canned(503, "Service Unavailable", "busy", "too many connections; retry shortly", "retry-after: 2\r\n")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, a send deadline and a connection cap
    (see the module's docstring). Use :func:`protocol_class` to bind it to settings."""

    settings: ClassVar[ServeSettings]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        self._head_bytes = 0

    # --------------------------------------------------------------- connection life
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()
        if len(self.connections) > self.settings.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def _make_room(self) -> None:
        """Close the connection that has waited longest for a request head; when every
        other connection is busy with a request, refuse this one with 503."""
        oldest: GuardedH11Protocol | None = None
        for conn in self.connections:
            if (conn is not self and isinstance(conn, GuardedH11Protocol) and conn._head_timer is not None
                    and (oldest is None or conn._waiting_since < oldest._waiting_since)):
                oldest = conn
        if oldest is not None:
            oldest._close_waiting(answer=False)
        else:
            self._cancel_head_timer()
            self.transport.write(RESPONSE_503)
            self.transport.close()

    # --------------------------------------------------------------- head deadline
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._waiting_since = self.loop.time()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.settings.header_timeout_s, self._close_waiting)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _close_waiting(self, answer: bool = True) -> None:
        """Close a connection still waiting for a request head; with ``answer``, send 408
        first when part of a head had arrived."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if answer and self._head_bytes and self.conn.our_state is h11.IDLE:
            self.transport.write(RESPONSE_408)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was parsed
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_timer()  # before super(): a pipelined request parsed there disarms it
        super().on_response_complete()

    # --------------------------------------------------------------- send deadline
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.settings.send_timeout_s, self._drop_slow_reader)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _drop_slow_reader(self) -> None:
        self._send_timer = None
        log.info("dropped a client that did not read its response for %g s", self.settings.send_timeout_s)
        self.transport.abort()


def protocol_class(settings: ServeSettings) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` bound to ``settings`` (a new class per server).

    Args:
        settings: the service's settings (head and send deadlines, connection cap).
    """
    return type("PneumoscanH11Protocol", (GuardedH11Protocol,), {"settings": settings})


def ensure_fd_limit(settings: ServeSettings) -> None:
    """Raise the soft limit on open files so that ``max_connections`` sockets fit; when the
    hard limit is lower, lower ``max_connections`` (with a warning): a server out of file
    descriptors stops accepting connections, ``/healthz`` included.

    Args:
        settings: the service's settings (``max_connections`` may be lowered).
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = settings.max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fit = max(1, soft - FD_RESERVE)
        log.warning("only %d open files allowed: serving at most %d connections (not %d)", soft, fit, settings.max_connections)
        settings.max_connections = fit


def build_server(app: Any, settings: ServeSettings | None = None, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``app`` with :class:`GuardedH11Protocol` (call ``.run(sockets=[sock])``
    on a bound socket, or ``.serve(...)`` from a running event loop).

    Args:
        app: the ASGI application (:func:`~pneumoscan.serving.create_app`).
        settings: connection limits; default: the app's own (``app.state.settings``).
        log_level: uvicorn's log level.
    """
    settings = settings or app.state.settings
    ensure_fd_limit(settings)
    config = uvicorn.Config(
        app, http=protocol_class(settings), ws="none", lifespan="on", log_level=log_level, access_log=False,
        timeout_keep_alive=settings.header_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=None, backlog=max(2048, settings.max_connections), timeout_graceful_shutdown=10,
        server_header=False, date_header=True,
    )
    return uvicorn.Server(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (``port`` 0: any free port).

    Args:
        host: address or name to bind.
        port: TCP port.

    Raises:
        OSError: the address cannot be bound.
        socket.gaierror: ``host`` does not resolve.
    """
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
