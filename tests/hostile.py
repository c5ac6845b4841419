"""A corpus of hostile and unusual inputs for the image reader, the CLI and the web service.

``make_corpus(dir)`` writes every input into ``dir`` and returns
``{name: (path, expectation)}`` where ``expectation`` is ``"ok"`` (the reader returns an image)
or the :class:`~pneumoscan.errors.ImageReadError` subclass it must raise. Everything is built
from a few bytes at test time (the decompression bombs are crafted by hand so that the files
stay small). ``make_path_corpus(dir)`` adds inputs that only exist as paths (FIFO, device,
directory, missing file): they matter for the CLI, not for uploads.

Run as a script, it reads each file of a corpus folder in a forked child and prints one JSON
line per file with the outcome, the child's peak RSS (``os.wait4``) and the time taken::

    python tests/hostile.py measure DIR [--timeout 60]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from pneumoscan.errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError

Expectation = Union[str, type]
Corpus = dict[str, tuple[Path, Expectation]]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Readable inputs that are not chest X-rays (synthetic ramps, a CT, a 1-pixel image...): the
#: not-a-chest-X-ray guard may refuse them once they are read. The one readable real chest
#: X-ray of the corpus is ``jpeg_named.png`` (a Kermany JPEG under a .png name).
MAY_BE_REFUSED = frozenset({
    "ct.dcm", "one_pixel.png", "animated.gif", "cmyk.jpeg", "max_8000.png", "deflate_8000.dcm", "png16.png",
    "image16.tiff", "float_nan.tiff", "png_named.dcm",
})


# --------------------------------------------------------------------------- PNG by hand
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, row: bytes | None = None, *, bit_depth: int = 8, colour_type: int = 0,
              extra_chunks: tuple[bytes, ...] = (), idat: bytes | None = None, filter_type: int = 0) -> bytes:
    """A PNG whose every scanline is ``row`` (filter byte 0 prepended), compressed as a
    stream so that a large solid image costs little memory.

    Args:
        width, height: declared size (written to IHDR as is).
        row: the bytes of one scanline (without filter byte); ``None`` with ``idat`` given.
        bit_depth, colour_type: IHDR fields (0 = greyscale, 2 = RGB, 6 = RGBA).
        extra_chunks: complete chunks inserted before IDAT.
        idat: raw IDAT payload overriding the generated one.
        filter_type: the filter byte of every scanline (0 = none; 4 = Paeth, the slowest to undo).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if idat is None:
        assert row is not None
        comp = zlib.compressobj(1)
        line = bytes([filter_type]) + row
        parts = []
        block = line * max(1, (1 << 20) // len(line))
        rows_per_block = len(block) // len(line)
        full, rest = divmod(height, rows_per_block)
        for _ in range(full):
            parts.append(comp.compress(block))
        parts.append(comp.compress(line * rest))
        parts.append(comp.flush())
        idat = b"".join(parts)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra_chunks) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _pil_bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _ramp(size: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))


