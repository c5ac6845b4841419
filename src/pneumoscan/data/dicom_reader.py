"""Decoding DICOM with pydicom, following the standard display pipeline: modality LUT (rescale
slope/intercept), VOI LUT or window, then MONOCHROME1 inversion so that bone is always bright.
16-bit data keeps its full precision until the final normalisation to ``[0, 1]``.

Hostile files get one :class:`~pneumoscan.errors.ImageReadError`: a deflated data set that
inflates beyond :data:`~pneumoscan.data.limits.MAX_FILE_BYTES` is refused before pydicom
inflates it; multi-frame files (a series, not one radiograph), images above
:data:`~pneumoscan.data.limits.MAX_PIXELS`, images whose decoding would need more than
:data:`~pneumoscan.data.limits.MAX_DECODE_BYTES` and JPEG-compressed frames with absurd scan
counts are refused before decoding; a missing decoder for a compressed transfer syntax is
reported as such. Text taken from the file (modality, body part, identifiers, photometric
interpretation, decoder messages) goes through :func:`~pneumoscan.utils.text.safe_text`. Use
:func:`pneumoscan.data.io.read_image`, not this module.
"""
from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from typing import Any

import numpy as np

from ..core.fingerprint import PIXEL_KEY, pixel_digest
from ..errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from ..utils.text import safe_text
from .formats import check_jpeg
from .limits import MAX_DECODE_BYTES, MAX_FILE_BYTES, MAX_PIXELS, big_decode
from .pil_reader import minmax, reduce_image

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


#: Identifiers a hospital files results by; carried into predictions (never patient names).
DICOM_IDENTIFIERS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber", "ViewPosition")


def _dicom_identifiers(ds: Any) -> dict[str, str]:
    """The :data:`DICOM_IDENTIFIERS` present in ``ds`` as printable text of at most 64
    characters (hostile files can hold anything; an unreadable value is left out)."""
    out: dict[str, str] = {}
    for kw in DICOM_IDENTIFIERS:
        try:
            v = ds.get(kw)
        except Exception:  # noqa: BLE001
            continue
        text = safe_text(str(v if v is not None else "").strip(), 64)
        if text:
            out[kw] = text
    return out


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
        "photometric": safe_text(str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper(), 32),
        "modality": safe_text(ds.get("Modality", "") or "", 64),
        "body_part": safe_text(ds.get("BodyPartExamined", "") or "", 64),
        "identifiers": _dicom_identifiers(ds),
    }
    if h["rows"] < 1 or h["cols"] < 1:
        raise ValueError(f"image size {h['cols']}x{h['rows']}")
    if h["frames"] < 1 or h["samples"] not in (1, 3, 4) or not 1 <= h["bits_allocated"] <= 64:
        raise ValueError("frames/samples/bits")
    return h


