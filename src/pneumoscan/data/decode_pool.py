"""A pool of long-lived decoding processes: what :func:`~pneumoscan.data.isolated.decode_isolated`
runs on.

Each worker (:mod:`pneumoscan.data.decode_worker`) is a child of the ``multiprocessing``
forkserver (:mod:`pneumoscan.data.forkserver`; ``spawn`` where there is none; never a plain
``fork`` of a threaded caller) and decodes one image at a time, capping its own memory for each task. The caller enforces the
wall-clock limit: it kills a worker that overruns, dies or answers nonsense, and the next call
starts a fresh one. Workers are also replaced after :data:`MAX_TASKS` tasks, after running out
of memory or hitting a decoder bug, and when they hold more than
:data:`~pneumoscan.data.decode_worker.RETIRE_RSS_BYTES` after a decode.

A pool may start its workers at a lower CPU priority than the caller (``nice``;
``$PNEUMOSCAN_DECODE_NICE`` overrides it, 0 keeps the caller's). ``pneumoscan predict`` does,
with :data:`DECODE_NICE`: on a saturated CPU the model's threads are then not preempted
whenever a worker wakes with the next image, while its bounded read-ahead keeps the workers fed.
Measured on 2 cores (``pneumoscan predict``, 624 images, paired interleaved runs): 6 % less
wall time; 14 % together with the workers' allocator tuning
(:data:`~pneumoscan.utils.runtime.WORKER_MMAP_THRESHOLD`). The service keeps its workers at
its own priority: each request waits for its decode, with nothing read ahead (2–6 % fewer
requests/s at 8 and 32 concurrent clients with niceness +5).

The caller checks every answer (header size, shape within
:data:`~pneumoscan.data.limits.MAX_PIXELS`, exact payload size) and unpickles nothing, so a
decoder subverted by a file cannot run code in the caller.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any, Collection

import numpy as np

from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from ..utils.text import safe_text
from .decode_worker import ProtocolError, recv_header, recv_into, send, serve
from .forkserver import mp_context
from .formats import sniff_format
from .limits import MAX_PIXELS

__all__ = ["DECODE_NICE", "DECODE_NICE_ENV", "MAX_TASKS", "DecodePool", "configure_decode_pool", "decode_nice", "default_pool",
           "shutdown_decode_pool"]

log = logging.getLogger(__name__)

#: Tasks a worker runs before it is replaced.
MAX_TASKS = 500
#: Niceness ``pneumoscan predict`` gives its workers over its own (see the module docstring).
DECODE_NICE = 5
#: Environment variable that overrides a pool's niceness (an integer, 0 to 19).
DECODE_NICE_ENV = "PNEUMOSCAN_DECODE_NICE"
#: Longest wait for a new worker to say it is ready (the first also starts the forkserver).
START_TIMEOUT_S = 60.0
_ERRORS = {cls.__name__: cls for cls in (ImageReadError, UnsupportedFormatError, ImageTooLargeError)}
#: Held while a worker process is being started (one fork request at a time).
_start_lock = threading.Lock()


# ----------------------------------------------------------------------------- the caller's side
def _parse_answer(msg: Any, payload_len: int, name: str) -> tuple[tuple[int, int], dict[str, Any]]:
    """Check a worker's answer header (it decoded hostile bytes, so it is not trusted either):
    an error becomes the matching exception, with its reason escaped; otherwise the image
    shape, within :data:`~pneumoscan.data.limits.MAX_PIXELS` and matching the payload, and the
    metadata. :class:`ProtocolError` for anything else."""
    try:
        if not msg["ok"]:
            if payload_len:
                raise ProtocolError
            raise _ERRORS.get(str(msg.get("error")), ImageReadError)(name, safe_text(msg.get("reason"), 300))
        h, w = (int(v) for v in msg["shape"])
        meta = dict(msg["meta"])
        if "after" in msg:
            meta["after"] = msg["after"]
    except (ValueError, TypeError, KeyError) as e:
        raise ProtocolError from e
    if not (0 < h and 0 < w and h * w <= MAX_PIXELS and payload_len == 4 * h * w):
        raise ProtocolError
    if isinstance(meta.get("original_size"), list):
        meta["original_size"] = tuple(meta["original_size"])
    return (h, w), meta


def _has_input(sock: socket.socket) -> bool:
    """Whether an idle worker's socket is readable: it has closed (died) or sent unasked data."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def decode_nice(default: int = 0) -> int:
    """The niceness new workers add to their caller's: ``$PNEUMOSCAN_DECODE_NICE`` (0 to 19)
    when set to an integer, else ``default`` (clamped the same way)."""
    raw, value = os.environ.get(DECODE_NICE_ENV, "").strip(), int(default)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            log.warning("%s=%s is not an integer: ignored", DECODE_NICE_ENV, safe_text(raw, 40))
    return max(0, min(19, value))


