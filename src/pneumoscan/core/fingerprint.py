"""Content fingerprints of images: truncated sha256 digests of a file's bytes and of its decoded
pixels (hashlib and NumPy only).

The *pixel digest* hashes the image's size and its greyscale pixels quantised to 8 bits
(``rint(255 · value)``, the reader's ``[0, 1]`` floats), at full resolution and as displayed
(EXIF orientation applied). An 8-bit image re-saved losslessly in another container (JPEG → PNG,
PNG → BMP or an 8-bit DICOM) or renamed keeps it; the *file digest* names the exact file. A
model bundle records both for the images it was trained and calibrated on
(:mod:`pneumoscan.data.fingerprints`), so predictions on them can be flagged.

The readers compute the pixel digest while they decode (band by band, before any size
reduction), when asked to: see ``digest=`` of :func:`pneumoscan.data.io.decode_image`. They
put the hex digests in the image's metadata under :data:`FILE_KEY` and :data:`PIXEL_KEY`.
"""
from __future__ import annotations

import hashlib

import numpy as np

#: Bytes kept of each sha256 digest (128 bits: no accidental collision among billions of images).
DIGEST_BYTES = 16
#: Metadata keys of the readers' digests (hex strings; the pixel digest ``None`` when the image
#: was decoded at reduced size only, e.g. a JPEG in draft mode).
FILE_KEY = "file_sha256"
PIXEL_KEY = "pixel_sha256"

__all__ = ["DIGEST_BYTES", "FILE_KEY", "PIXEL_KEY", "PixelHasher", "file_digest", "pixel_digest"]


def file_digest(data: bytes) -> bytes:
    """The truncated sha256 of a file's bytes.

    Args:
        data: the whole file.
    """
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


class PixelHasher:
    """The pixel digest of an image fed in horizontal bands, top to bottom (the readers decode
    large images band by band).

    Args:
        height: the image's rows.
        width: its columns.
    """

    def __init__(self, height: int, width: int) -> None:
        self._h = hashlib.sha256(f"pneumoscan-pixels/1 {int(height)}x{int(width)}\n".encode("ascii"))
        self._width = int(width)

    def update(self, band: np.ndarray) -> None:
        """Add the next rows.

        Args:
            band: ``(rows, width)`` greyscale floats in ``[0, 1]``.

        Raises:
            ValueError: a band of another width.
        """
        band = np.asarray(band)
        if band.ndim != 2 or band.shape[1] != self._width:
            raise ValueError(f"band of shape {band.shape} for an image {self._width} pixels wide")
        q = np.rint(np.clip(band.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
        self._h.update(np.ascontiguousarray(q).data)

    def digest(self) -> bytes:
        """The truncated digest of the rows added so far."""
        return self._h.digest()[:DIGEST_BYTES]


def pixel_digest(image: np.ndarray) -> bytes:
    """The pixel digest of a whole decoded image.

    Args:
        image: a 2-D greyscale float array in ``[0, 1]`` (as the reader returns it).

    Raises:
        ValueError: not a 2-D array.
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D greyscale image, got shape {a.shape}")
    h = PixelHasher(*a.shape)
    h.update(a)
    return h.digest()
