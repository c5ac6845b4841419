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
from .io import ImageSource, name_of, read_bytes
from .limits import DECODE_MEMORY, DECODE_TIMEOUT_S

__all__ = ["decode_isolated"]

log = logging.getLogger(__name__)

_ERRORS = {cls.__name__: cls for cls in (ImageReadError, UnsupportedFormatError, ImageTooLargeError)}
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


def _worker(conn: Connection, data: bytes, name: str, max_side: int | None, formats: Collection[str] | None,
            timeout_s: float, max_memory: int) -> None:  # pragma: no cover - runs in the child
    """Decode and send ``("ok", shape, meta)`` then the pixels as raw bytes, or
    ``("error", class name, reason)``."""
    from .io import decode_image

    _limit_self(timeout_s, max_memory)
    try:
        arr, meta = decode_image(data, name, max_side=max_side, formats=formats)
        del data
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        conn.send(("ok", arr.shape, meta))
        conn.send_bytes(memoryview(arr).cast("B"))
    except ImageReadError as e:
        conn.send(("error", type(e).__name__, e.reason))
    except MemoryError:
        conn.send(("error", "ImageTooLargeError", f"image too large to decode within {max_memory >> 20:,} MB"))
    except Exception as e:  # noqa: BLE001 - a decoder bug: one line for the caller, not a traceback
        conn.send(("error", "ImageReadError", f"cannot decode image ({type(e).__name__})"))
    finally:
        conn.close()


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
            msg = reader.recv()
            if msg[0] == "error":
                raise _ERRORS.get(msg[1], ImageReadError)(nm, msg[2])
            _, shape, meta = msg
            arr = np.empty(shape, dtype=np.float32)
            if arr.nbytes and not reader.poll(max(0.0, deadline - time.monotonic())):
                raise ImageReadError(nm, f"decoding took longer than {timeout_s:g} s")
            if arr.nbytes:
                reader.recv_bytes_into(memoryview(arr).cast("B"))
        except (EOFError, OSError):
            proc.join(timeout=5)
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