# --------------------------------------------------------------------------- JPEG header patch
def jpeg_with_declared_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF0 marker is patched to declare ``width``×``height``."""
    data = bytearray(_pil_bytes(Image.fromarray(_ramp(16)), "JPEG"))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


# --------------------------------------------------------------------------- DICOM by hand
def deflated_dicom(rows: int, cols: int, *, window: tuple[float, float] | None = (2048.0, 4096.0)) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of ``rows``×``cols`` 16-bit zero pixels
    (plus a small ramp in the first row), compressed as a stream: a few hundred kB on disk
    however large it inflates."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["pneumoscan-deflate", str(rows), str(cols)])
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * cols * 2
    header = body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n)
    first_row = (np.arange(min(cols, 4096), dtype=np.uint16)).tobytes()
    comp = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(header + first_row)]
    left = n - len(first_row)
    zeros = bytes(1 << 22)
    while left > 0:
        k = min(left, len(zeros))
        parts.append(comp.compress(zeros[:k]))
        left -= k
    parts.append(comp.flush())
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + b"".join(parts)


# --------------------------------------------------------------------------- the corpus
def make_corpus(dest: str | os.PathLike[str]) -> Corpus:
    """Write the byte-level hostile corpus into ``dest``.

    Args:
        dest: folder (created if missing).

    Returns:
        ``{file name: (path, expectation)}``; ``expectation`` is ``"ok"`` or the exception
        class the reader must raise (a subclass of ImageReadError, checked with ``issubclass``
        against the exact class raised).
    """
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    jpeg = (FIXTURES / "xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg").read_bytes()
    files: dict[str, tuple[bytes, Expectation]] = {
        "zero_bytes.png": (b"", ImageReadError),
        "text.png": (b"this is a text file, not an X-ray\n" * 20, UnsupportedFormatError),
        "html.jpeg": (b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", UnsupportedFormatError),
        "pdf.jpg": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n", UnsupportedFormatError),
        "eps.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n", UnsupportedFormatError),
        "icon.png": (_pil_bytes(Image.fromarray(_ramp(32)), "ICO"), UnsupportedFormatError),
        # the content decides, not the name: random bytes called .dcm are not a recognised image
        "random.dcm": (np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(), UnsupportedFormatError),
        "truncated.jpeg": (jpeg[: len(jpeg) // 2], ImageReadError),
        "bomb_60000.png": (png_bytes(60_000, 60_000, idat=zlib.compress(b"\x00" * 64)), ImageTooLargeError),
        "huge_20000.png": (png_bytes(20_000, 20_000, b"\x80" * 20_000), ImageTooLargeError),
        "jpeg_declares_20000.jpeg": (jpeg_with_declared_size(20_000, 20_000), ImageTooLargeError),
        "gif_declares_65535.gif": (b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;", ImageTooLargeError),
        "ztxt_bomb.png": (png_bytes(64, 64, bytes(64), extra_chunks=(_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(64 << 20), 9)),)), ImageTooLargeError),
        "deflate_bomb.dcm": (deflated_dicom(12_000, 12_000), ImageTooLargeError),
        "one_pixel.png": (_pil_bytes(Image.new("L", (1, 1), 200), "PNG"), "ok"),
        "png16.png": (_pil_bytes(Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)), "PNG"), "ok"),
        "cmyk.jpeg": (_pil_bytes(Image.fromarray(_ramp()).convert("CMYK"), "JPEG"), "ok"),
        "animated.gif": (_pil_bytes(Image.fromarray(_ramp()), "GIF", save_all=True,
                                    append_images=[Image.fromarray(255 - _ramp()), Image.new("L", (64, 64), 90)], duration=100, loop=0), "ok"),
        "image16.tiff": (_pil_bytes(Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)), "TIFF"), "ok"),
        "float_nan.tiff": (_pil_bytes(Image.fromarray(np.where(_ramp() > 128, np.nan, _ramp()).astype(np.float32)), "TIFF"), "ok"),
        "jpeg_named.png": (jpeg, "ok"),
        "png_named.dcm": (_pil_bytes(Image.fromarray(_ramp()), "PNG"), "ok"),
        "max_8000.png": (png_bytes(8000, 8000, np.linspace(0, 65535, 8000).astype(">u2").tobytes(), bit_depth=16), "ok"),
        "deflate_8000.dcm": (deflated_dicom(8000, 8000), "ok"),
    }
    out: Corpus = {}
    for name, (data, expect) in files.items():
        p = d / name
        p.write_bytes(data)
        out[name] = (p, expect)
    for name, expect in (("no_pixels.dcm", ImageReadError), ("jpegls_bogus.dcm", UnsupportedFormatError),
                         ("jpeg2000_corrupt.dcm", ImageReadError), ("ct.dcm", "ok")):
        p = d / name
        shutil.copyfile(FIXTURES / "dicom" / name, p)
        out[name] = (p, expect)
    return out


def make_path_corpus(dest: str | os.PathLike[str]) -> Corpus:
    """Inputs that only exist as paths: a FIFO, a link to /dev/zero, a directory, a missing
    file and a dangling link (all must fail fast with ImageReadError, never hang).

    Args:
        dest: folder (created if missing).
    """
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    out: Corpus = {}
    fifo = d / "fifo.png"
    if hasattr(os, "mkfifo") and not fifo.exists():
        os.mkfifo(fifo)
    if fifo.exists():
        out["fifo.png"] = (fifo, ImageReadError)
    if Path("/dev/zero").exists():
        z = d / "devzero.png"
        if not z.is_symlink():
            z.symlink_to("/dev/zero")
        out["devzero.png"] = (z, ImageReadError)
    folder = d / "folder.png"
    folder.mkdir(exist_ok=True)
    out["folder.png"] = (folder, ImageReadError)
    out["missing.png"] = (d / "missing.png", ImageReadError)
    dangling = d / "dangling.png"
    if not dangling.is_symlink():
        dangling.symlink_to(d / "nowhere.png")
    out["dangling.png"] = (dangling, ImageReadError)
    return out


# --------------------------------------------------------------------------- measurement
def _read_in_child(path: Path, timeout: int) -> None:  # pragma: no cover - runs in the fork
    from pneumoscan.data.io import read_image

    signal.alarm(timeout)
    try:
        arr = read_image(path, max_side=224)
        ok = arr.ndim == 2 and arr.dtype == np.float32 and bool(np.isfinite(arr).all()) and 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0
        msg = {"outcome": "ok" if ok else "invalid-array", "shape": list(arr.shape)}
    except ImageReadError as e:
        msg = {"outcome": "error", "error": type(e).__name__, "message": str(e)}
    except BaseException as e:  # noqa: BLE001 - anything else is a bug the test reports
        msg = {"outcome": "crash", "error": type(e).__name__, "message": str(e)[:300]}
    sys.stdout.write(json.dumps({"name": path.name, **msg}) + "\n")
    sys.stdout.flush()


def measure(folder: Path, timeout: int = 60) -> list[dict]:
    """Read every file in ``folder`` in its own forked child; return one record per file
    with the outcome, the child's peak RSS in MB and the wall time."""
    import pneumoscan.data.io  # noqa: F401 - imported before forking, shared by the children

    records = []
    for path in sorted(folder.iterdir()):
        r, w = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            os.dup2(w, 1)
            try:
                _read_in_child(path, timeout)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        _, status, usage = os.wait4(pid, 0)
        rec = json.loads(text.strip().splitlines()[-1]) if text.strip() else {"name": path.name}
        if os.WIFSIGNALED(status):
            rec.update(outcome="killed", error=signal.Signals(os.WTERMSIG(status)).name)
        rec["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in kB on Linux
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hostile-input corpus for pneumoscan")
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write the corpus into a folder")
    m.add_argument("dir", type=Path)
    s = sub.add_parser("measure", help="read each file in a forked child; print JSON lines")
    s.add_argument("dir", type=Path)
    s.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args(argv)
    if args.cmd == "make":
        for name, (p, expect) in make_corpus(args.dir).items():
            sys.stdout.write(f"{name}\t{p.stat().st_size}\t{expect if isinstance(expect, str) else expect.__name__}\n")
        return 0
    for rec in measure(args.dir, args.timeout):
        sys.stdout.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
