"""What an input is, decided by its content, and what it will cost to decode, read from its
headers without decoding.

* :func:`sniff_format` names the format from the leading bytes (never from the file name);
  :data:`ACCEPTED_FORMATS` is the reader's format policy.
* :func:`jpeg_info` walks a JPEG's marker stream (frame header, number of scans, sampling
  factors); :func:`check_jpeg` refuses files whose decoding would take minutes.
* :func:`count_frames` counts GIF images and TIFF pages, stopping early.

Pure Python on bytes; no decoder runs here. docs/security.md describes the policy.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..errors import ImageTooLargeError
from .limits import MAX_JPEG_SCANS, MAX_SCAN_PIXELS

__all__ = ["ACCEPTED_FORMATS", "JpegInfo", "check_jpeg", "count_frames", "jpeg_info", "sniff_format"]

#: Every format the reader decodes. Anything else is refused, whatever the file is called.
#: (MPO, a JPEG holding several pictures, counts as JPEG.)
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "DICOM"})

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
# Value representations that may follow the first tag of a DICOM data set written without
# the Part-10 preamble, in explicit-VR encoding.
_DICOM_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF", b"OL",
    b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US",
    b"UT", b"UV",
}


def _is_dicom_dataset(data: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble: its first element belongs to the file
    meta group (0002) or the identifying group (0008), little endian, with a known VR
    (explicit) or a length that fits in the file (implicit)."""
    if len(data) < 8:
        return False
    group = struct.unpack_from("<H", data)[0]
    if group not in (0x0002, 0x0008):
        return False
    if data[4:6] in _DICOM_VRS:
        return True
    length = struct.unpack_from("<I", data, 4)[0]
    return length <= len(data) - 8


def sniff_format(data: bytes) -> str | None:
    """The format of an image file from its content: one of :data:`ACCEPTED_FORMATS`, or
    ``None`` for anything else. The file name and any declared media type play no part.

    Args:
        data: the file's bytes (the first 132 are enough).
    """
    head = bytes(data[:132])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(_TIFF_MAGIC):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
        return "BMP"
    if _is_dicom_dataset(head):
        return "DICOM"
    return None


