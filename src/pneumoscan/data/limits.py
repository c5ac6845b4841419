"""The reader's resource limits, and the slot that lets one huge image be decoded at a time.

Shared by the byte reading (:mod:`pneumoscan.data.io`), the header checks
(:mod:`pneumoscan.data.formats`), the Pillow decoder (:mod:`pneumoscan.data.pil_reader`), the
DICOM decoder (:mod:`pneumoscan.data.dicom_reader`) and the isolated decoding
(:mod:`pneumoscan.data.isolated`); import the constants from :mod:`pneumoscan.data.io`.
docs/security.md explains each limit.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

#: Largest image (pixels after any draft-mode reduction) pneumoscan decodes.
MAX_PIXELS = 64_000_000
#: Largest file (and largest inflated deflate-compressed DICOM data set) pneumoscan reads;
#: a 64-megapixel image is 128 MB as 16-bit greyscale, 192 MB as 8-bit RGB.
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Images above this many pixels are decoded one at a time per process (decoding needs a
#: few bytes of transient memory per pixel; prediction and the service decode in threads).
BIG_PIXELS = 16_000_000
#: Formats Pillow may decode for us.
PIL_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO"}
#: Estimated working memory of one decode (decoder buffers plus the float32 result), checked
#: from the header before decoding; keeps a single read well under 1 GB of resident memory.
MAX_DECODE_BYTES = 768 * 1024 * 1024
#: Most scans a JPEG may have (libjpeg writes 6 to 10 for a progressive file; each scan is
#: another pass over the whole image).
MAX_JPEG_SCANS = 100
#: Most pixels x scans a multi-scan (progressive) JPEG may cost: 16 scans of 64 megapixels,
#: a few seconds of decoding at most.
MAX_SCAN_PIXELS = 16 * 64_000_000
#: Most frames (animation frames, TIFF pages) an image file may have; only the first is read.
MAX_FRAMES = 64
#: Default wall-clock limit of :func:`pneumoscan.data.isolated.decode_isolated`, in seconds.
DECODE_TIMEOUT_S = 10.0
#: Default memory an isolated decode may add to its worker process (address space, bytes).
DECODE_MEMORY = 1024 * 1024 * 1024

_BIG_DECODES = threading.BoundedSemaphore(1)
_holding = threading.local()
_malloc_trim: Any = None


@contextlib.contextmanager
def big_decode(pixels: int) -> Iterator[None]:
    """Let one thread at a time decode an image of more than :data:`BIG_PIXELS` pixels, so
    that concurrent reads (prediction's read-ahead threads, the service's workers) never add
    up the transient memory of several huge images. Re-entrant within a thread.

    Args:
        pixels: the image's pixel count (or an estimate from its size in bytes).
    """
    if pixels <= BIG_PIXELS or getattr(_holding, "slot", False):
        yield
        return
    with _BIG_DECODES:
        _holding.slot = True
        try:
            yield
        finally:
            _holding.slot = False
            _trim_heap()


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps it in per-thread arenas, so a few
    reader threads that each decoded one huge image would otherwise hold on to it)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
