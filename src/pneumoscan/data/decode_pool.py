"""A pool of long-lived decoding processes: what :func:`~pneumoscan.data.isolated.decode_isolated`
runs on.

Each worker is a child of the ``multiprocessing`` forkserver (``spawn`` where there is none;
never a plain ``fork`` of a threaded caller) that decodes one image at a time for the
caller. Per task, the worker caps its own address space at its current size plus the task's
``max_memory`` and its CPU time just above the task's limit (a backstop should the caller die);
the caller enforces the wall-clock limit and kills the worker when it overruns, dies or answers
nonsense, and starts a fresh one for the next task. Workers are recycled after
:data:`MAX_TASKS` tasks, after running out of memory or hitting a decoder bug, and when they
hold more than :data:`RETIRE_RSS_BYTES` after a decode.

Messages are a fixed-size frame (header length, payload length), a JSON header and raw bytes:
the file going in, the float32 pixels coming back. Nothing is unpickled on either side, and the
caller checks every answer (header size, shape within
:data:`~pneumoscan.data.limits.MAX_PIXELS`, exact payload size), so a decoder subverted by a
file cannot run code in the caller.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
from typing import Any, Collection, Iterator

import numpy as np

from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from ..utils.text import safe_text
from .io import decode_image
from .limits import MAX_FILE_BYTES, MAX_PIXELS

__all__ = ["MAX_TASKS", "RETIRE_RSS_BYTES", "DecodePool", "configure_decode_pool", "default_pool", "shutdown_decode_pool"]

log = logging.getLogger(__name__)

#: Tasks a worker runs before it is replaced.
MAX_TASKS = 500
#: A worker holding more resident memory than this after a decode is replaced.
RETIRE_RSS_BYTES = 256 << 20
#: Longest wait for a new worker to say it is ready (the first also starts the forkserver).
START_TIMEOUT_S = 60.0
#: Largest JSON header either side may send (metadata is a few hundred bytes).
_MAX_HEADER_BYTES = 1 << 20
#: Header length (bytes), payload length (bytes).
_FRAME = struct.Struct("!IQ")
_ERRORS = {cls.__name__: cls for cls in (ImageReadError, UnsupportedFormatError, ImageTooLargeError)}
_PRELOAD = ["__main__", __name__, "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.JpegImagePlugin",
            "PIL.PngImagePlugin", "PIL.PpmImagePlugin", "PIL.TiffImagePlugin", "PIL.WebPImagePlugin",
            "pydicom", "pydicom.pixels"]

_context: Any = None
_context_lock = threading.Lock()
_start_lock = threading.Lock()


class _Nonsense(Exception):
    """A worker broke the protocol."""


def _mp_context() -> Any:
    """The multiprocessing context of the workers; the forkserver preloads the reader (Pillow's
    plugins and pydicom included), so that a worker starts in milliseconds, ready to decode."""
    global _context
    with _context_lock:
        if _context is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                _context = multiprocessing.get_context("forkserver")
                _context.set_forkserver_preload(_PRELOAD)
            else:  # pragma: no cover - Windows
                _context = multiprocessing.get_context("spawn")
        return _context


# ----------------------------------------------------------------------------- wire format
def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Give the next socket operation what is left until ``deadline`` (``None``: no limit)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout
    sock.settimeout(left if math.isfinite(left) else None)


def _send(sock: socket.socket, header: dict[str, Any], payload: Any = b"", deadline: float | None = None) -> None:
    """One message: frame, JSON header, raw payload (bytes or a byte memoryview)."""
    head = json.dumps(header, default=str).encode("utf-8")
    _arm(sock, deadline)
    sock.sendall(_FRAME.pack(len(head), len(payload)) + head)
    if len(payload):
        _arm(sock, deadline)
        sock.sendall(payload)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fill ``view`` from the socket; ``EOFError`` when the other side closes first."""
    got = 0
    while got < len(view):
        _arm(sock, deadline)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def _recv_header(sock: socket.socket, deadline: float | None) -> tuple[Any, int]:
    """The JSON header of the next message and the length of its payload (still to read)."""
    frame = bytearray(_FRAME.size)
    _recv_into(sock, memoryview(frame), deadline)
    head_len, payload_len = _FRAME.unpack(frame)
    if head_len > _MAX_HEADER_BYTES:
        raise _Nonsense
    head = bytearray(head_len)
    _recv_into(sock, memoryview(head), deadline)
    try:
        return json.loads(head), payload_len
    except ValueError as e:
        raise _Nonsense from e