def _prepare_dicom(w: _Worker, name: str) -> None:
    """Have worker ``w`` load pydicom, before its first DICOM task and outside that task's time
    limit (the file plays no part in it)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        send(w.sock, {"prepare": "DICOM"}, b"", deadline)
        msg, payload_len = recv_header(w.sock, deadline)
        if msg != {"ready": True} or payload_len:
            raise ProtocolError
    except (socket.timeout, EOFError, OSError, ProtocolError):
        raise ImageReadError(name, "the decoder process could not load the DICOM reader") from None
    w.dicom_ready = True


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

    __slots__ = ("proc", "sock", "pid", "tasks", "reusable", "dicom_ready", "exitcode", "ended", "malloc")

    def __init__(self, proc: Any, sock: socket.socket) -> None:
        self.proc, self.sock, self.pid = proc, sock, proc.pid
        self.malloc = ""  # the allocator setting the worker reported when ready
        self.tasks = 0
        self.reusable = False
        self.dicom_ready = False
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
        nice: niceness the workers add to the caller's (:func:`decode_nice`); the attribute
            ``nice`` may be changed later, for the workers started after.
    """

    def __init__(self, workers: int | None = None, *, max_tasks: int = MAX_TASKS, nice: int = 0) -> None:
        if workers is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = min(4, cpus)
        if workers < 1 or max_tasks < 1:
            raise ValueError(f"workers and max_tasks must be >= 1 (got {workers}, {max_tasks})")
        self.size, self.max_tasks, self.nice = int(workers), int(max_tasks), int(nice)
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []  # the most recently used last
        self._live: set[_Worker] = set()  # idle and busy
        self._starting = 0
        self._closed = False

    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        with self._cond:
            return sorted(w.pid for w in self._live)

    def allocators(self) -> list[str]:
        """The allocator settings the live workers reported when they started (``"tuned"``,
        or why not: see :func:`pneumoscan.utils.runtime.tune_malloc`)."""
        with self._cond:
            return sorted({w.malloc for w in self._live})

    def decode(self, data: bytes, name: str, *, max_side: int | None, formats: Collection[str] | None,
               timeout_s: float, max_memory: int, digest: bool = False, after: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`~pneumoscan.data.io.decode_image` in a worker, killed when it takes longer than
        ``timeout_s`` seconds (waiting for a free worker not counted).

        Args:
            data: the file's bytes.
            name: the name used in error messages.
            max_side: as for :func:`~pneumoscan.data.io.read_image`.
            formats: as for :func:`~pneumoscan.data.io.read_image`.
            timeout_s: wall-clock limit of the decode, sending and receiving included.
            max_memory: address space the worker may add, for this task, to what it holds.
            digest: also give the content digests in the metadata (see
                :func:`~pneumoscan.data.io.decode_image`).
            after: ``"module:qualname"`` of a pneumoscan function ``f(pixels, meta)`` the
                worker also runs on the decoded image (:func:`~pneumoscan.data.decode_worker.after_spec`);
                its JSON-ready result (``None`` if it failed there) is ``meta["after"]``.

        Raises:
            ImageReadError: as :func:`~pneumoscan.data.io.decode_image`, or the worker overran,
                died, answered nonsense or could not be started.
        """
        task = {"name": name, "max_side": max_side, "formats": None if formats is None else sorted(formats),
                "timeout_s": timeout_s, "max_memory": int(max_memory), "digest": bool(digest)}
        if after:
            task["after"] = after
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
        while True:
            with self._cond:
                while not self._idle and not self._room() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise ImageReadError(name, "the decoding workers are shut down")
                if not self._idle:
                    self._starting += 1
                    break
                worker = self._idle.pop()
            if not _has_input(worker.sock):
                return worker
            worker.reusable = False  # it died while idle (or spoke unasked): replaced
            self._release(worker)
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
            proc = mp_context().Process(target=serve, args=(theirs, decode_nice(self.nice)), name="pneumoscan-decode", daemon=True)
            with _start_lock:
                proc.start()
        except OSError as e:
            ours.close()
            raise ImageReadError(name, f"cannot start a decoder process ({e.strerror or e})") from e
        finally:
            theirs.close()
        worker = _Worker(proc, ours)
        try:
            msg, payload_len = recv_header(ours, time.monotonic() + START_TIMEOUT_S)
            if not isinstance(msg, dict) or msg.get("ready") is not True or set(msg) - {"ready", "malloc"} or payload_len:
                raise ProtocolError
            worker.malloc = str(msg.get("malloc", ""))[:80]
        except (socket.timeout, EOFError, OSError, ProtocolError):
            code = worker.end()
            raise ImageReadError(name, f"the decoder process did not start (exit code {code})") from None
        return worker

    def _exchange(self, w: _Worker, task: dict[str, Any], data: bytes, name: str,
                  timeout_s: float) -> tuple[np.ndarray, dict[str, Any]]:
        """Send one task and read the answer; the worker is marked reusable when all went well."""
        w.reusable = False
        w.tasks += 1
        if not w.dicom_ready and sniff_format(data) == "DICOM":
            _prepare_dicom(w, name)
        deadline = time.monotonic() + timeout_s
        try:
            send(w.sock, task, data, deadline)
            msg, payload_len = recv_header(w.sock, deadline)
            try:
                shape, meta = _parse_answer(msg, payload_len, name)
            except ImageReadError:
                w.reusable = not msg.get("retire")
                raise
            arr = np.empty(shape, dtype=np.float32)
            recv_into(w.sock, memoryview(arr).cast("B"), deadline)
            w.reusable = not msg.get("retire")
            return arr, meta
        except socket.timeout:
            raise ImageReadError(name, f"decoding took longer than {timeout_s:g} s") from None
        except ProtocolError:
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


def default_pool() -> DecodePool:
    """The process-wide pool (created on first use, closed at interpreter exit)."""
    global _pool
    with _pool_lock:
        if _pool is None:
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
    """Stop the workers; the closed pool stays, so that a late call gets an error, not new workers."""
    default_pool().close()


def _after_fork_in_child() -> None:  # pragma: no cover - runs in a forked child
    """A forked child does not share its parent's workers: it drops its copies of their
    sockets (and locks another thread may have held at the fork)."""
    global _pool, _pool_lock, _start_lock
    pool, _pool = _pool, None
    _pool_lock, _start_lock = threading.Lock(), threading.Lock()
    if pool is not None:
        for w in list(pool._live):
            with contextlib.suppress(OSError):
                w.sock.close()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
