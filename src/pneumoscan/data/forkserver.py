"""The ``multiprocessing`` context of the decoding workers (:mod:`pneumoscan.data.decode_pool`)
and an early start of its forkserver.

Kept free of NumPy and Pillow, so that the ``pneumoscan`` command can start the forkserver
first thing: the server then imports the reader and the guard on another core while the
command imports everything else and loads the model, and the first worker is ready sooner.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from typing import Any

__all__ = ["PRELOAD", "mp_context", "start_forkserver"]

log = logging.getLogger(__name__)

#: What the forkserver imports once, so that a worker starts ready to decode.
#: pydicom is not: a worker loads it before its first DICOM file, outside that file's time limit.
#: The shipped guard is, loaded and ready (by name: ``predict`` and the service have the workers
#: run it after decoding, and its start-up must not count against an image's time limit).
PRELOAD = ["__main__", "pneumoscan.data.decode_worker", "pneumoscan.guard.warm", "PIL.BmpImagePlugin", "PIL.GifImagePlugin",
           "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "PIL.PpmImagePlugin", "PIL.TiffImagePlugin",
           "PIL.WebPImagePlugin"]

_context: Any = None
_context_lock = threading.Lock()


def mp_context() -> Any:
    """The multiprocessing context of the workers: the forkserver, preloading :data:`PRELOAD`
    (``spawn`` where there is no forkserver; never a plain ``fork`` of a threaded caller)."""
    global _context
    with _context_lock:
        if _context is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                _context = multiprocessing.get_context("forkserver")
                _context.set_forkserver_preload(PRELOAD)
            else:  # pragma: no cover - Windows
                _context = multiprocessing.get_context("spawn")
        return _context


def start_forkserver() -> bool:
    """Start the forkserver now, if this platform has one (it imports :data:`PRELOAD` in the
    background); ``False`` when it has none or could not be started (the pool starts it, or
    reports why, on first use)."""
    if mp_context().get_start_method() != "forkserver":  # pragma: no cover - Windows
        return False
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
        return True
    except (OSError, ValueError) as e:  # pragma: no cover - the pool's own start reports it
        log.debug("forkserver not started early: %s", e)
        return False


def _after_fork_in_child() -> None:  # pragma: no cover - runs in a forked child
    """A lock another thread may have held at the fork is a new one in the child."""
    global _context_lock
    _context_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
