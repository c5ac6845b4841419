"""One image reader for chest X-rays: JPEG/PNG/BMP/TIFF/GIF/WebP via Pillow and DICOM via pydicom.

Every path returns a 2-D ``float32`` greyscale array in ``[0, 1]``. 16-bit data (PNG ``I;16``,
DICOM) keeps its full precision until this final normalisation. DICOM handling follows the
standard display pipeline: modality LUT (rescale slope/intercept), VOI LUT or window, then
MONOCHROME1 inversion so that bone is always bright.

The content decides the decoder, never the file name: :func:`~pneumoscan.data.formats.sniff_format`
names the format from the leading bytes, and only formats of
:data:`~pneumoscan.data.formats.ACCEPTED_FORMATS` (or the narrower set a caller passes) are
decoded. Hostile input gets one :class:`~pneumoscan.errors.ImageReadError` naming the file,
never a hang or unbounded memory: only regular files up to :data:`MAX_FILE_BYTES` are read (no
FIFOs or devices); pixel counts, frame counts, JPEG scan counts and the estimated working
memory are checked from the headers before decoding; images above :data:`BIG_PIXELS` are
decoded one at a time per process. For a hard bound on time and memory, decode in a worker
process with :func:`pneumoscan.data.isolated.decode_isolated`. docs/security.md has the details.

This module reads the bytes and picks the decoder: :mod:`pneumoscan.data.pil_reader` (Pillow)
or :mod:`pneumoscan.data.dicom_reader` (pydicom); the limits live in
:mod:`pneumoscan.data.limits` and are re-exported here.
"""
from __future__ import annotations

import os
import stat
from typing import IO, Any, Collection, Union

import numpy as np

from ..core.fingerprint import FILE_KEY, file_digest
from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from .dicom_reader import read_dicom
from .formats import ACCEPTED_FORMATS, sniff_format
from .limits import BIG_PIXELS, MAX_FILE_BYTES, MAX_PIXELS, PIL_FORMATS
from .pil_reader import read_pil

__all__ = [
    "ACCEPTED_FORMATS", "BIG_PIXELS", "IMAGE_SUFFIXES", "MAX_FILE_BYTES", "MAX_PIXELS", "PIL_FORMATS", "ImageSource",
    "decode_image", "is_dicom", "name_of", "read_bytes", "read_image", "read_image_with_meta",
]

ImageSource = Union[str, os.PathLike, bytes, bytearray, IO[bytes]]

#: File name endings that folder scans pick up as candidate images (listing only: the content
#: still decides whether and how a file is decoded).
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def name_of(source: ImageSource, name: str | None) -> str:
    """The name error messages use: ``name``, else the path, else ``"<bytes>"``.

    Args:
        source: a path, bytes or a binary stream.
        name: an explicit name, or ``None``.
    """
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<bytes>"


def _too_big(name: str, size: int) -> ImageTooLargeError:
    return ImageTooLargeError(name, f"file too large ({size:,} bytes; limit {MAX_FILE_BYTES:,})")


