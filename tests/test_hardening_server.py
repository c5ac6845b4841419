"""Hardening of the network service (issue 14): a real server (``serving.server.build_server``,
as ``pneumoscan serve`` runs it) on 127.0.0.1 with an ephemeral port, attacked from loopback.

Every loop is bounded in count and time: 200 idle sockets, a trickle of a few bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from hostile import png_bytes

from pneumoscan.cli.serve import _api_key, _allowed_hosts
from pneumoscan.data.decode_pool import default_pool
from pneumoscan.errors import ConfigError
from pneumoscan.inference import Predictor, load_predictor
from pneumoscan.serving import ServeSettings, create_app
from pneumoscan.serving.server import bind_socket, build_server

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """The shipped default model (loads in seconds; no training)."""
    return load_predictor(None)


@pytest.fixture(scope="module")
def xray(xray_dir: Path) -> bytes:
    """A normal chest X-ray JPEG."""
    return next(iter(sorted((xray_dir / "val" / "NORMAL").glob("*.jpeg")))).read_bytes()


class Server:
    """The app under :func:`build_server` in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, predictor: Predictor, **settings: Any) -> None:
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(predictor, ServeSettings(**settings))
        self.server = build_server(self.app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def raw(self, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes; (status, headers, body) of the answer."""
        with self.connect(timeout) as s:
            s.sendall(request)
            data = _read_all(s, timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1]) if lines[0].startswith("HTTP/") else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        return status, headers, body


def _read_all(s: socket.socket, timeout: float) -> bytes:
    """Everything until the server closes (or ``timeout``)."""
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (without waiting)."""
    s.setblocking(False)
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _get(port: int, path: str, host: str = "127.0.0.1", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1")


class LogLines(logging.Handler):
    """Records of the ``pneumoscan`` and ``uvicorn`` loggers while in use (INFO and up)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(n) for n in ("pneumoscan", "uvicorn", "uvicorn.error")]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "LogLines":
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self)
            lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self)
            lg.setLevel(level)

    def request_lines(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage().startswith("request id=")]


def _multipart_head(port: int, length: int | None, boundary: str = "bnd") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"{framing}\r\n\r\n").encode("latin-1")


PART_HEAD = b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\nContent-Type: image/jpeg\r\n\r\n'


# ----------------------------------------------------------------------------- idle and half-sent connections
def test_healthz_answers_while_idle_sockets_are_open(predictor: Predictor) -> None:
    """200 silent sockets against a cap of 150 connections: /healthz keeps answering 200 at
    once (the longest-idle connections make room), and every silent socket is closed by the
    server within the head timeout."""
    with Server(predictor, max_connections=150, header_timeout_s=2.0) as srv:
        idle = [srv.connect() for _ in range(200)]
        try:
            t_open = time.monotonic()
            latencies = []
            for _ in range(5):
                t0 = time.perf_counter()
                status, _, body = srv.raw(_get(srv.port, "/healthz"), timeout=5)
                latencies.append(time.perf_counter() - t0)
                assert status == 200 and json.loads(body)["status"] == "ok"
                time.sleep(0.1)
            assert max(latencies) < 1.0, latencies
            deadline = t_open + 2.0 + 3.0
            while time.monotonic() < deadline and not all(_closed_by_server(s) for s in idle):
                time.sleep(0.2)
            still_open = sum(not _closed_by_server(s) for s in idle)
            assert still_open == 0, f"{still_open} silent sockets still open {time.monotonic() - t_open:.1f} s later"
            assert srv.raw(_get(srv.port, "/healthz"))[0] == 200
        finally:
            for s in idle:
                s.close()


def test_slow_header_client_is_dropped(predictor: Predictor) -> None:
    """A request head trickled a byte every 0.25 s is cut at the head deadline (1.5 s) with
    408, however steadily the bytes come; so is a body trickled after a response."""
    with Server(predictor, header_timeout_s=1.5) as srv, srv.connect() as s:
        head = _get(srv.port, "/healthz")[:-2] + b"X-Padding: " + b"a" * 40
        t0 = time.monotonic()
        closed_at = None
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            if _closed_by_server(s):
                closed_at = time.monotonic() - t0
                break
            s.setblocking(True)
            time.sleep(0.25)
        assert closed_at is not None and 1.0 < closed_at < 3.5, closed_at
        # after an answer, a body the route does not read cannot hold the connection either
        with srv.connect() as s2:
            s2.sendall(f"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Length: 100000\r\n\r\n".encode())
            t0 = time.monotonic()
            s2.settimeout(0.25)
            data = b""
            for _ in range(40):  # at most 10 s
                with contextlib.suppress(socket.timeout):
                    chunk = s2.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                with contextlib.suppress(OSError):
                    s2.sendall(b"x")
            assert data.startswith(b"HTTP/1.1 405"), data[:40]
            assert time.monotonic() - t0 < 4.0


def test_client_that_does_not_read_its_response_is_dropped(predictor: Predictor) -> None:
    """A 1.5 MB response to a client that reads nothing (small socket buffers on both sides,
    so the kernel cannot absorb it): the server drops the connection after the send timeout."""
    srv = Server(predictor, send_timeout_s=1.0)
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited by accepted sockets
    with srv, socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(f"GET /docs-assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
        time.sleep(2.5)
        received = len(_read_all(s, timeout=3.0))  # what the buffers held, then the server's close
        assert 0 < received < 1_000_000, received
        assert len(srv.server.server_state.connections) == 0


# ----------------------------------------------------------------------------- the upload budget
def test_budget_squatting_does_not_block_a_normal_upload(predictor: Predictor, xray: bytes) -> None:
    """Two chunked uploads and two with a declared 1 MB body trickle a byte a second into a
    2 MB upload budget: a normal upload is answered within seconds (the squatters hold only
    what they sent, or are cut with 408 as soon as someone waits), not after the deadline."""
    with Server(predictor, max_upload_mb=1.0, upload_memory_mb=2.0, request_timeout_s=30) as srv:
        squatters = [srv.connect() for _ in range(4)]
        answers: list[bytes] = [b""] * 4

        def trickle(i: int, s: socket.socket) -> None:
            s.sendall(_multipart_head(srv.port, None if i < 2 else 1_000_000) + (b"%x\r\n" % len(PART_HEAD) + PART_HEAD + b"\r\n"
                                                                                   if i < 2 else PART_HEAD))
            s.settimeout(1.0)
            for _ in range(12):  # at most 12 s, until the server answers
                try:
                    s.sendall(b"1\r\n\xff\r\n" if i < 2 else b"\xff")
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                answers[i] += chunk
                if not chunk or b"\r\n\r\n" in answers[i]:
                    break

        threads = [threading.Thread(target=trickle, args=(i, s)) for i, s in enumerate(squatters)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.5)  # the squatters hold their reservations
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                t0 = time.perf_counter()
                r = c.post("/v1/predict", files={"file": ("x.jpeg", xray, "image/jpeg")})
                waited = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            assert waited < 5.0, f"a normal upload waited {waited:.1f} s"
        finally:
            for t in threads:
                t.join(15)
            for s in squatters:
                s.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
        assert srv.app.state.budget.used == 0


def test_chunked_upload_grows_its_reservation(predictor: Predictor) -> None:
    """A chunked upload (no Content-Length) larger than its first 1 MB step is read to the end
    and answered; the budget is back to zero afterwards."""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (1200, 1400), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=1)
    body = b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n" + buf.getvalue() + b"\r\n--bnd--\r\n"
    assert len(body) > 1_500_000

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    with Server(predictor, max_upload_mb=4) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=bnd"})
        assert r.status_code == 200, r.text
        assert r.json()["image"]["bytes"] == len(buf.getvalue())
        assert srv.app.state.budget.used == 0


# ----------------------------------------------------------------------------- decoding
def _grandchildren() -> list[int]:
    """Processes whose parent is a child of this one (the decoding workers, forked by the
    multiprocessing forkserver, which is a child of ours)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    children = {pid for pid, ppid in parents.items() if ppid == os.getpid()}
    return [pid for pid, ppid in parents.items() if ppid in children]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_decode_overrun_is_a_fast_4xx_and_the_worker_is_killed(predictor: Predictor, xray: bytes) -> None:
    """An image whose decode takes seconds (62 megapixels of RGB PNG, 1.7 MB, every scanline
    Paeth-filtered: over 1.3 s where unfiltered ones decode in 0.4-0.6 s, too close to the limit)
    against a 0.6 s decode limit: 422 about then, its worker process killed, and normal uploads
    sent meanwhile are answered."""
    side = 7900
    slow = png_bytes(side, side, bytes(range(256)) * (3 * side // 256) + bytes(3 * side % 256), colour_type=2, filter_type=4)
    hostile: dict[str, Any] = {}
    with Server(predictor, decode_timeout_s=0.6, max_upload_mb=4) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        def send_hostile() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as hc:
                t0 = time.perf_counter()
                r = hc.post("/v1/predict", files={"file": ("big.png", slow, "image/png")})
                hostile.update(status=r.status_code, body=r.json(), seconds=time.perf_counter() - t0)

        thread = threading.Thread(target=send_hostile)
        thread.start()
        normal = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = c.post("/v1/predict", files={"file": ("x.jpeg", xray, "image/jpeg")})
            normal.append((r.status_code, time.perf_counter() - t0))
        thread.join(30)
        time.sleep(0.2)
        left = [pid for pid in _grandchildren() if pid not in default_pool().pids()]  # idle pool workers stay
    assert hostile["status"] == 422 and "longer than 0.6 s" in hostile["body"]["detail"], hostile
    assert hostile["seconds"] < 3.0, hostile
    assert [s for s, _ in normal] == [200] * 3 and max(t for _, t in normal) < 3.0, normal
    assert left == [], f"decoding workers still running: {left}"


# ----------------------------------------------------------------------------- Host, HEAD, CSP
def test_host_header_must_be_a_served_name(predictor: Predictor) -> None:
    with Server(predictor) as srv:
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]"):
            status, headers, body = srv.raw(_get(srv.port, "/healthz", host=host))
            assert status == 400 and json.loads(body)["error"] == "bad_host", host
            status, headers, _ = srv.raw(_get(srv.port, "/docs/", host=host))  # no redirect to another host
            assert status == 400 and "location" not in headers
        for host in ("127.0.0.1", f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "LOCALHOST", "[::1]:8000"):
            assert srv.raw(_get(srv.port, "/healthz", host=host))[0] == 200, host
    assert _allowed_hosts(argparse.Namespace(allowed_host=[], host="10.1.2.3")) == ("localhost", "127.0.0.1", "::1", "10.1.2.3")
    assert _allowed_hosts(argparse.Namespace(allowed_host=["xray.example"], host="0.0.0.0")) == ("xray.example",)


def test_head_on_page_static_and_docs(predictor: Predictor) -> None:
    with Server(predictor) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        for path in ("/", "/static/app.js", "/static/style.css", "/favicon.ico", "/docs", "/docs-assets/swagger-ui.css",
                     "/openapi.json"):
            got, head = c.get(path), c.head(path)
            assert got.status_code == head.status_code == 200, path
            assert head.content == b"" and head.headers["content-length"] == str(len(got.content)), path
            assert head.headers["content-type"] == got.headers["content-type"], path
        head = c.head("/healthz")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert c.head("/v1/predict").status_code == 405


def test_docs_have_a_strict_csp(predictor: Predictor) -> None:
    with Server(predictor) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.get("/docs")
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["script-src"] == "'self'" and csp["default-src"] == "'self'" and csp["object-src"] == "'none'"
        assert csp["frame-ancestors"] == "'none'"
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", r.text, re.S)
        assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), "inline script on /docs"
        for ref in re.findall(r'(?:src|href)="([^"]+)"', r.text):
            assert ref.startswith("/") and c.get(ref).status_code == 200, ref
        assert "SwaggerUIBundle" in c.get("/static/docs.js").text


# ----------------------------------------------------------------------------- logs
def test_control_characters_in_paths_are_logged_escaped(predictor: Predictor) -> None:
    with Server(predictor) as srv, LogLines() as logs:
        status, _, _ = srv.raw(_get(srv.port, "/x%0aFORGED%20status=200%0d%1b[31m"))
        assert status == 404
        time.sleep(0.2)
    lines = logs.request_lines()
    assert len(lines) == 1, [r.getMessage() for r in logs.records]
    msg = lines[0].getMessage()
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg
    assert "path=/x\\x0aFORGED status=200\\x0d\\x1b[31m" in msg


def test_client_disconnect_is_one_info_line(predictor: Predictor) -> None:
    """A client that goes away mid-upload: one INFO request line (outcome client_disconnected),
    no error, no traceback."""
    with Server(predictor) as srv, LogLines() as logs:
        with srv.connect() as s:
            s.sendall(_multipart_head(srv.port, 500_000) + PART_HEAD + b"\xff" * 1000)
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while not logs.request_lines() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert srv.app.state.budget.used == 0
    assert [r.levelno for r in logs.records if r.levelno >= logging.WARNING] == [], [r.getMessage() for r in logs.records]
    assert not any(r.exc_info for r in logs.records)
    lines = logs.request_lines()
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "outcome=client_disconnected" in lines[0].getMessage()


# ----------------------------------------------------------------------------- the API key
def test_api_key_from_env_or_file_and_a_warning_for_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    def ns(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})

    monkeypatch.delenv("PNEUMOSCAN_API_KEY", raising=False)
    assert _api_key(ns()) is None
    monkeypatch.setenv("PNEUMOSCAN_API_KEY", "from-env")
    assert _api_key(ns()) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n", encoding="utf-8")
    assert _api_key(ns(api_key_file=str(key_file))) == "from-file"
    with caplog.at_level(logging.WARNING, logger="pneumoscan.cli.serve"):
        assert _api_key(ns(api_key="from-flag")) == "from-flag"
    assert any("visible" in r.getMessage() and "from-flag" not in r.getMessage() for r in caplog.records)
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    for bad in (ns(api_key_file=str(tmp_path / "empty")), ns(api_key_file=str(tmp_path / "missing")),
                ns(api_key="a", api_key_file=str(key_file))):
        with pytest.raises(ConfigError):
            _api_key(bad)
