"""One image reader for chest X-rays: JPEG/PNG/BMP/TIFF/GIF via Pillow and DICOM via pydicom.

Every path returns a 2-D ``float32`` greyscale array in ``[0, 1]``. 16-bit data (PNG ``I;16``,
DICOM) keeps its full precision until this final normalisation. DICOM handling follows the
standard display pipeline: modality LUT (rescale slope/intercept), VOI LUT or window, then
MONOCHROME1 inversion so that bone is always bright.

Hostile input gets one :class:`~pneumoscan.errors.ImageReadError` naming the file, never a hang
or unbounded memory: only regular files up to :data:`MAX_FILE_BYTES` are read (no FIFOs or
devices), only the Pillow plugins of :data:`PIL_FORMATS` parse bytes, images above
:data:`MAX_PIXELS` (declared, or inflated from a deflated DICOM) are refused before decoding,
and images above :data:`BIG_PIXELS` are decoded one at a time per process.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import struct
import threading
import warnings
import zlib
from typing import IO, Any, Iterator, Union

import numpy as np
from PIL import Image, ImageFile

from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, IO[bytes]]

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
# Pillow plugins allowed to parse input (MPO files are recognised by the JPEG plugin).
_OPEN_FORMATS = sorted(PIL_FORMATS - {"MPO"})
#: Signatures of the formats pneumoscan reads: such bytes that fail to parse are corrupt images.
_DECODABLE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
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


def _too_big(name: str, size: int) -> ImageTooLargeError:
    return ImageTooLargeError(name, f"file too large ({size:,} bytes; limit {MAX_FILE_BYTES:,})")


def _open_bytes(source: ImageSource, name: str) -> bytes:
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


def read_image(source: ImageSource, *, max_side: int | None = None, name: str | None = None) -> np.ndarray:
    """Read an X-ray as a 2-D float32 array in ``[0, 1]``.

    Args:
        source: a path, raw bytes or a binary file object.
        max_side: if given, large images come back reduced, each side never below
            ``max_side``: JPEGs are decoded at reduced size (Pillow draft mode, much faster
            for multi-megapixel files), other formats are box-filtered after decoding by the
            integer factor that keeps the short side >= ``max_side``.
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
    if is_dicom(data):
        return _read_dicom(data, nm, max_side)
    if nm.lower().endswith((".dcm", ".dicom")):
        # A .dcm name without the Part-10 magic: an ordinary image misnamed, or a DICOM data
        # set written without preamble (which Pillow does not recognise).
        try:
            return _read_pil(data, nm, max_side)
        except UnsupportedFormatError:
            return _read_dicom(data, nm, max_side)
    return _read_pil(data, nm, max_side)


_BIG_DECODES = threading.BoundedSemaphore(1)
_holding = threading.local()


@contextlib.contextmanager
def _big_decode(pixels: int) -> Iterator[None]:
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


_malloc_trim: Any = None