# ----------------------------------------------------------------------------- the worker
def _address_space() -> int | None:
    """This process's current virtual memory size in bytes (Linux), else ``None``."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _resident() -> int:  # pragma: no cover - runs in the worker
    """This process's resident memory in bytes (Linux), else 0."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


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
    current = _address_space()
    if current is not None:
        wanted[resource.RLIMIT_AS] = current + int(max_memory)
    for lim, soft in wanted.items():
        hard = saved[lim][1]
        with contextlib.suppress(ValueError, OSError):  # a lower hard limit already applies
            resource.setrlimit(lim, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    try:
        yield
    finally:
        for lim, value in saved.items():
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(lim, value)


def _decode_task(task: dict[str, Any], data: bytes) -> tuple[dict[str, Any], np.ndarray | None]:  # pragma: no cover - worker
    """Decode one file: the answer header (``ok``, ``shape``, ``meta``; or ``error``, the
    exception's class name, and ``reason``; ``retire`` when this worker should be replaced)
    and the float32 pixels."""
    name = str(task["name"])
    with _task_limits(float(task["timeout_s"]), int(task["max_memory"])):
        try:
            arr, meta = decode_image(data, name, max_side=task["max_side"], formats=task["formats"])
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            answer: dict[str, Any] = {"ok": True, "shape": list(arr.shape), "meta": meta}
        except ImageReadError as e:
            return {"ok": False, "error": type(e).__name__, "reason": e.reason}, None
        except MemoryError:
            mb = max(1, round(int(task["max_memory"]) / (1 << 20)))
            return {"ok": False, "error": "ImageTooLargeError", "reason": f"image too large to decode in memory (limit {mb} MB)",
                    "retire": True}, None
        except Exception as e:  # noqa: BLE001 - a decoder bug: one line for the caller, not a traceback
            return {"ok": False, "error": "ImageReadError", "reason": f"cannot decode image ({type(e).__name__})", "retire": True}, None
    answer["retire"] = _resident() > RETIRE_RSS_BYTES
    return answer, arr


def _serve(sock: socket.socket) -> None:  # pragma: no cover - runs in the worker
    """The worker's loop: say ready, then answer one task at a time until the caller closes
    the socket (or the answer says this worker retires)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    sock.settimeout(None)
    _send(sock, {"ready": True})
    while True:
        try:
            task, size = _recv_header(sock, None)
            if size > MAX_FILE_BYTES:
                return
            buf = bytearray(size)
            _recv_into(sock, memoryview(buf), None)
        except (EOFError, OSError, _Nonsense):
            return
        data = bytes(buf)
        del buf
        answer, arr = _decode_task(task, data)
        del data
        _send(sock, answer, b"" if arr is None else memoryview(arr).cast("B"))
        del arr
        if answer.get("retire"):
            return


# ----------------------------------------------------------------------------- the caller's side
def _parse_answer(msg: Any, payload_len: int, name: str) -> tuple[tuple[int, int], dict[str, Any]]:
    """Check a worker's answer header (it decoded hostile bytes, so it is not trusted either):
    an error becomes the matching exception, with its reason escaped; otherwise the image
    shape, within :data:`~pneumoscan.data.limits.MAX_PIXELS` and matching the payload, and the
    metadata. :class:`_Nonsense` for anything else."""
    try:
        if not msg["ok"]:
            if payload_len:
                raise _Nonsense
            raise _ERRORS.get(str(msg.get("error")), ImageReadError)(name, safe_text(msg.get("reason"), 300))
        h, w = (int(v) for v in msg["shape"])
        meta = dict(msg["meta"])
    except (ValueError, TypeError, KeyError) as e:
        raise _Nonsense from e
    if not (0 < h and 0 < w and h * w <= MAX_PIXELS and payload_len == 4 * h * w):
        raise _Nonsense
    if isinstance(meta.get("original_size"), list):
        meta["original_size"] = tuple(meta["original_size"])
    return (h, w), meta


def _died(name: str, exitcode: int | None, timeout_s: float) -> ImageReadError:
    """The error for a worker that ended without an answer."""
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == getattr(signal, "SIGXCPU", -1):
            return ImageReadError(name, f"decoding took longer than {timeout_s:g} s")
        try:
            sig_name = signal.Signals(sig).name
        except ValueError:
            sig_name = f"signal {sig}"
        return ImageReadError(name, f"the decoder crashed ({sig_name})")
    return ImageReadError(name, f"the decoder process ended without an answer (exit code {exitcode})")


class _Worker:
    """One decoding process, the caller's end of its socket, and its task count."""

    __slots__ = ("proc", "sock", "pid", "tasks", "reusable", "exitcode", "ended")

    def __init__(self, proc: Any, sock: socket.socket) -> None:
        self.proc, self.sock, self.pid = proc, sock, proc.pid
        self.tasks = 0
        self.reusable = False
        self.exitcode: int | None = None
        self.ended = False

    def end(self, *, kill: bool = True) -> int | None:
        """Close the socket, kill the process (``kill=False``: after a second, should it not
        end by itself) and reap it; its exit code. Calls after the first do nothing."""
        if self.ended:
            return self.exitcode
        self.ended = True
        self.sock.close()
        if not kill:
            self.proc.join(timeout=1)
        if self.proc.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.join(timeout=5)
        self.exitcode = self.proc.exitcode
        if self.exitcode is None:  # pragma: no cover - a kill that did not take
            log.warning("decoder process %s did not exit after SIGKILL", self.pid)
        else:
            self.proc.close()
        return self.exitcode


class DecodePool:
    """Up to ``workers`` decoding processes, started when needed and reused across calls.
    Threads may call :meth:`decode` concurrently; each call has a worker to itself (a call
    waits for one when all are busy).

    Args:
        workers: most processes (default: ``min(4, usable CPUs)``).
        max_tasks: tasks a worker runs before it is replaced.
    """

    def __init__(self, workers: int | None = None, *, max_tasks: int = MAX_TASKS) -> None:
        if workers is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = min(4, cpus)
        if workers < 1 or max_tasks < 1:
            raise ValueError(f"workers and max_tasks must be >= 1 (got {workers}, {max_tasks})")
        self.size, self.max_tasks = int(workers), int(max_tasks)
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []  # the most recently used last
        self._live: set[_Worker] = set()  # idle and busy
        self._starting = 0
        self._closed = False

    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        with self._cond:
            return sorted(w.pid for w in self._live)

    def decode(self, data: bytes, name: str, *, max_side: int | None, formats: Collection[str] | None,
               timeout_s: float, max_memory: int) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`~pneumoscan.data.io.decode_image` in a worker, killed when it takes longer than
        ``timeout_s`` seconds (waiting for a free worker not counted).

        Args:
            data: the file's bytes.
            name: the name used in error messages.
            max_side: as for :func:`~pneumoscan.data.io.read_image`.
            formats: as for :func:`~pneumoscan.data.io.read_image`.
            timeout_s: wall-clock limit of the decode, sending and receiving included.
            max_memory: address space the worker may add, for this task, to what it holds.

        Raises:
            ImageReadError: as :func:`~pneumoscan.data.io.decode_image`, or the worker overran,
                died, answered nonsense or could not be started.
        """
        task = {"name": name, "max_side": max_side, "formats": None if formats is None else sorted(formats),
                "timeout_s": timeout_s, "max_memory": int(max_memory)}
        worker = self._acquire(name)
        try:
            return self._exchange(worker, task, data, name, timeout_s)
        finally:
            self._release(worker)

    def start(self) -> None:
        """Start the workers in a background thread (the first also starts the forkserver), so
        that the first decodes need not wait for them; errors are left for :meth:`decode`."""

        def run() -> None:
            while True:
                with self._cond:
                    if self._closed or not self._room():
                        return
                    self._starting += 1
                try:
                    self._add("<decoder start>", idle=True)
                except ImageReadError as e:
                    log.debug("decoder process not started: %s", e)
                    return

        threading.Thread(target=run, name="pneumoscan-decode-start", daemon=True).start()

    def close(self) -> None:
        """Kill every worker (a call in progress gets an error) and refuse new calls."""
        with self._cond:
            self._closed = True
            idle, busy = list(self._idle), [w for w in self._live if w not in self._idle]
            self._idle.clear()
            self._live.difference_update(idle)
            self._cond.notify_all()
        for w in busy:  # its caller reaps it
            with contextlib.suppress(OSError):
                os.kill(w.pid, signal.SIGKILL)
        for w in idle:
            w.end()

    def _room(self) -> bool:
        """Whether another worker may start (call with the lock held)."""
        return len(self._live) + self._starting < self.size

    def _acquire(self, name: str) -> _Worker:
        """An idle worker, else a new one while there are fewer than :attr:`size`, else the next freed."""
        with self._cond:
            while True:
                if self._closed:
                    raise ImageReadError(name, "the decoding workers are shut down")
                if self._idle:
                    return self._idle.pop()
                if self._room():
                    self._starting += 1
                    break
                self._cond.wait()
        return self._add(name, idle=False)

    def _add(self, name: str, *, idle: bool) -> _Worker:
        """Start a worker in a slot reserved by ``_starting``; it joins the pool (as idle or busy)."""
        worker = None
        try:
            worker = self._start(name)
        finally:
            with self._cond:
                self._starting -= 1
                late = worker is not None and idle and self._closed
                if worker is not None and not late:
                    self._live.add(worker)
                    if idle:
                        self._idle.insert(0, worker)
                self._cond.notify()
            if late:
                worker.end()
        return worker

    def _start(self, name: str) -> _Worker:
        """A new worker, once it has said it is ready."""
        ours, theirs = socket.socketpair()
        try:
            proc = _mp_context().Process(target=_serve, args=(theirs,), name="pneumoscan-decode", daemon=True)
            with _start_lock:
                proc.start()
        except OSError as e:
            ours.close()
            raise ImageReadError(name, f"cannot start a decoder process ({e.strerror or e})") from e
        finally:
            theirs.close()
        worker = _Worker(proc, ours)
        try:
            msg, payload_len = _recv_header(ours, time.monotonic() + START_TIMEOUT_S)
            if msg != {"ready": True} or payload_len:
                raise _Nonsense
        except (socket.timeout, EOFError, OSError, _Nonsense):
            code = worker.end()
            raise ImageReadError(name, f"the decoder process did not start (exit code {code})") from None
        return worker

    def _exchange(self, w: _Worker, task: dict[str, Any], data: bytes, name: str,
                  timeout_s: float) -> tuple[np.ndarray, dict[str, Any]]:
        """Send one task and read the answer; the worker is marked reusable when all went well."""
        w.reusable = False
        w.tasks += 1
        deadline = time.monotonic() + timeout_s
        try:
            _send(w.sock, task, data, deadline)
            msg, payload_len = _recv_header(w.sock, deadline)
            try:
                shape, meta = _parse_answer(msg, payload_len, name)
            except ImageReadError:
                w.reusable = not msg.get("retire")
                raise
            arr = np.empty(shape, dtype=np.float32)
            _recv_into(w.sock, memoryview(arr).cast("B"), deadline)
            w.reusable = not msg.get("retire")
            return arr, meta
        except socket.timeout:
            raise ImageReadError(name, f"decoding took longer than {timeout_s:g} s") from None
        except _Nonsense:
            raise ImageReadError(name, "the decoder process answered nonsense") from None
        except (EOFError, OSError):  # the worker died
            raise _died(name, w.end(kill=False), timeout_s) from None

    def _release(self, w: _Worker) -> None:
        """Back to the idle list when it can be reused, else ended (killed if still running)."""
        with self._cond:
            keep = w.reusable and w.tasks < self.max_tasks and not self._closed and w in self._live
            if keep:
                self._idle.append(w)
            else:
                self._live.discard(w)
            self._cond.notify()
        if not keep:
            w.end()


# ----------------------------------------------------------------------------- the shared pool
_pool: DecodePool | None = None
_pool_lock = threading.Lock()
_settings: dict[str, Any] = {}
_exiting = False


def default_pool() -> DecodePool:
    """The process-wide pool (created on first use, closed at interpreter exit)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            if _exiting:
                raise RuntimeError("the interpreter is exiting: no new decoding workers")
            _pool = DecodePool(**_settings)
        return _pool


def configure_decode_pool(workers: int | None = None, *, max_tasks: int = MAX_TASKS) -> None:
    """Set the size of the process-wide pool (its current workers are stopped).

    Args:
        workers: most processes (``None``: ``min(4, usable CPUs)``).
        max_tasks: tasks a worker runs before it is replaced.
    """
    DecodePool(workers, max_tasks=max_tasks)  # validates
    _settings.update(workers=workers, max_tasks=max_tasks)
    shutdown_decode_pool()


def shutdown_decode_pool() -> None:
    """Stop the process-wide pool's workers (a later call starts new ones)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def _at_exit() -> None:
    global _exiting
    _exiting = True
    shutdown_decode_pool()


def _after_fork_in_child() -> None:  # pragma: no cover - runs in a forked child
    """A forked child does not share its parent's workers: it drops its copies of their
    sockets (and locks another thread may have held at the fork)."""
    global _pool, _pool_lock, _context_lock, _start_lock
    pool, _pool = _pool, None
    _pool_lock, _context_lock, _start_lock = threading.Lock(), threading.Lock(), threading.Lock()
    if pool is not None:
        for w in list(pool._live):
            with contextlib.suppress(OSError):
                w.sock.close()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
