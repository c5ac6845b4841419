"""One image reader for chest X-rays: JPEG/PNG/BMP/TIFF/GIF via Pillow and DICOM via pydicom.

Every path returns a 2-D ``float32`` greyscale array in ``[0, 1]``. 16-bit data (PNG ``I;16``,
DICOM) keeps its full precision until this final normalisation. DICOM handling follows the
standard display pipeline: modality LUT (rescale slope/intercept), VOI LUT or window, then
MONOCHROME1 inversion so that bone is always bright.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
from PIL import Image, ImageFile

from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, IO[bytes]]

#: Largest image (pixels after any draft-mode reduction) pneumoscan decodes.
MAX_PIXELS = 64_000_000
#: Formats Pillow may decode for us.
PIL_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO"}
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp"}

# Pillow's own bomb check raises at 2x this; keep it consistent with ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _name_of(source: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<bytes>"


def _open_bytes(source: ImageSource, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise ImageReadError(name, "file not found")
        if p.is_dir():
            raise ImageReadError(name, "is a directory, not an image")
        try:
            return p.read_bytes()
        except OSError as e:
            raise ImageReadError(name, f"cannot read file ({e.strerror or e})") from e
    try:
        return source.read()
    except Exception as e:  # noqa: BLE001 - any stream failure is a read error
        raise ImageReadError(name, f"cannot read stream ({e})") from e


def is_dicom(data: bytes) -> bool:
    """True if the bytes carry the DICOM Part-10 preamble magic."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_image(source: ImageSource, *, max_side: int | None = None, name: str | None = None) -> np.ndarray:
    """Read an X-ray as a 2-D float32 array in ``[0, 1]``.

    Args:
        source: a path, raw bytes or a binary file object.
        max_side: if given, large JPEGs are decoded at reduced size (Pillow draft mode,
            never below ``max_side``), which is much faster for multi-megapixel files.
        name: the name used in error messages (defaults to the path).

    Raises:
        ImageReadError: unreadable, truncated, empty or non-image input (the subclasses
            UnsupportedFormatError and ImageTooLargeError say which).
    """
    return read_image_with_meta(source, max_side=max_side, name=name)[0]


def read_image_with_meta(
    source: ImageSource, *, max_side: int | None = None, name: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Like :func:`read_image`, also returning metadata.

    The metadata dict has ``format``, ``mode`` (Pillow mode or DICOM photometric
    interpretation), ``bits``, ``original_size`` ``(width, height)`` and, for DICOM,
    ``modality`` and ``body_part``.
    """
    nm = _name_of(source, name)
    data = _open_bytes(source, nm)
    if len(data) == 0:
        raise ImageReadError(nm, "empty file (0 bytes)")
    if is_dicom(data) or nm.lower().endswith((".dcm", ".dicom")):
        return _read_dicom(data, nm)
    return _read_pil(data, nm, max_side)


# ----------------------------------------------------------------------------- Pillow
def _read_pil(data: bytes, name: str, max_side: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in PIL_FORMATS:
                raise UnsupportedFormatError(name, f"unsupported image format {fmt}")
            original_size = img.size
            if fmt == "JPEG" and max_side and max(img.size) > 2 * max_side:
                img.draft(img.mode if img.mode in ("L", "RGB") else None, (max_side, max_side))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageTooLargeError(name, f"image too large ({original_size[0]}x{original_size[1]} pixels; limit {MAX_PIXELS:,})")
            if w < 1 or h < 1:
                raise ImageReadError(name, "image has no pixels")
            img.seek(0)  # first frame of animated images
            img.load()
            arr, bits = _pil_to_grey(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(name, "image too large (decompression-bomb limit)") from e
    except Image.UnidentifiedImageError as e:
        raise UnsupportedFormatError(name, "not a recognised image (JPEG, PNG or DICOM expected)") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, struct.error) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if "truncated" in msg.lower():
            msg = "truncated or corrupt image data"
        raise ImageReadError(name, f"cannot decode image ({msg})") from e
    except MemoryError as e:
        raise ImageTooLargeError(name, "image too large to decode in memory") from e
    meta = {"format": fmt, "mode": img.mode, "bits": bits, "original_size": original_size}
    return arr, meta


def _pil_to_grey(img: Image.Image) -> tuple[np.ndarray, int]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(img, dtype=np.uint16).astype(np.float32)
        return a / 65535.0, 16
    if mode == "I":
        a = np.asarray(img, dtype=np.int64).astype(np.float64)
        hi = 65535.0 if a.max(initial=0) <= 65535 and a.min(initial=0) >= 0 else None
        return _minmax(a) if hi is None else (a / hi).astype(np.float32), 32 if hi is None else 16
    if mode == "F":
        return _minmax(np.asarray(img, dtype=np.float64)), 32
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # composite on black: transparent regions carry no radiographic signal
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0, 8


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------- DICOM
def _read_dicom(data: bytes, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:  # pragma: no cover - pydicom is a core dependency
        raise UnsupportedFormatError(name, "DICOM support needs pydicom (pip install pydicom)") from e
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, struct.error) as e:
        raise ImageReadError(name, f"invalid DICOM file ({e.__class__.__name__})") from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on hostile input
        raise ImageReadError(name, f"invalid DICOM file ({e.__class__.__name__})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(name, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > MAX_PIXELS:
        raise ImageTooLargeError(name, f"image too large ({cols}x{rows} pixels; limit {MAX_PIXELS:,})")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown"
        raise ImageReadError(name, f"no decoder available for DICOM transfer syntax '{ts_name}'") from e
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, f"cannot decode DICOM pixel data ({e.__class__.__name__})") from e
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes > 1:
        arr = arr[0]
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR") or arr.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        out = _minmax(np.asarray(arr, dtype=np.float64))
    else:
        try:
            a = apply_modality_lut(arr, ds)
            a = apply_voi_lut(a, ds, index=0)
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM LUT/window ({e.__class__.__name__})") from e
        a = np.asarray(a, dtype=np.float64)
        if photometric == "MONOCHROME1":
            a = a.max(initial=0.0) - a
        out = _minmax(a)
    if out.ndim != 2 or out.size == 0:
        raise ImageReadError(name, f"unexpected DICOM pixel array shape {tuple(out.shape)}")
    meta = {
        "format": "DICOM",
        "mode": photometric,
        "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8),
        "original_size": (out.shape[1], out.shape[0]),
        "modality": str(ds.get("Modality", "")),
        "body_part": str(ds.get("BodyPartExamined", "")),
    }
    return out, meta


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` greyscale to uint8 (for caches and overlays)."""
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
