"""Decoding in a worker process that can be stopped: a hard bound on the time and memory one
image may cost, whatever the decoder does with it.

The header checks of the reader refuse the known ways to make decoding slow or large
(docs/security.md); :func:`decode_isolated` bounds everything else. It runs on a pool of
long-lived worker processes (:mod:`pneumoscan.data.decode_pool`): each decode has a memory
cap in its worker and a wall-clock deadline at which the caller kills the worker and replaces
it. The web service calls it for every upload; the CLI for each file when given a per-file
limit.
"""
from __future__ import annotations

from typing import Any, Callable, Collection

import numpy as np

from ..core.fingerprint import DIGEST_BYTES, FILE_KEY, PIXEL_KEY, file_digest
from .decode_pool import default_pool
from .decode_worker import after_spec
from .io import ImageSource, name_of, read_bytes
from .limits import DECODE_MEMORY, DECODE_TIMEOUT_S

__all__ = ["decode_isolated", "start_decoders"]


def decode_isolated(
    source: ImageSource,
    name: str | None = None,
    *,
    max_side: int | None = None,
    formats: Collection[str] | None = None,
    timeout_s: float = DECODE_TIMEOUT_S,
    max_memory: int = DECODE_MEMORY,
    digest: bool = False,
    after: Callable[[np.ndarray, dict[str, Any]], Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`~pneumoscan.data.io.read_image_with_meta` in a worker process that is killed
    when it takes longer than ``timeout_s`` seconds or tries to allocate more than
    ``max_memory`` bytes. Same result, same errors, plus these two.

    The bytes are read here (regular files up to the size limit only), decoded by a worker of
    the process-wide pool (started on first use, ``min(4, CPUs)`` processes, reused), and the
    float32 pixels come back over a socket as raw bytes. Threads may call this concurrently;
    each call has a worker to itself (waiting for a free one when all are busy), so memory is
    at most ``max_memory`` per worker.

    Args:
        source: a path, raw bytes or a binary file object.
        name: the name used in error messages (defaults to the path).
        max_side: as for :func:`~pneumoscan.data.io.read_image`.
        formats: the formats accepted (as for :func:`~pneumoscan.data.io.read_image`).
        timeout_s: wall-clock limit of the decode, transfers included (not the wait for a
            free worker, nor starting one).
        max_memory: address space the worker may add to what it holds when the task starts
            (its interpreter and the file's bytes), in bytes.
        digest: also give the content digests in the metadata (see
            :func:`~pneumoscan.data.io.decode_image`).
        after: a module-level pneumoscan function ``f(pixels, meta)`` with a JSON-ready result,
            run in the worker on the decoded image as well (per-image work that would
            otherwise compete for this interpreter's lock); its result is ``meta["after"]``
            (``None`` when it failed in the worker: do the work here then). Not trusted more
            than the pixels: the caller checks its shape.

    Raises:
        ImageReadError: as :func:`~pneumoscan.data.io.read_image` (same subclass and reason),
            or with the reason ``decoding took longer than 10 s``; ImageTooLargeError when the
            decode runs out of ``max_memory``.
    """
    nm = name_of(source, name)
    data = read_bytes(source, nm)
    arr, meta = default_pool().decode(data, nm, max_side=max_side, formats=formats, timeout_s=timeout_s,
                                      max_memory=max_memory, digest=digest, after=after_spec(after) if after else None)
    if after is None:
        meta.pop("after", None)
    else:
        meta.setdefault("after", None)
    if digest:  # the file's digest from the bytes here; the worker's pixel digest only if well-formed
        px = meta.get(PIXEL_KEY)
        meta[PIXEL_KEY] = px if isinstance(px, str) and len(px) == 2 * DIGEST_BYTES and all(c in "0123456789abcdef" for c in px) else None
        meta[FILE_KEY] = file_digest(data).hex()
    return arr, meta


def start_decoders(*, nice: int | None = None) -> None:
    """Start the decoding workers in the background, so that they are ready (the first start
    takes about a second) by the time :func:`decode_isolated` needs them.

    Args:
        nice: niceness the workers started from now on add to this process's (``None``: the
            pool's setting; see :mod:`pneumoscan.data.decode_pool`).
    """
    pool = default_pool()
    if nice is not None:
        pool.nice = int(nice)
    pool.start()
