"""Reading ahead of the model: files are decoded, checked by the guard and preprocessed in a
few threads, in input order, while the previous batch runs.

Each input travels from the reader threads to its batch as one
:class:`~pneumoscan.inference.records.DecodedImage`.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ..data.io import read_image_with_meta
from ..data.preprocessing import preprocess_image
from ..errors import ImageReadError, PneumoscanError
from ..guard.core import decode_checked
from .records import DecodedImage

T = TypeVar("T")
R = TypeVar("R")


def error_reason(e: PneumoscanError) -> str:
    """The one-line reason shown for an unreadable input."""
    return e.reason if isinstance(e, ImageReadError) else str(e)


def decode_file(
    path: str, *, max_side: int, input_size: int, guard: Any = None, timeout_s: float | None = None, digest: bool = False,
) -> DecodedImage:
    """Read one file (JPEGs decoded at reduced size, at least ``max_side``), check it with the
    guard and preprocess it when it passes; a file that cannot be read gives a record with
    ``error`` set instead of an exception.

    Args:
        path: the image file.
        max_side: smallest side large images are decoded at (draft mode).
        input_size: the model's input side.
        guard: the not-a-chest-X-ray guard, or ``None``.
        timeout_s: decode in a worker process killed after this many seconds
            (:func:`~pneumoscan.data.isolated.decode_isolated`); ``None`` decodes in this thread.
        digest: also put the file's and the pixels' digests in the metadata (computed from the
            bytes read and while decoding: no second read or decode).
    """
    check = None
    try:
        if timeout_s is None:
            arr, meta = read_image_with_meta(path, max_side=max_side, digest=digest)
        else:  # the shipped guard checks it in the decoding worker
            arr, meta, check = decode_checked(path, guard, max_side=max_side, timeout_s=timeout_s, digest=digest)
    except PneumoscanError as e:
        return DecodedImage(path, error=error_reason(e))
    except MemoryError:
        return DecodedImage(path, error="image too large to decode in memory")
    if check is None and guard is not None:
        check = guard.check(arr, meta)
    x = preprocess_image(arr, input_size) if check is None or check.ok else None
    return DecodedImage(path, arr, meta, check=check, input=x)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``fn(item)`` for every item, in input order, computed by ``workers`` threads at most
    ``ahead`` items in advance (bounded memory for long lists).

    Args:
        fn: the work per item.
        items: the inputs.
        workers: threads (1: in the caller's thread).
        ahead: most items in flight.
    """
    it = iter(items)
    if workers <= 1:
        for x in it:
            yield fn(x)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pneumoscan-read") as ex:
        q: collections.deque[concurrent.futures.Future[R]] = collections.deque()
        for x in it:
            q.append(ex.submit(fn, x))
            if len(q) >= ahead:
                yield q.popleft().result()
        while q:
            yield q.popleft().result()
