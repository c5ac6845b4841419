"""Per-request context: the Host check, ``HEAD``, request ids, security headers and one log
line per request.

A request's log line carries its id, method, route, bytes received, status, latency and
outcome only: never the uploaded image or its file name. Control characters in logged values
are escaped (a path with ``%0a`` cannot forge a log line).
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

from starlette.requests import Request

from ..utils.text import safe_text
from .schemas import error_response

# request lines keep the logger name they had before the service was split into modules
log = logging.getLogger("pneumoscan.serving.app")

#: Request ids accepted from clients (``X-Request-ID``); others are replaced by a fresh one.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Headers added to every response.
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


def request_id(scope: dict[str, Any]) -> str:
    """The client's ``X-Request-ID`` when it is a safe token, else a new 16-hex-digit id.

    Args:
        scope: the ASGI scope of an HTTP request.
    """
    rid = None
    for k, v in scope.get("headers", []):
        if k == b"x-request-id":
            cand = v.decode("latin-1")
            rid = cand if REQUEST_ID_RE.match(cand) else None
    return rid or uuid.uuid4().hex[:16]


def route_label(path: str) -> str:
    """The path for the log: control characters escaped, shortened (unknown paths could
    carry anything).

    Args:
        path: the request path (percent-decoded).
    """
    return safe_text(path, limit=64)


def host_name(scope: dict[str, Any]) -> str | None:
    """The request's ``Host`` header without its port, lower-case, or None when absent.

    Args:
        scope: the ASGI scope of an HTTP request.
    """
    for k, v in scope.get("headers", []):
        if k == b"host":
            host = v.decode("latin-1").strip().lower()
            if host.startswith("["):  # [v6 address]:port
                return host[1:host.find("]")] if "]" in host else host
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request for ``host`` is served (requests without a Host header are: they do
    not come from a browser).

    Args:
        host: :func:`host_name` of the request.
        allowed: accepted names and addresses (``"*"``: any).
    """
    return host is None or "*" in allowed or host.rstrip(".") in allowed


def set_outcome(request: Request, outcome: str) -> None:
    """Record how a request ended (an error code, ``ok`` or ``refused``) for its log line.

    Args:
        request: the request.
        outcome: short code.
    """
    request.state.outcome = outcome


class RequestContextMiddleware:
    """Pure ASGI middleware: 400 for a ``Host`` not served here, ``HEAD`` answered as ``GET``
    without the body, request id, security headers, one log line per request (id, method,
    route, bytes received, status, latency, outcome; never the body or file name).

    Args:
        app: the wrapped ASGI application.
        allowed_hosts: ``Host`` values served (see :func:`host_allowed`).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], allowed_hosts: tuple[str, ...] = ("*",)) -> None:
        self.app = app
        self.allowed_hosts = tuple(h.lower().strip("[]").rstrip(".") for h in allowed_hosts)

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Awaitable[dict[str, Any]]], send: Callable[..., Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        counters = {"in": 0, "status": 0}
        method = scope.get("method", "")
        app = self.app
        if not host_allowed(host_name(scope), self.allowed_hosts):
            state["outcome"] = "bad_host"
            app = error_response(400, "bad_host", "this server does not answer for that Host name (see --allowed-host)",
                                 {"Connection": "close"})
        elif method == "HEAD":
            scope = dict(scope, method="GET")  # the GET route answers; its body is dropped below

        async def receive_counted() -> dict[str, Any]:
            msg = await receive()
            if msg["type"] == "http.request":
                counters["in"] += len(msg.get("body", b""))
            return msg

        async def send_with_headers(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                counters["status"] = msg["status"]
                headers = list(msg.get("headers", []))
                headers += [(b"x-request-id", rid.encode()), *SECURITY_HEADERS]
                msg = dict(msg, headers=headers)
            elif msg["type"] == "http.response.body" and method == "HEAD":
                msg = dict(msg, body=b"")
            await send(msg)

        try:
            await app(scope, receive_counted, send_with_headers)
        finally:
            ms = (time.perf_counter() - start) * 1000.0
            outcome = state.get("outcome") or ("ok" if 0 < counters["status"] < 400 else "error")
            lvl = logging.DEBUG if scope.get("path") == "/healthz" else logging.INFO
            log.log(lvl, "request id=%s method=%s path=%s bytes_in=%d status=%d latency_ms=%.1f outcome=%s",
                    rid, safe_text(method), route_label(scope.get("path", "")), counters["in"], counters["status"], ms, outcome)