def read_bytes(source: ImageSource, name: str) -> bytes:
    """The raw bytes of ``source``, refusing anything but regular files (a FIFO or a device
    such as /dev/zero would hang or never end) and anything over :data:`MAX_FILE_BYTES`.

    Args:
        source: a path, bytes or a binary stream.
        name: the name used in error messages.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_FILE_BYTES:
            raise _too_big(name, len(source))
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; harmless for files.
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError as e:
            raise ImageReadError(name, "file not found") from e
        except IsADirectoryError as e:
            raise ImageReadError(name, "is a directory, not an image") from e
        except (OSError, ValueError) as e:  # ValueError: embedded NUL byte in the path
            reason = getattr(e, "strerror", None) or str(e)
            raise ImageReadError(name, f"cannot open file ({reason})") from e
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageReadError(name, "is a directory, not an image")
            if not stat.S_ISREG(st.st_mode):
                raise ImageReadError(name, "not a regular file (device, pipe or socket)")
            if st.st_size > MAX_FILE_BYTES:
                raise _too_big(name, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as fh:
            try:
                data = fh.read(MAX_FILE_BYTES + 1)
            except OSError as e:
                raise ImageReadError(name, f"cannot read file ({e.strerror or e})") from e
    else:
        read = getattr(source, "read", None)
        if read is None:
            raise ImageReadError(name, f"not a path, bytes or binary stream ({type(source).__name__})")
        try:
            data = read(MAX_FILE_BYTES + 1)
        except Exception as e:  # noqa: BLE001 - any stream failure is a read error
            raise ImageReadError(name, f"cannot read stream ({e})") from e
        if not isinstance(data, (bytes, bytearray)):
            raise ImageReadError(name, "stream did not return bytes (open it in binary mode)")
    if len(data) > MAX_FILE_BYTES:
        raise _too_big(name, len(data))
    return bytes(data)


def is_dicom(data: bytes) -> bool:
    """True if the bytes carry the DICOM Part-10 preamble magic."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_image(
    source: ImageSource, *, max_side: int | None = None, name: str | None = None, formats: Collection[str] | None = None
) -> np.ndarray:
    """Read an X-ray as a 2-D float32 array in ``[0, 1]``.

    Args:
        source: a path, raw bytes or a binary file object.
        max_side: if given, large images come back reduced, each side never below
            ``max_side``: JPEGs are decoded at reduced size (Pillow draft mode, much faster
            for multi-megapixel files), other formats are box-filtered after decoding by the
            integer factor that keeps the short side >= ``max_side``.
        name: the name used in error messages (defaults to the path).
        formats: the formats accepted (names as :func:`~pneumoscan.data.formats.sniff_format`
            gives them, e.g. ``{"JPEG", "PNG", "DICOM"}``); ``None``: all of
            :data:`ACCEPTED_FORMATS`.

    Raises:
        ImageReadError: unreadable, truncated, empty or non-image input (the subclasses
            UnsupportedFormatError and ImageTooLargeError say which).
    """
    return read_image_with_meta(source, max_side=max_side, name=name, formats=formats)[0]


def read_image_with_meta(
    source: ImageSource, *, max_side: int | None = None, name: str | None = None, formats: Collection[str] | None = None,
    digest: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Like :func:`read_image`, also returning metadata.

    The metadata dict has ``format``, ``mode`` (Pillow mode or DICOM photometric
    interpretation), ``bits``, ``original_size`` ``(width, height)`` (as displayed, after the
    EXIF orientation), for Pillow formats the colour statistics ``colour``, ``saturation`` and
    ``colour_fraction``, and for DICOM ``modality`` and ``body_part`` (sanitised text).

    Args:
        source: a path, raw bytes or a binary file object.
        max_side: as for :func:`read_image`.
        name: the name used in error messages (defaults to the path).
        formats: as for :func:`read_image`.
        digest: also give the content digests (see :func:`decode_image`).
    """
    nm = name_of(source, name)
    return decode_image(read_bytes(source, nm), nm, max_side=max_side, formats=formats, digest=digest)


def decode_image(
    data: bytes, name: str, *, max_side: int | None = None, formats: Collection[str] | None = None, digest: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a whole file already in memory (what :func:`read_image_with_meta` does after
    reading the bytes; :func:`~pneumoscan.data.isolated.decode_isolated` runs it in a worker).

    Args:
        data: the file's bytes.
        name: the name used in error messages.
        max_side: as for :func:`read_image`.
        formats: as for :func:`read_image`.
        digest: also put the content digests of :mod:`pneumoscan.core.fingerprint` in the
            metadata, as hex: ``file_sha256`` (the bytes) and ``pixel_sha256`` (the pixels at
            full resolution, hashed while decoding; ``None`` when a JPEG was decoded at reduced
            size only).

    Raises:
        ImageReadError: and its subclasses UnsupportedFormatError, ImageTooLargeError.
    """
    arr, meta = _decode(data, name, max_side, formats, digest)
    if digest:
        meta[FILE_KEY] = file_digest(data).hex()
    return arr, meta


def _decode(
    data: bytes, name: str, max_side: int | None, formats: Collection[str] | None, digest: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    fmt = sniff_format(data)
    allowed = ACCEPTED_FORMATS if formats is None else frozenset(f.upper() for f in formats)
    if fmt is None:
        expected = "JPEG, PNG or DICOM" if {"JPEG", "PNG", "DICOM"} <= allowed else ", ".join(sorted(allowed))
        raise UnsupportedFormatError(name, f"not a recognised image ({expected} expected)")
    if fmt not in allowed:
        raise UnsupportedFormatError(name, f"{fmt} images are not accepted here ({', '.join(sorted(allowed))} expected)")
    if fmt == "DICOM":
        return read_dicom(data, name, max_side, digest)
    return read_pil(data, name, max_side, fmt, digest)
