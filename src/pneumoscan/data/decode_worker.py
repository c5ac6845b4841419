"""The decoding worker process of :mod:`pneumoscan.data.decode_pool`, and the messages both
sides exchange.

A task may name a function of the pneumoscan package to run on the decoded image in the worker
too (``after``: ``"module:qualname"``, e.g. the not-a-chest-X-ray guard), so that such per-image
work runs in parallel processes instead of the caller's threads, which share one interpreter
lock; its JSON-ready result travels in the answer header.

A message is a fixed-size frame (header length, payload length), a JSON header and raw bytes:
the file going in, the float32 pixels coming back. Nothing is unpickled on either side. For
each task the worker caps its own address space at its current size plus the task's
``max_memory``, and its CPU time at what it has used plus just over the task's time limit (a
backstop should the caller die; the caller kills it at the wall-clock deadline).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import socket
import struct
import time
from typing import Any, Iterator

import numpy as np

from ..errors import ImageReadError
from ..utils.runtime import WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD, tune_malloc
from .io import decode_image
from .limits import MAX_FILE_BYTES

__all__ = ["AFTER_PACKAGE", "MAX_HEADER_BYTES", "RETIRE_RSS_BYTES", "ProtocolError", "after_spec", "recv_header", "recv_into", "send", "serve"]

#: A worker holding more resident memory than this after a decode is replaced.
RETIRE_RSS_BYTES = 256 << 20
#: Largest JSON header either side may send (metadata is a few hundred bytes).
MAX_HEADER_BYTES = 1 << 20
#: Header length (bytes), payload length (bytes).
_FRAME = struct.Struct("!IQ")


class ProtocolError(Exception):
    """The other side broke the protocol (a header too long or not JSON)."""


def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Give the next socket operation what is left until ``deadline`` (``None``: no limit)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout
    sock.settimeout(left if left < 1e7 else None)  # beyond 115 days (or inf): no limit, not an overflow


def send(sock: socket.socket, header: dict[str, Any], payload: Any = b"", deadline: float | None = None) -> None:
    """Send one message.

    Args:
        sock: a connected stream socket.
        header: the JSON header.
        payload: raw bytes (bytes, or a byte memoryview).
        deadline: ``time.monotonic()`` by which it must be sent (``socket.timeout`` after),
            ``None`` for no limit.
    """
    head = json.dumps(header, default=str).encode("utf-8")
    prefix = _FRAME.pack(len(head), len(payload)) + head
    _arm(sock, deadline)
    sent = sock.sendmsg([prefix, payload] if len(payload) else [prefix])  # one wake-up for the other side
    while sent < len(prefix) + len(payload):  # what did not fit in the socket buffer
        _arm(sock, deadline)
        rest = prefix[sent:] if sent < len(prefix) else memoryview(payload)[sent - len(prefix):]
        sent += sock.send(rest)


def recv_into(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fill ``view`` from the socket.

    Args:
        sock: a connected stream socket.
        view: a writable byte memoryview.
        deadline: as for :func:`send`.

    Raises:
        EOFError: the other side closed first.
    """
    got = 0
    while got < len(view):
        _arm(sock, deadline)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def recv_header(sock: socket.socket, deadline: float | None) -> tuple[Any, int]:
    """The JSON header of the next message and the length of its payload (still to be read
    with :func:`recv_into`).

    Args:
        sock: a connected stream socket.
        deadline: as for :func:`send`.

    Raises:
        ProtocolError: a header over :data:`MAX_HEADER_BYTES` or not JSON.
    """
    frame = bytearray(_FRAME.size)
    recv_into(sock, memoryview(frame), deadline)
    head_len, payload_len = _FRAME.unpack(frame)
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError
    head = bytearray(head_len)
    recv_into(sock, memoryview(head), deadline)
    try:
        return json.loads(head), payload_len
    except ValueError as e:
        raise ProtocolError from e


