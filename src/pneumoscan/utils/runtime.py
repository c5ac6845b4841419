"""Process-wide runtime settings that the ``pneumoscan`` command applies at start-up.

glibc's ``malloc`` serves blocks above a *dynamic* threshold (128 KiB at start) with ``mmap``
and returns freed memory at the top of the heap to the system. PyTorch's CPU kernels (oneDNN)
allocate and free activation buffers of several MB on every forward and backward pass, so with
the defaults each pass page-faults fresh zeroed memory in again. Raising both thresholds keeps
those buffers in the heap. Measured on a 2-core CPU (docs/benchmarks.md): MobileNetV2 fp32
inference 70 → 210 img/s, fp32 fine-tuning 20 → 36 img/s; onnxruntime (its own arena) and
bf16 autocast are unaffected. The price: up to :data:`TRIM_THRESHOLD` of freed memory stays
with the process instead of going back to the system.

The decoding worker processes tune their own allocator at start, with lower thresholds
(:data:`WORKER_MMAP_THRESHOLD`, :data:`WORKER_TRIM_THRESHOLD`): with glibc's defaults the
reader's and the guard's image-sized arrays page-fault in anew for every image (about 25 faults
an image; 624 images: 95,000 → 7,500 page faults, about 6 % less of the workers' CPU time).

Set ``PNEUMOSCAN_MALLOC=system`` to keep the C library's defaults. Nothing is changed when the
process already chose (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``, or another allocator preloaded), or off glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

#: Blocks up to this size come from the heap, not from ``mmap``.
MMAP_THRESHOLD = 128 * 1024 * 1024
#: Free memory at the top of the heap kept before it is returned to the system.
TRIM_THRESHOLD = 256 * 1024 * 1024
#: The decoding worker processes' thresholds (:mod:`pneumoscan.data.decode_worker`): their
#: image-sized buffers (a few hundred KB each, several per image) stay in the heap, and at most
#: this little freed memory stays with a worker, which is replaced when it holds too much.
WORKER_MMAP_THRESHOLD = 4 * 1024 * 1024
WORKER_TRIM_THRESHOLD = 16 * 1024 * 1024
#: ``PNEUMOSCAN_MALLOC=system`` keeps glibc's defaults.
ENV = "PNEUMOSCAN_MALLOC"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_state: dict[str, Any] = {}


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Args:
        mmap_threshold: blocks up to this size (bytes) come from the heap.
        trim_threshold: free memory (bytes) at the top of the heap kept from the system.

    Returns:
        What the allocator runs with: ``"tuned"``, or why not (``"system (PNEUMOSCAN_MALLOC)"``,
        ``"system (MALLOC_TRIM_THRESHOLD_ set)"``, ``"system (not glibc)"``, ...). Also
        available afterwards from :func:`malloc_setting`.
    """
    if _state.get("setting") == "tuned" and _state.get("thresholds") == (mmap_threshold, trim_threshold):
        return "tuned"
    _state["setting"] = setting = _tune(mmap_threshold, trim_threshold)
    _state["thresholds"] = (mmap_threshold, trim_threshold)
    log.debug("allocator: %s", setting)
    return setting


def _tune(mmap_threshold: int, trim_threshold: int) -> str:
    if os.environ.get(ENV, "").strip().lower() in ("system", "off", "0", "no"):
        return f"system ({ENV})"
    for k in _USER_SETTINGS:
        if k in os.environ:
            return f"system ({k} set)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload or "jemalloc" in preload:
        return "system (allocator preloaded)"
    if not sys.platform.startswith("linux"):
        return "system (not glibc)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system (not glibc)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) != 1 or mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) != 1:
        return "system (mallopt refused)"
    return "tuned"


def malloc_setting() -> str:
    """The allocator setting of this process as :func:`tune_malloc` left it (``"system"`` if
    it was never called)."""
    return _state.get("setting", "system")