@dataclass(frozen=True)
class JpegInfo:
    """What a JPEG's headers say about the cost of decoding it.

    Attributes:
        width, height: the frame's size in pixels.
        components: colour components (1 grey, 3 YCbCr, 4 CMYK).
        progressive: a progressive frame (SOF2/6/10/14).
        scans: start-of-scan segments counted (stops one past the limit it was given).
        coefficient_bytes: the DCT coefficient buffer a multi-scan file needs while decoding
            (2 bytes per coefficient of every component, at full size whatever the draft
            mode; 0 for a single-scan file).
    """

    width: int
    height: int
    components: int
    progressive: bool
    scans: int
    coefficient_bytes: int


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# The next marker after entropy-coded data: 0xFF followed by anything but a stuffed zero, a
# restart marker (RST0-7) or another fill byte.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_info(data: bytes, max_scans: int) -> JpegInfo | None:
    """Walk the marker stream of the first picture in a JPEG, up to its EOI.

    Cost: one pass over the bytes (a C regular expression skips the entropy-coded data),
    stopping as soon as more than ``max_scans`` scans are seen.

    Args:
        data: the whole file.
        max_scans: stop counting after ``max_scans + 1`` scans.

    Returns:
        The frame's geometry and scan count, or ``None`` when no frame header is found
        before the stream ends or breaks (the decoder then reports the corruption).
    """
    n, pos = len(data), 2
    sof: tuple[int, int, bool, list[tuple[int, int]]] | None = None
    scans = 0
    while pos + 4 <= n and scans <= max_scans:
        if data[pos] != 0xFF:
            break  # corrupt stream
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker == 0xD9:  # EOI
            break
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker in _SOF_MARKERS and sof is None and pos + 10 <= n:
            height, width, ncomp = struct.unpack_from(">HHB", data, pos + 5)
            sampling = [(data[i] >> 4, data[i] & 15) for i in range(pos + 11, min(pos + 11 + 3 * ncomp, n), 3)]
            sof = (width, height, marker in _PROGRESSIVE_MARKERS, sampling)
        if marker == 0xDA:
            scans += 1
            m = _NEXT_MARKER.search(data, end)
            if m is None:
                break
            pos = m.start()
            continue
        pos = end
    if sof is None:
        return None
    width, height, progressive, sampling = sof
    coef = 0
    if progressive or scans > 1:
        hmax = max((h for h, _ in sampling), default=1) or 1
        vmax = max((v for _, v in sampling), default=1) or 1
        coef = sum(2 * -(-width * h // hmax) * -(-height * v // vmax) for h, v in sampling)
    return JpegInfo(width, height, len(sampling), progressive, scans, coef)


def check_jpeg(data: bytes, name: str) -> JpegInfo | None:
    """Refuse a JPEG whose scans would make decoding take minutes: each scan of a
    progressive (or multi-scan) file is another pass over every coefficient of the image,
    so the cost grows with pixels x scans, while the file grows only with the scans' few
    header bytes.

    Args:
        data: a JPEG stream (a file, or a frame of a DICOM file).
        name: the name used in error messages.

    Returns:
        :func:`jpeg_info`'s answer (``None`` for a stream without a frame header).

    Raises:
        ImageTooLargeError: more than :data:`~pneumoscan.data.limits.MAX_JPEG_SCANS` scans,
            or a multi-scan file over :data:`~pneumoscan.data.limits.MAX_SCAN_PIXELS`.
    """
    info = jpeg_info(data, MAX_JPEG_SCANS)
    if info is None:
        return None
    if info.scans > MAX_JPEG_SCANS:
        raise ImageTooLargeError(name, f"JPEG with more than {MAX_JPEG_SCANS} scans (too costly to decode)")
    if info.scans > 1 and info.width * info.height * info.scans > MAX_SCAN_PIXELS:
        raise ImageTooLargeError(
            name, f"JPEG too costly to decode ({info.width}x{info.height} pixels x {info.scans} scans; "
                  f"limit {MAX_SCAN_PIXELS:,} pixel-scans)")
    return info


def _gif_frames(data: bytes, limit: int) -> int:
    n = len(data)
    if n < 13:
        return 1
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0

    def skip_blocks(p: int) -> int:
        while p < n:
            size = data[p]
            p += 1 + size
            if size == 0:
                break
        return p

    while pos < n and frames <= limit:
        kind = data[pos]
        if kind == 0x2C:  # image descriptor
            frames += 1
            if pos + 10 > n:
                break
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW code size
            pos = skip_blocks(pos)
        elif kind == 0x21:  # extension
            pos = skip_blocks(pos + 2)
        else:  # trailer or junk
            break
    return max(frames, 1)


def _tiff_frames(data: bytes, limit: int) -> int:
    n = len(data)
    end = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        off_fmt, count_fmt, entry, first = end + "Q", end + "Q", 20, 8
    else:
        off_fmt, count_fmt, entry, first = end + "I", end + "H", 12, 4
    osize, csize = struct.calcsize(off_fmt), struct.calcsize(count_fmt)
    if first + osize > n:
        return 1
    offset = struct.unpack_from(off_fmt, data, first)[0]
    seen: set[int] = set()
    frames = 0
    while 0 < offset and offset + csize <= n and offset not in seen and frames <= limit:
        seen.add(offset)
        frames += 1
        count = struct.unpack_from(count_fmt, data, offset)[0]
        nxt = offset + csize + count * entry
        if nxt + osize > n:
            break
        offset = struct.unpack_from(off_fmt, data, nxt)[0]
    return max(frames, 1)


def count_frames(data: bytes, fmt: str, limit: int) -> int | None:
    """The number of images in a GIF or pages in a TIFF, counted from the block structure
    without decoding and stopping after ``limit + 1`` (Pillow's own count walks the whole
    file). ``None`` for other formats, whose headers state the count (PNG ``acTL``, WebP,
    MPO: ask Pillow's ``n_frames``).

    Args:
        data: the whole file.
        fmt: its format (:func:`sniff_format`).
        limit: stop counting past this many.
    """
    if fmt == "GIF":
        return _gif_frames(data, limit)
    if fmt == "TIFF":
        return _tiff_frames(data, limit)
    return None