def _statm(field: int) -> int | None:  # pragma: no cover - runs in the worker
    """Field ``field`` of /proc/self/statm in bytes (0: address space, 1: resident), else ``None``."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _task_limits(timeout_s: float, max_memory: int) -> Iterator[None]:  # pragma: no cover - runs in the worker
    """Cap this worker for one task: address space at its current size plus ``max_memory``,
    CPU time at what it has used plus just over ``timeout_s``; the previous limits after."""
    try:
        import resource
    except ImportError:  # not POSIX
        yield
        return
    saved = {lim: resource.getrlimit(lim) for lim in (resource.RLIMIT_AS, resource.RLIMIT_CPU)}
    wanted = {}
    if math.isfinite(timeout_s):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        wanted[resource.RLIMIT_CPU] = int(math.ceil(usage.ru_utime + usage.ru_stime + timeout_s)) + 1
    current = _statm(0)
    if current is not None:
        wanted[resource.RLIMIT_AS] = current + int(max_memory)
    for lim, soft in wanted.items():
        hard = saved[lim][1]
        with contextlib.suppress(ValueError, OverflowError, OSError):  # a lower hard limit already applies
            resource.setrlimit(lim, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    try:
        yield
    finally:
        for lim, value in saved.items():
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(lim, value)


#: Modules whose functions a task may name in ``after``.
AFTER_PACKAGE = "pneumoscan."


def _nameable(module: str, qualname: str) -> bool:
    """Whether a task may name this function: module level, in the pneumoscan package."""
    return module.startswith(AFTER_PACKAGE) and qualname.isidentifier()


def after_spec(fn: Any) -> str:
    """The ``"module:qualname"`` a task names a module-level pneumoscan function by.

    Raises:
        ValueError: ``fn`` is not a module-level function of the pneumoscan package.
    """
    module, qualname = getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "") or ""
    if not _nameable(module, qualname):
        raise ValueError(f"{fn!r} is not a module-level function of the pneumoscan package")
    return f"{module}:{qualname}"


def _run_after(spec: Any, arr: np.ndarray, meta: dict[str, Any]) -> Any:  # pragma: no cover - worker
    """The result of the task's ``after`` function on the decoded image, ``None`` when it fails
    (the caller then does that work itself)."""
    try:
        module, _, qualname = str(spec).partition(":")
        if not _nameable(module, qualname):
            return None
        return getattr(importlib.import_module(module), qualname)(arr, meta)
    except Exception:  # noqa: BLE001 - the caller recomputes what failed here
        return None


def _decode_task(task: dict[str, Any], data: bytes) -> tuple[dict[str, Any], np.ndarray | None]:  # pragma: no cover - worker
    """Decode one file: the answer header (``ok``, ``shape``, ``meta``; or ``error``, the
    exception's class name, and ``reason``; ``retire`` when this worker should be replaced)
    and the float32 pixels."""
    name = str(task["name"])
    limit = f"(limit {max(1, round(int(task['max_memory']) / (1 << 20)))} MB)"
    with _task_limits(float(task["timeout_s"]), int(task["max_memory"])):
        try:
            arr, meta = decode_image(data, name, max_side=task["max_side"], formats=task["formats"], digest=bool(task.get("digest")))
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            answer: dict[str, Any] = {"ok": True, "shape": list(arr.shape), "meta": meta}
            if task.get("after"):  # within the task's limits, like the decode
                answer["after"] = _run_after(task["after"], arr, meta)
        except ImageReadError as e:  # the readers turn an allocation failure into ImageTooLargeError
            oom = isinstance(e.__cause__, MemoryError)
            return {"ok": False, "error": type(e).__name__, "reason": f"{e.reason} {limit}" if oom else e.reason,
                    "retire": oom}, None
        except MemoryError:
            return {"ok": False, "error": "ImageTooLargeError", "reason": f"image too large to decode in memory {limit}",
                    "retire": True}, None
        except Exception as e:  # noqa: BLE001 - a decoder bug: one line for the caller, not a traceback
            return {"ok": False, "error": "ImageReadError", "reason": f"cannot decode image ({type(e).__name__})", "retire": True}, None
    answer["retire"] = (_statm(1) or 0) > RETIRE_RSS_BYTES
    return answer, arr


def serve(sock: socket.socket, nice: int = 0) -> None:  # pragma: no cover - runs in the worker
    """The worker process: tune its allocator (:func:`~pneumoscan.utils.runtime.tune_malloc`
    with the workers' thresholds), lower its CPU priority by ``nice``, say ready
    (``{"ready": true, "malloc": setting}``), then answer one task at a time (header:
    ``name``, ``max_side``, ``formats``, ``timeout_s``, ``max_memory``; payload: the file)
    until the caller closes the socket (or has gone), or after an answer that says this worker
    retires. ``{"prepare": "DICOM"}`` loads pydicom and answers ready.

    Args:
        sock: the worker's end of a socket pair.
        nice: niceness to add to the caller's (0: the same priority).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    sock.settimeout(None)
    setting = tune_malloc(WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD)
    if nice > 0 and hasattr(os, "nice"):
        with contextlib.suppress(OSError):  # a lower priority is always allowed (the kernel caps it at 19)
            os.nice(int(nice))
    with contextlib.suppress(EOFError, OSError, ProtocolError):  # the caller has gone: end quietly
        send(sock, {"ready": True, "malloc": setting})
        while True:
            task, size = recv_header(sock, None)
            if task == {"prepare": "DICOM"}:  # once, before the first DICOM task: the file plays no part
                importlib.import_module("pydicom.pixels")  # 0.1 to 0.2 s
                send(sock, {"ready": True})
                continue
            if size > MAX_FILE_BYTES:
                return
            buf = bytearray(size)
            recv_into(sock, memoryview(buf), None)
            data = bytes(buf)
            del buf
            answer, arr = _decode_task(task, data)
            del data
            send(sock, answer, b"" if arr is None else memoryview(arr).cast("B"))
            del arr
            if answer.get("retire"):
                return