def _decode_cost(h: dict[str, Any], stored_bytes: int) -> int:
    """Estimated peak working memory (bytes) of decoding one frame: the stored pixel data,
    the decoded array (RGB after a palette), and the float32 image the display pipeline
    computes in place.

    Args:
        h: the validated header (:func:`_dicom_header`).
        stored_bytes: the size of the pixel data element as read.
    """
    px = h["rows"] * h["cols"]
    decoded = px * h["samples"] * -(-h["bits_allocated"] // 8)
    if h["photometric"] == "PALETTE COLOR":
        decoded += px * 3 * 2
    return stored_bytes + decoded + 4 * px


def _check_compressed_frame(ds: Any, name: str) -> None:
    """Apply the JPEG scan checks to a JPEG-compressed first frame (pydicom hands it to
    Pillow or libjpeg, where a crafted progressive stream costs minutes)."""
    try:
        from pydicom.encaps import get_frame

        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception:  # noqa: BLE001 - not encapsulated, or malformed: the decoder reports it
        return
    if bytes(frame[:3]) == b"\xff\xd8\xff":
        check_jpeg(bytes(frame), name)


def read_dicom(data: bytes, name: str, max_side: int | None = None, digest: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the image of a single-frame DICOM file (see :func:`pneumoscan.data.io.read_image_with_meta`).

    Args:
        data: the whole file (with or without the Part-10 preamble).
        name: the name used in error messages.
        max_side: reduce to about this side after decoding; ``None``: full size.
        digest: also give the pixel digest of the full-resolution image in the metadata
            (:data:`~pneumoscan.core.fingerprint.PIXEL_KEY`).

    Raises:
        ImageReadError: and its subclasses UnsupportedFormatError, ImageTooLargeError.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
    except ImportError as e:  # pragma: no cover - pydicom>=3 is a core dependency
        raise UnsupportedFormatError(name, "DICOM support needs pydicom>=3 (pip install -U pydicom)") from e
    dataset_bytes = _check_deflated_size(data, name)
    # a data set of N bytes holds up to N/2 16-bit pixels; compressed pixel data is checked
    # again below, once the header gives the image size
    with contextlib.ExitStack() as slot, big_decode(dataset_bytes // 2), warnings.catch_warnings():
        # pydicom warns about every deviation of hostile or sloppy files; the reader either
        # succeeds or raises one ImageReadError, so the warnings are only logged.
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except MemoryError as e:
            raise ImageTooLargeError(name, "DICOM file too large to parse in memory") from e
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on hostile input
            raise ImageReadError(name, f"invalid DICOM file ({e.__class__.__name__})") from e
        if hasattr(ds, "buffer"):
            ds.buffer = None  # pydicom keeps the source stream: for a deflated file, the whole inflated data set
        try:
            has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM file ({e.__class__.__name__})") from e
        if not has_pixels:
            raise ImageReadError(name, "DICOM file has no pixel data")
        try:
            h = _dicom_header(ds)
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM image attributes ({safe_text(str(e) or e.__class__.__name__, 100)})") from e
        if h["frames"] > 1:
            # a series (CT/MR slices, cine, tomosynthesis), not one radiograph: no frame of it
            # is the chest X-ray the model was trained on
            raise UnsupportedFormatError(name, f"multi-frame DICOM ({h['frames']} frames) is not a single radiograph")
        if h["rows"] * h["cols"] > MAX_PIXELS:
            raise ImageTooLargeError(name, f"image too large ({h['cols']}x{h['rows']} pixels; limit {MAX_PIXELS:,})")
        try:
            stored = len(ds.PixelData) if "PixelData" in ds else dataset_bytes
        except Exception:  # noqa: BLE001 - reported when decoding
            stored = dataset_bytes
        cost = _decode_cost(h, stored)
        if cost > MAX_DECODE_BYTES:
            raise ImageTooLargeError(name, f"image too large to decode ({h['cols']}x{h['rows']}x{h['samples']} at "
                                           f"{h['bits_allocated']} bits needs about {cost >> 20:,} MB; limit {MAX_DECODE_BYTES >> 20:,} MB)")
        slot.enter_context(big_decode(h["rows"] * h["cols"]))
        try:
            ts = _transfer_syntax(ds)
            compressed = ts is not None and bool(ts.is_compressed)
        except Exception:  # noqa: BLE001 - hostile encodings, a UID that is no transfer syntax; pydicom reports it when decoding
            ts, compressed = None, False
        if compressed:
            _check_compressed_frame(ds, name)
        try:
            ds.pixel_array_options(index=0, as_rgb=True)
            arr = ds.pixel_array
        except MemoryError as e:
            raise ImageTooLargeError(name, "DICOM pixel data too large to decode in memory") from e
        except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
            raise _dicom_decode_error(name, ts, e, get_decoder) from e
        photometric = h["photometric"]
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:  # the decoded array is all that is needed now: free the stored bytes
                del ds[keyword]
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
                del rgb, arr
                out = minmax(grey, inplace=True)
            elif photometric in _COLOUR:
                raise ValueError(f"{photometric} data of shape {arr.shape}")
            else:
                with np.errstate(all="ignore"):  # hostile windows may overflow; the result is sanitised
                    a = _modality_and_voi(arr, ds, apply_modality_lut, apply_voi_lut)
                del arr
                out = minmax(a, inplace=True)
                del a
                if photometric == "MONOCHROME1":  # inverted so that bone is bright, as in MONOCHROME2
                    np.subtract(np.float32(1.0), out, out=out)
        except ImageReadError:
            raise
        except MemoryError as e:
            raise ImageTooLargeError(name, "DICOM image too large to process in memory") from e
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, f"invalid DICOM LUT/window or pixel layout ({e.__class__.__name__}: {safe_text(e, 80)})") from e
        del ds
        full_digest = pixel_digest(out).hex() if digest and out.ndim == 2 and out.size else None
        out = reduce_image(out, max_side)
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
        "identifiers": h["identifiers"],
    }
    if digest:
        meta[PIXEL_KEY] = full_digest
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
        ts_name = safe_text(getattr(ts, "name", None) or ts or "unknown", 64)
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
    first = safe_text((str(e).strip().splitlines() or [e.__class__.__name__])[-1].strip(), 100)
    return ImageReadError(name, f"cannot decode DICOM pixel data ({ts_name}: {first})")
