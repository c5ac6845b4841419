"""Decoding JPEG/PNG/BMP/TIFF/GIF/WebP with Pillow: cost checks from the headers, greyscale
conversion in bands, EXIF orientation, colour statistics, and the reductions to ``[0, 1]``
and to a smaller size that the DICOM decoder shares.

Only the Pillow plugin of the format the content names (:func:`~pneumoscan.data.formats.sniff_format`)
parses the bytes. Before decoding, an image is refused when it declares more than
:data:`~pneumoscan.data.limits.MAX_PIXELS`, more than
:data:`~pneumoscan.data.limits.MAX_FRAMES` frames, a JPEG scan count or pixels x scans over
:data:`~pneumoscan.data.limits.MAX_JPEG_SCANS` / :data:`~pneumoscan.data.limits.MAX_SCAN_PIXELS`,
or an estimated working memory over :data:`~pneumoscan.data.limits.MAX_DECODE_BYTES`. After
decoding, the only full-size buffer is Pillow's image: conversion to greyscale float32 and the
box reduction run on bands of rows. Use :func:`pneumoscan.data.io.read_image`, not this module.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageFile

from ..core.fingerprint import PIXEL_KEY, PixelHasher, pixel_digest
from ..errors import ImageReadError, ImageTooLargeError
from ..utils.text import safe_text
from .formats import JpegInfo, check_jpeg, count_frames
from .limits import MAX_DECODE_BYTES, MAX_FRAMES, MAX_PIXELS, PIL_FORMATS, big_decode

# Pillow's own bomb check raises at 2x this; keep it consistent with ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Pixels per band of rows converted at a time (a few MB of temporaries whatever the size).
_BAND_PIXELS = 1 << 20
#: Bytes per pixel of Pillow's storage for each mode (4 for the modes not listed).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Decoder buffers per pixel beyond the image: libwebp keeps two RGBA canvases and hands
#: Pillow a third copy; libtiff reads whole strips or tiles.
_DECODER_BYTES = {"WEBP": 12, "TIFF": 4}
_ALPHA_MODES = ("RGBA", "LA", "PA")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# EXIF Orientation -> the array operation that shows the picture upright (ImageOps.exif_transpose).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1, :], 5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T, 8: lambda a: np.rot90(a, 1),
}


def reduction_factor(height: int, width: int, max_side: int | None) -> int:
    """The integer box-filter factor that keeps the short side >= ``max_side`` (1: none).

    Args:
        height, width: the decoded size.
        max_side: the smallest side the caller needs; ``None`` keeps the full resolution.
    """
    if not max_side:
        return 1
    k = min(height, width) // max_side
    return k if k >= 2 else 1


def _reduce(arr: np.ndarray, k: int) -> np.ndarray:
    if k < 2:
        return arr
    out = np.array(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).reduce(k), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _band_rows(width: int, unit: int) -> int:
    """Rows per band: about :data:`_BAND_PIXELS` pixels, a multiple of ``unit`` so that the
    reduction's blocks never straddle two bands (the result equals a whole-image reduce)."""
    return max(unit, (_BAND_PIXELS // max(width, 1)) // unit * unit)


def reduce_image(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink a decoded image by an integer box filter (Pillow ``reduce``) when both sides are
    at least twice ``max_side``, keeping every side >= ``max_side`` — what JPEG draft mode does
    while decoding, for every format. Works on bands of rows, so it needs no full-size copy.

    Args:
        arr: 2-D float32 image in [0, 1].
        max_side: the smallest side the caller needs; ``None`` keeps the full resolution.
    """
    if arr.ndim != 2:
        return arr
    k = reduction_factor(arr.shape[0], arr.shape[1], max_side)
    if k < 2:
        return arr
    rows = _band_rows(arr.shape[1], k)
    return _assemble(((y, _reduce(arr[y : y + rows], k)) for y in range(0, arr.shape[0], rows)), arr.shape, k)


def _assemble(bands: Iterator[tuple[int, np.ndarray]], shape: tuple[int, int], k: int) -> np.ndarray:
    """Write reduced bands ``(first input row, array)`` into one preallocated result of
    Pillow ``reduce``'s size (no concatenation copy of a full-size image)."""
    out = np.empty((-(-shape[0] // k), -(-shape[1] // k)), dtype=np.float32)
    for y, band in bands:
        out[y // k : y // k + band.shape[0]] = band
    return out


def finite_range(a: np.ndarray) -> tuple[float, float] | None:
    """The finite minimum and maximum of ``a`` (``None`` when nothing is finite or ``a`` is empty).

    Args:
        a: a numeric array.
    """
    if a.size == 0:
        return None
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            if not finite.any():
                return None
            a = a[finite]
    return float(a.min()), float(a.max())


def minmax(a: np.ndarray, bounds: tuple[float, float] | None = None, *, inplace: bool = False) -> np.ndarray:
    """Scale to ``[0, 1]`` by the finite minimum and maximum (NaN/inf become the minimum),
    as float32 without float64 temporaries the size of the image.

    Args:
        a: a numeric array of any shape (a constant array gives zeros).
        bounds: ``(lo, hi)`` to scale by instead of ``a``'s own range (:func:`finite_range`
            of the whole image, when ``a`` is a band of it).
        inplace: a writable float32 ``a`` may be overwritten with the result (saves a
            full-size buffer).
    """
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        a = a.astype(np.float64)
    rng = bounds if bounds is not None else finite_range(a)
    if rng is None or not rng[1] > rng[0]:
        return np.zeros(a.shape, dtype=np.float32)
    lo, hi = rng
    reuse = inplace and a.dtype == np.float32 and a.flags.writeable
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            if reuse:
                a[~finite] = lo
            else:
                a = np.where(finite, a, lo)
    span = hi - lo
    if span < 1e37:  # a - lo fits float32: subtract straight into the float32 output
        out = a if reuse else np.empty(a.shape, dtype=np.float32)
        np.subtract(a, lo, out=out, casting="unsafe")
        out /= np.float32(span)
    else:  # extreme float data: bring it into [-1, 1] first so that nothing overflows
        m = max(abs(lo), abs(hi))
        b = np.asarray(a, dtype=np.float64) / m
        out = ((b - lo / m) / (hi / m - lo / m)).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _decode_cost(fmt: str, mode: str, w: int, h: int, k: int, jpeg: JpegInfo | None) -> int:
    """Estimated peak working memory (bytes): the decoded image, the decoder's own buffers
    and the float32 result."""
    px = w * h
    cost = px * (_MODE_BYTES.get(mode, 4) + _DECODER_BYTES.get(fmt, 0))
    if jpeg is not None:
        cost += jpeg.coefficient_bytes
    return cost + 4 * px // (k * k)


def read_pil(data: bytes, name: str, max_side: int | None, fmt: str, digest: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an image file Pillow reads (see :func:`pneumoscan.data.io.read_image_with_meta`).

    Args:
        data: the whole file.
        name: the name used in error messages.
        max_side: decode (JPEG draft mode) or reduce to about this side; ``None``: full size.
        fmt: the format :func:`~pneumoscan.data.formats.sniff_format` found; only that
            Pillow plugin parses the bytes.
        digest: also give the pixel digest of the full-resolution image in the metadata
            (:data:`~pneumoscan.core.fingerprint.PIXEL_KEY`; ``None`` when a JPEG was decoded
            at reduced size only).

    Raises:
        ImageReadError: and its subclass ImageTooLargeError.
    """
    jpeg = check_jpeg(data, name) if fmt == "JPEG" else None
    frames = count_frames(data, fmt, MAX_FRAMES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            pil_format = str(img.format)
            if pil_format not in PIL_FORMATS:  # pragma: no cover - formats= allows one plugin
                raise ImageReadError(name, f"unexpected image format {safe_text(pil_format, 16)}")
            original_size = img.size
            if fmt == "JPEG" and max_side and max(img.size) > 2 * max_side:
                img.draft(img.mode if img.mode in ("L", "RGB") else None, (max_side, max_side))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageTooLargeError(name, f"image too large ({original_size[0]}x{original_size[1]} pixels; limit {MAX_PIXELS:,})")
            if w < 1 or h < 1:
                raise ImageReadError(name, "image has no pixels")
            frames = frames if frames is not None else int(getattr(img, "n_frames", 1))
            if frames > MAX_FRAMES:
                raise ImageTooLargeError(name, f"too many frames (more than {MAX_FRAMES}; an X-ray is one image)")
            k = reduction_factor(h, w, max_side)
            cost = _decode_cost(fmt, img.mode, w, h, k, jpeg)
            if cost > MAX_DECODE_BYTES:
                raise ImageTooLargeError(name, f"image too large to decode ({w}x{h} {fmt} {img.mode} needs about "
                                               f"{cost >> 20:,} MB; limit {MAX_DECODE_BYTES >> 20:,} MB)")
            with big_decode(w * h):
                img.seek(0)  # first frame of animated images
                img.load()
                orientation = _orientation(img)
                hasher = PixelHasher(h, w) if digest and k > 1 and orientation == 1 and (w, h) == original_size else None
                arr, bits, colour = _convert(img, k, hasher)
            mode = img.mode
            img.close()
            del img
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(name, "image too large (decompression-bomb limit)") from e
    except Image.UnidentifiedImageError as e:
        # the content has the signature of `fmt`, but its header does not parse
        raise ImageReadError(name, "cannot decode image (corrupt header)") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, struct.error) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if "MAX_TEXT_CHUNK" in msg or "text chunks" in msg:
            raise ImageTooLargeError(name, "image metadata too large (compressed text-chunk bomb)") from e
        if "truncated" in msg.lower():
            msg = "truncated or corrupt image data"
        raise ImageReadError(name, f"cannot decode image ({safe_text(msg, 120)})") from e
    except MemoryError as e:
        raise ImageTooLargeError(name, "image too large to decode in memory") from e
    full = (w, h) == original_size  # not decoded at reduced size (JPEG draft mode)
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
        if orientation >= 5:
            original_size = original_size[::-1]
    meta = {"format": pil_format, "mode": mode, "bits": bits, "original_size": original_size, **colour}
    if digest:  # the full-resolution pixels as displayed: hashed while reducing, or the result itself
        found = hasher.digest() if hasher is not None else pixel_digest(arr) if full and k == 1 else None
        meta[PIXEL_KEY] = None if found is None else found.hex()
    return arr, meta


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1-8; 1, upright, when absent or unreadable)."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if int(value) in _ORIENT else 1
    except Exception:  # noqa: BLE001 - a corrupt EXIF block only loses the orientation
        return 1


def _grey_converter(img: Image.Image) -> tuple[Callable[[Image.Image], np.ndarray], int]:
    """A function turning a band of ``img`` into float32 greyscale in [0, 1], and the bit
    depth. 32-bit integer and float images are scaled by the range of the whole image."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (lambda band: np.asarray(band).astype(np.float32) / np.float32(65535.0)), 16
    if mode in ("I", "F"):
        rows = _band_rows(img.size[0], 1)
        ranges = [finite_range(np.asarray(img.crop((0, y, img.size[0], min(img.size[1], y + rows)))))
                  for y in range(0, img.size[1], rows)]
        found = [r for r in ranges if r is not None]
        bounds = (min(r[0] for r in found), max(r[1] for r in found)) if found else None
        if mode == "I" and bounds is not None and bounds[0] >= 0 and bounds[1] <= 65535:
            return (lambda band: np.asarray(band).astype(np.float32) / np.float32(65535.0)), 16
        return (lambda band: minmax(np.asarray(band), bounds or (0.0, 0.0))), 32
    alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info)

    def to_grey(band: Image.Image) -> np.ndarray:
        if alpha:  # composite on black: transparent regions carry no radiographic signal
            rgba = band.convert("RGBA")
            band = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        if band.mode != "L":
            band = band.convert("L")
        out = np.asarray(band, dtype=np.uint8).astype(np.float32)
        out /= np.float32(255.0)
        return out

    return to_grey, 8


def _convert(img: Image.Image, k: int, hasher: PixelHasher | None = None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Greyscale float32 in [0, 1], reduced by ``k``, with its bit depth and the colour
    statistics, computed band by band (a few MB of temporaries for any image size); each
    full-resolution band goes to ``hasher`` first, when given."""
    w, h = img.size
    to_grey, bits = _grey_converter(img)
    colourful = img.mode in _COLOUR_MODES
    step = max(1, max(w, h) // 256)
    rows = _band_rows(w, math.lcm(k, step) if colourful else k)
    chroma = [0, 0, 0]  # pixels with chroma >= 26, sum of chroma, pixels

    def bands() -> Iterator[tuple[int, np.ndarray]]:
        for y in range(0, h, rows):
            band = img if rows >= h else img.crop((0, y, w, min(h, y + rows)))  # one band: no copy
            if colourful:
                _add_chroma(band, step, chroma)
            grey = to_grey(band)
            if hasher is not None:
                hasher.update(grey)
            yield y, _reduce(grey, k)

    arr = _assemble(bands(), (h, w), k)
    return arr, bits, _colour_stats(chroma)


def _add_chroma(band: Image.Image, step: int, acc: list[int]) -> None:
    """Accumulate the chroma counts of a band reduced by ``step`` (see :func:`_colour_stats`)."""
    small = band if band.mode == "RGB" else band.convert("RGB")  # read only: no copy needed
    if step > 1:
        small = small.reduce(step)
    r, g, b = (np.asarray(c, dtype=np.uint8) for c in small.split())  # contiguous planes
    # chroma in integer steps: hi >= lo, so the uint8 subtraction cannot wrap
    d = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    acc[0] += int(np.count_nonzero(d >= 26))  # chroma d / 255 > 0.1  <=>  d >= 26
    acc[1] += int(d.sum(dtype=np.int64))
    acc[2] += int(d.size)


def _colour_stats(acc: list[int]) -> dict[str, Any]:
    """How colourful the image is (X-rays are greyscale; the not-a-chest-X-ray guard uses
    this), measured on a copy reduced to about 256 px: ``colour`` (more than 1 % of pixels
    have a chroma above 0.1), ``saturation`` (mean chroma ``(max(R,G,B) - min(R,G,B)) / 255``)
    and ``colour_fraction`` (share of pixels with a chroma above 0.1); zero for greyscale."""
    over, total, size = acc
    if not size:
        return {"colour": False, "saturation": 0.0, "colour_fraction": 0.0}
    frac = over / size
    return {"colour": frac > 0.01, "saturation": total / (255.0 * size), "colour_fraction": frac}
