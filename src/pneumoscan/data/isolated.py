"""Decoding in a worker process that can be stopped: a hard bound on the time and memory one
image may cost, whatever the decoder does with it.

The header checks of the reader refuse the known ways to make decoding slow or large
(docs/security.md); :func:`decode_isolated` bounds everything else. Each call decodes in a
fresh child process (``forkserver`` where the platform has it, else ``spawn``; never a plain
``fork`` of a threaded server) with ``RLIMIT_AS`` and ``RLIMIT_CPU`` set, and kills it at the
deadline. The web service calls it for every upload; the CLI for each file when given a
per-file limit.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any, Collection

import numpy as np

from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from ..utils.text import safe_text
from .io import ImageSource, name_of, read_bytes
from .limits import DECODE_MEMORY, DECODE_TIMEOUT_S, MAX_PIXELS

__all__ = ["decode_isolated"]

log = logging.getLogger(__name__)

_ERRORS = {cls.__name__: cls for cls in (ImageReadError, UnsupportedFormatError, ImageTooLargeError)}
#: Largest JSON header a worker may send (metadata is a few hundred bytes).
_MAX_HEADER_BYTES = 1 << 20
_context: Any = None


def _mp_context() -> Any:
    """The multiprocessing context of the workers; the forkserver preloads the reader, so
    that a worker starts in milliseconds."""
    global _context
    if _context is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(["__main__", "pneumoscan.data.isolated", "pydicom", "pydicom.pixels"])
        else:  # pragma: no cover - Windows
            _context = multiprocessing.get_context("spawn")
    return _context


def _address_space() -> int | None:
    """This process's current virtual memory size in bytes (Linux), else ``None``."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _limit_self(timeout_s: float, max_memory: int) -> None:
    """Cap this worker: address space at its current size plus ``max_memory``, CPU time
    just above ``timeout_s`` (a backstop should the parent die before killing it)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    cpu = int(math.ceil(timeout_s)) + 1
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):  # pragma: no cover - a lower hard limit already applies
        pass
    current = _address_space()
    if current is not None:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (current + int(max_memory), resource.RLIM_INFINITY))
        except (ValueError, OSError):  # pragma: no cover - a lower hard limit already applies
            pass


def _send(conn: Connection, message: dict[str, Any]) -> None:  # pragma: no cover - runs in the child
    conn.send_bytes(json.dumps(message, default=str).encode("utf-8"))


def _worker(conn: Connection, data: bytes, name: str, max_side: int | None, formats: Collection[str] | None,
            timeout_s: float, max_memory: int) -> None:  # pragma: no cover - runs in the child
    """Decode and send a JSON header (``ok``, ``shape``, ``meta``) then the float32 pixels as
    raw bytes, or a JSON error (``error``: class name, ``reason``). No pickle crosses back: a
    worker whose decoder was subverted must not be able to run code in the parent."""
    from .io import decode_image

    _limit_self(timeout_s, max_memory)
    try:
        arr, meta = decode_image(data, name, max_side=max_side, formats=formats)
        del data
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        _send(conn, {"ok": True, "shape": list(arr.shape), "meta": meta})
        conn.send_bytes(memoryview(arr).cast("B"))
    except ImageReadError as e:
        _send(conn, {"ok": False, "error": type(e).__name__, "reason": e.reason})
    except MemoryError:
        _send(conn, {"ok": False, "error": "ImageTooLargeError", "reason": "image too large to decode in memory"})
    except Exception as e:  # noqa: BLE001 - a decoder bug: one line for the caller, not a traceback
        _send(conn, {"ok": False, "error": "ImageReadError", "reason": f"cannot decode image ({type(e).__name__})"})
    finally:
        conn.close()


def _parse_header(raw: bytes, name: str) -> tuple[tuple[int, int], dict[str, Any]]:
    """Check the worker's JSON header (it decoded hostile bytes, so it is not trusted
    either): an error becomes the matching exception, with its reason escaped; otherwise
    the image shape, within :data:`~pneumoscan.data.limits.MAX_PIXELS`, and the metadata."""
    try:
        msg = json.loads(raw)
        if not msg["ok"]:
            raise _ERRORS.get(str(msg.get("error")), ImageReadError)(name, safe_text(msg.get("reason"), 300))
        h, w = (int(v) for v in msg["shape"])
        meta = dict(msg["meta"])
    except (ValueError, TypeError, KeyError) as e:
        raise ImageReadError(name, "the decoder process answered nonsense") from e
    if not (0 < h and 0 < w and h * w <= MAX_PIXELS):
        raise ImageReadError(name, "the decoder process answered nonsense")
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


def decode_isolated(
    source: ImageSource,
    name: str | None = None,
    *,
    max_side: int | None = None,
    formats: Collection[str] | None = None,
    timeout_s: float = DECODE_TIMEOUT_S,
    max_memory: int = DECODE_MEMORY,
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`~pneumoscan.data.io.read_image_with_meta` in a worker process that is killed
    when it takes longer than ``timeout_s`` seconds or tries to allocate more than
    ``max_memory`` bytes. Same result, same errors, plus these two.

    The bytes are read here (regular files up to the size limit only), decoded in a fresh
    child process, and the float32 pixels come back through a pipe. Threads may call this
    concurrently; each call has its own worker, so ``max_memory`` is per concurrent call.

    Args:
        source: a path, raw bytes or a binary file object.
        name: the name used in error messages (defaults to the path).
        max_side: as for :func:`~pneumoscan.data.io.read_image`.
        formats: the formats accepted (as for :func:`~pneumoscan.data.io.read_image`).
        timeout_s: wall-clock limit of the decode, worker start included (a few ms with
            ``forkserver``; the first call also starts the server).
        max_memory: address space the worker may add to what it holds when it starts (its
            interpreter and the file's bytes), in bytes.

    Raises:
        ImageReadError: as :func:`~pneumoscan.data.io.read_image` (same subclass and reason),
            or with the reason ``decoding took longer than 10 s``; ImageTooLargeError when the
            decode runs out of ``max_memory``.
    """
    nm = name_of(source, name)
    data = read_bytes(source, nm)
    ctx = _mp_context()
    reader, writer = ctx.Pipe(duplex=False)
    deadline = time.monotonic() + timeout_s
    proc = ctx.Process(target=_worker, args=(writer, data, nm, max_side, formats, timeout_s, max_memory),
                       name="pneumoscan-decode", daemon=True)
    try:
        proc.start()
    except BaseException:
        reader.close()
        writer.close()
        raise
    writer.close()
    del data
    try:
        if not reader.poll(max(0.0, deadline - time.monotonic())):
            raise ImageReadError(nm, f"decoding took longer than {timeout_s:g} s")
        try:
            shape, meta = _parse_header(reader.recv_bytes(_MAX_HEADER_BYTES), nm)
            arr = np.empty(shape, dtype=np.float32)
            if not reader.poll(max(0.0, deadline - time.monotonic())):
                raise ImageReadError(nm, f"decoding took longer than {timeout_s:g} s")
            if reader.recv_bytes_into(memoryview(arr).cast("B")) != arr.nbytes:
                raise ImageReadError(nm, "the decoder process answered nonsense")
        except multiprocessing.BufferTooShort as e:
            raise ImageReadError(nm, "the decoder process answered nonsense") from e
        except (EOFError, OSError):  # the worker died (or sent an oversized header: killed below)
            proc.join(timeout=1)
            raise _died(nm, proc.exitcode, timeout_s) from None
        return arr, meta
    finally:
        reader.close()
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        if proc.exitcode is None:  # pragma: no cover - a kill that did not take
            log.warning("decoder process %s did not exit after SIGKILL", proc.pid)
        else:
            proc.close()