def _reduce(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink a decoded image by an integer box filter (Pillow ``reduce``) when both sides are
    at least twice ``max_side``, keeping every side >= ``max_side`` — what JPEG draft mode does
    while decoding, for every format. Callers that ask for a small image (prediction, the
    service) then hold a small array, not a 64-megapixel one.

    Args:
        arr: 2-D float32 image in [0, 1].
        max_side: the smallest side the caller needs; ``None`` keeps the full resolution.
    """
    if not max_side or arr.ndim != 2:
        return arr
    k = min(arr.shape) // max_side
    if k < 2:
        return arr
    out = np.array(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).reduce(k), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------- Pillow
def _read_pil(data: bytes, name: str, max_side: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the formats pneumoscan reads: no other Pillow plugin ever parses the bytes.
            img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
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
            with _big_decode(w * h):
                img.seek(0)  # first frame of animated images
                img.load()
                arr, bits = _pil_to_grey(img)
                colour = colour_stats(img)
                arr = _reduce(arr, max_side)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(name, "image too large (decompression-bomb limit)") from e
    except Image.UnidentifiedImageError as e:
        if data.startswith(_DECODABLE_MAGIC):
            # a JPEG/PNG signature with a header Pillow cannot parse: a corrupt image, not another format
            raise ImageReadError(name, "cannot decode image (corrupt header)") from e
        raise UnsupportedFormatError(name, "not a recognised image (JPEG, PNG or DICOM expected)") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, struct.error) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if "MAX_TEXT_CHUNK" in msg or "text chunks" in msg:
            raise ImageTooLargeError(name, "image metadata too large (compressed text-chunk bomb)") from e
        if "truncated" in msg.lower():
            msg = "truncated or corrupt image data"
        raise ImageReadError(name, f"cannot decode image ({msg[:120]})") from e
    except MemoryError as e:
        raise ImageTooLargeError(name, "image too large to decode in memory") from e
    meta = {"format": fmt, "mode": img.mode, "bits": bits, "original_size": original_size, **colour}
    return arr, meta


def _pil_to_grey(img: Image.Image) -> tuple[np.ndarray, int]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(img).astype(np.float32)
        a /= np.float32(65535.0)
        return a, 16
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            out = a.astype(np.float32)
            out /= np.float32(65535.0)
            return out, 16
        return _minmax(a), 32
    if mode == "F":
        return _minmax(np.asarray(img)), 32
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # composite on black: transparent regions carry no radiographic signal
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "L":
        img = img.convert("L")
    out = np.asarray(img, dtype=np.uint8).astype(np.float32)
    out /= np.float32(255.0)
    return out, 8


def _minmax(a: np.ndarray) -> np.ndarray:
    """Scale to ``[0, 1]`` by the finite minimum and maximum (NaN/inf become the minimum),
    as float32 without float64 temporaries the size of the image.

    Args:
        a: a numeric array of any shape (a constant array gives zeros).
    """
    a = np.asarray(a)
    if a.size == 0:
        return np.zeros(a.shape, dtype=np.float32)
    if a.dtype.kind not in "biuf":
        a = a.astype(np.float64)
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            if not finite.any():
                return np.zeros(a.shape, dtype=np.float32)
            a = np.where(finite, a, a[finite].min())
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.float32)
    span = hi - lo
    if span < 1e37:  # a - lo fits float32: subtract straight into the float32 output
        out = np.empty(a.shape, dtype=np.float32)
        np.subtract(a, lo, out=out, casting="unsafe")
        out /= np.float32(span)
    else:  # extreme float data: bring it into [-1, 1] first so that nothing overflows
        m = max(abs(lo), abs(hi))
        b = np.asarray(a, dtype=np.float64) / m
        out = ((b - lo / m) / (hi / m - lo / m)).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out


# ----------------------------------------------------------------------------- DICOM
_DEFLATED_TS = b"1.2.840.10008.1.2.1.99"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")


def _check_deflated_size(data: bytes, name: str) -> int:
    """Refuse a Deflated Explicit VR Little Endian file whose data set inflates beyond
    :data:`MAX_FILE_BYTES` (pydicom inflates it whole, in memory, while reading).

    The inflated size is measured by streaming through zlib without keeping the output.

    Args:
        data: the whole file.
        name: the name used in error messages.

    Returns:
        The size of the data set pydicom will parse: inflated for a deflated file, else the
        file's size.
    """
    if len(data) < 144 or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return len(data)
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    if _DEFLATED_TS not in data[132:meta_end]:
        return len(data)
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    buf, total = data[meta_end:], 0
    try:
        while buf and not d.eof:
            total += len(d.decompress(buf, 1 << 22))
            if total > MAX_FILE_BYTES:
                raise ImageTooLargeError(name, f"deflated DICOM data set inflates beyond {MAX_FILE_BYTES:,} bytes")
            buf = d.unconsumed_tail
    except zlib.error as e:
        raise ImageReadError(name, f"invalid DICOM file (corrupt deflate stream: {e})") from e
    return meta_end + total


def _dicom_header(ds: Any) -> dict[str, Any]:
    """The image attributes the reader relies on, validated (hostile files can hold anything).

    Args:
        ds: a pydicom data set.

    Raises:
        ValueError, TypeError: missing or impossible values (the caller reports them).
    """

    def as_int(keyword: str, default: int) -> int:
        v = ds.get(keyword, default)
        v = default if v is None or v == "" else v
        return int(v)

    h = {
        "rows": as_int("Rows", 0),
        "cols": as_int("Columns", 0),
        "frames": as_int("NumberOfFrames", 1),
        "samples": as_int("SamplesPerPixel", 1),
        "bits_allocated": as_int("BitsAllocated", 8),
        "bits_stored": as_int("BitsStored", as_int("BitsAllocated", 8)),
        "photometric": str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper(),
        "modality": str(ds.get("Modality", "") or ""),
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
    }
    if h["rows"] < 1 or h["cols"] < 1:
        raise ValueError(f"image size {h['cols']}x{h['rows']}")
    if h["frames"] < 1 or h["samples"] not in (1, 3, 4) or not 1 <= h["bits_allocated"] <= 64:
        raise ValueError("frames/samples/bits")
    return h


def _read_dicom(data: bytes, name: str, max_side: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
    except ImportError as e:  # pragma: no cover - pydicom>=3 is a core dependency
        raise UnsupportedFormatError(name, "DICOM support needs pydicom>=3 (pip install -U pydicom)") from e
    dataset_bytes = _check_deflated_size(data, name)
    # a data set of N bytes holds up to N/2 16-bit pixels; compressed pixel data is checked
    # again below, once the header gives the image size
    with contextlib.ExitStack() as slot, _big_decode(dataset_bytes // 2), warnings.catch_warnings():
        # pydicom warns about every deviation of hostile or sloppy files; the reader either
        # succeeds or raises one ImageReadError, so the warnings are only logged.
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except MemoryError as e:
            raise ImageTooLargeError(name, "DICOM file too large to parse in memory") from e
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on hostile input
            raise ImageReadError(name, f"invalid DICOM file ({e.__class__.__name__})") from e
        try:
            has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM file ({e.__class__.__name__})") from e
        if not has_pixels:
            raise ImageReadError(name, "DICOM file has no pixel data")
        try:
            h = _dicom_header(ds)
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM image attributes ({str(e) or e.__class__.__name__})") from e
        if h["rows"] * h["cols"] > MAX_PIXELS:
            raise ImageTooLargeError(name, f"image too large ({h['cols']}x{h['rows']} pixels; limit {MAX_PIXELS:,})")
        slot.enter_context(_big_decode(h["rows"] * h["cols"]))
        try:
            ts = _transfer_syntax(ds)
        except Exception:  # noqa: BLE001 - hostile encodings; pydicom reports it when decoding
            ts = None
        try:
            # Only the first frame is decoded (multi-frame files: the first image).
            ds.pixel_array_options(index=0, as_rgb=True)
            arr = ds.pixel_array
        except MemoryError as e:
            raise ImageTooLargeError(name, "DICOM pixel data too large to decode in memory") from e
        except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
            raise _dicom_decode_error(name, ts, e, get_decoder) from e
        photometric = h["photometric"]
        try:
            arr = np.asarray(arr)
            if photometric == "PALETTE COLOR" and arr.ndim == 2:
                arr = apply_color_lut(arr, ds)
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                # pydicom already converted YBR to RGB (as_rgb=True)
                rgb = arr[..., :3]
                grey = np.empty(rgb.shape[:2], dtype=np.float32)
                np.multiply(rgb[..., 0], 0.299, out=grey, casting="unsafe")
                grey += np.float32(0.587) * rgb[..., 1]
                grey += np.float32(0.114) * rgb[..., 2]
                out = _minmax(grey)
            elif photometric in _COLOUR:
                raise ValueError(f"{photometric} data of shape {arr.shape}")
            else:
                with np.errstate(all="ignore"):  # hostile windows may overflow; the result is sanitised
                    a = _modality_and_voi(arr, ds, apply_modality_lut, apply_voi_lut)
                if photometric == "MONOCHROME1":
                    out = 1.0 - _minmax(a)  # inverted so that bone is bright, as in MONOCHROME2
                else:
                    out = _minmax(a)
        except ImageReadError:
            raise
        except MemoryError as e:
            raise ImageTooLargeError(name, "DICOM image too large to process in memory") from e
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM LUT/window or pixel layout ({e.__class__.__name__}: {str(e)[:80]})") from e
        del ds, arr
        out = _reduce(out, max_side)
    if out.ndim != 2 or out.size == 0:
        raise ImageReadError(name, f"unexpected DICOM pixel array shape {tuple(out.shape)}")
    out = out.astype(np.float32, copy=False)
    meta = {
        "format": "DICOM",
        "mode": photometric,
        "bits": h["bits_stored"],
        "original_size": (out.shape[1], out.shape[0]),
        "modality": h["modality"],
        "body_part": h["body_part"],
    }
    return out, meta


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DICOM number."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _modality_and_voi(arr: np.ndarray, ds: Any, apply_modality_lut: Any, apply_voi_lut: Any) -> np.ndarray:
    """The DICOM grey-scale pipeline before presentation: modality LUT (rescale slope and
    intercept, or a Modality LUT Sequence), then the first VOI LUT (a VOI LUT Sequence takes
    precedence over a window). Tables go through pydicom; rescale and the window functions
    (LINEAR, LINEAR_EXACT, SIGMOID, PS3.3 C.11.2.1.2) are computed here in float32, in place —
    pydicom's float64 versions need 16 bytes per pixel for a large image. The window's output
    is normalised to [0, 1] (the reader min-max scales the result anyway).

    Args:
        arr: stored pixel values (one frame).
        ds: the data set.
        apply_modality_lut, apply_voi_lut: pydicom's functions, for the table cases.
    """
    if ds.get("ModalityLUTSequence"):
        x = np.asarray(apply_modality_lut(arr, ds))
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        x = arr.astype(np.float32)
        slope, intercept = _first(ds.RescaleSlope), _first(ds.RescaleIntercept)
        if slope != 1.0:
            x *= np.float32(slope)
        if intercept != 0.0:
            x += np.float32(intercept)
    else:
        x = arr
    if ds.get("VOILUTSequence"):
        return np.asarray(apply_voi_lut(x, ds, index=0))
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return x
    centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    out = x.astype(np.float32) if x is arr or x.dtype != np.float32 else x
    if func == "LINEAR":
        if width < 1:
            raise ValueError("Window Width must be >= 1 for LINEAR windowing")
        if width == 1:  # a step at centre - 0.5
            return (out > centre - 0.5).astype(np.float32)
        out -= np.float32(centre - 0.5)
        out /= np.float32(width - 1)
        out += np.float32(0.5)
    elif func == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("Window Width must be > 0 for LINEAR_EXACT windowing")
        out -= np.float32(centre)
        out /= np.float32(width)
        out += np.float32(0.5)
    elif func == "SIGMOID":
        if width <= 0:
            raise ValueError("Window Width must be > 0 for SIGMOID windowing")
        out -= np.float32(centre)
        out *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):
            np.exp(out, out=out)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
        return out
    else:
        raise ValueError(f"unsupported VOI LUT Function '{func}'")
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _transfer_syntax(ds: Any) -> Any:
    """The data set's transfer syntax; for a data set written without file meta information
    (no preamble), the uncompressed one pydicom detected while reading it.

    Args:
        ds: a pydicom data set (its file meta gains the transfer syntax when it had none).
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        return ts
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    return ts


def _dicom_decode_error(name: str, ts: Any, e: Exception, get_decoder: Any) -> ImageReadError:
    """The error for pixel data pydicom could not decode: UnsupportedFormatError when no
    decoder for the transfer syntax is installed, ImageReadError for corrupt data.

    Args:
        name: the name used in error messages.
        ts: the transfer syntax UID (or ``None``).
        e: pydicom's exception.
        get_decoder: ``pydicom.pixels.get_decoder``.
    """
    try:
        ts_name = str(getattr(ts, "name", None) or ts or "unknown")[:64]
    except Exception:  # noqa: BLE001 - a hostile UID value
        ts_name = "unknown"
    try:
        compressed = bool(ts) and bool(ts.is_compressed)
        available = compressed and get_decoder(ts).is_available
    except Exception:  # noqa: BLE001 - unknown or non-image transfer syntax
        compressed = available = False
    if compressed and not available:
        return UnsupportedFormatError(
            name, f"no decoder available for DICOM transfer syntax '{ts_name}' (install pylibjpeg with its plugins, or gdcm)"
        )
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[-1].strip()[:100]
    return ImageReadError(name, f"cannot decode DICOM pixel data ({ts_name}: {first})")


def colour_stats(img: Image.Image) -> dict[str, Any]:
    """How colourful a decoded Pillow image is (X-rays are greyscale; the not-a-chest-X-ray
    guard uses this). Measured on a copy reduced to about 256 px.

    Args:
        img: a loaded Pillow image, any mode.

    Returns:
        ``colour`` (more than 1 % of pixels have a chroma above 0.1), ``saturation`` (mean
        chroma ``(max(R,G,B) - min(R,G,B)) / 255``) and ``colour_fraction`` (share of pixels
        with a chroma above 0.1); zero for greyscale modes.
    """
    if img.mode not in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return {"colour": False, "saturation": 0.0, "colour_fraction": 0.0}
    step = max(1, max(img.size) // 256)
    small = img.convert("RGB")
    if step > 1:
        small = small.reduce(step)
    r, g, b = (np.asarray(band, dtype=np.uint8) for band in small.split())  # contiguous planes
    # chroma in integer steps: hi >= lo, so the uint8 subtraction cannot wrap
    d = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    if not d.size:
        return {"colour": False, "saturation": 0.0, "colour_fraction": 0.0}
    frac = np.count_nonzero(d >= 26) / d.size  # chroma d / 255 > 0.1  <=>  d >= 26
    return {"colour": frac > 0.01, "saturation": float(d.sum(dtype=np.int64)) / (255.0 * d.size), "colour_fraction": frac}


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` greyscale to uint8 (for caches and overlays)."""
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
