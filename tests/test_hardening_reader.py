"""Hardening round 2 (issue 14), the reader: decode cost checked from the headers before
decoding (JPEG scans, frames, declared size and memory), decoding in a worker that can be
stopped, bounded peak memory, the content (not the name) choosing the decoder, EXIF
orientation, multi-frame DICOM, and sanitised text. Every input is generated here, small."""
from __future__ import annotations

import concurrent.futures
import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps

from pneumoscan.data.decode_pool import DecodePool, _parse_answer, shutdown_decode_pool
from pneumoscan.data.decode_worker import ProtocolError
from pneumoscan.data.formats import jpeg_info, sniff_format
from pneumoscan.data.io import read_image, read_image_with_meta
from pneumoscan.data.isolated import decode_isolated
from pneumoscan.errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from pneumoscan.utils.text import safe_text

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from hostile import png_bytes  # noqa: E402

#: Peak resident memory allowed for a child reading any one input (issue 14).
RSS_LIMIT_MB = 1024


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _ramp(h: int = 48, w: int = 64) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.uint8)


# --------------------------------------------------------------------------- crafted inputs
def _sos_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every scan (SOS header plus its entropy-coded data) of a JPEG."""
    out, pos = [], 2
    while data[pos + 1] != 0xD9:
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if data[pos + 1] == 0xDA:
            end = next(i for i in range(end, len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0, *range(0xD0, 0xD8)))
            out.append((pos, end))
        pos = end
    return out


def progressive_jpeg_with_scans(scans: int, declared: tuple[int, int] | None = None) -> bytes:
    """A small progressive JPEG whose last scan is repeated until it has ``scans`` scans
    (how a 3.6 MB file reaches 10,000 scans); ``declared`` patches the frame header's size."""
    data = _save(Image.fromarray(_ramp(64, 64)), "JPEG", progressive=True, quality=80)
    segs = _sos_segments(data)
    start, end = segs[-1]
    out = bytearray(data[:end] + data[start:end] * (scans - len(segs)) + b"\xff\xd9")
    if declared:
        sof = out.index(b"\xff\xc2")
        struct.pack_into(">HH", out, sof + 5, declared[1], declared[0])
    return bytes(out)


def webp_with_declared_size(w: int, h: int) -> bytes:
    """A 38-byte lossless WebP of one grey level declaring ``w`` x ``h`` (a solid image costs
    no bits per pixel in VP8L, so this is exactly what an encoder writes)."""
    d = bytearray(_save(Image.new("L", (16, 16), 90), "WEBP", lossless=True))
    assert d[12:16] == b"VP8L" and d[20] == 0x2F
    bits = struct.unpack_from("<I", d, 21)[0] & ~((1 << 28) - 1)
    struct.pack_into("<I", d, 21, bits | (w - 1) | ((h - 1) << 14))
    return bytes(d)


def _dicom(pixels: np.ndarray, **attrs: object) -> bytes:
    """A Part-10 DICOM file of 8-bit MONOCHROME2 frames (2-D: one frame; 3-D: frames)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- safe_text
def test_safe_text_escapes_and_bounds() -> None:
    assert safe_text("CHEST") == "CHEST"
    assert safe_text("a\x1b[31mred\nb\x07") == "a\\x1b[31mred\\x0ab\\x07"
    assert safe_text("x\u202ey\u200b") == "x\\u202ey\\u200b"  # bidi override, zero-width space
    assert safe_text("bad\udcffname") == "bad\\xffname"  # an undecodable file-name byte
    assert safe_text(b"ab\xffc") == "ab\\xffc" and safe_text(None) == "" and safe_text(7) == "7"
    long = safe_text("\x1b" * 1000, 20)
    assert len(long) <= 20 and long.endswith("...") and long.count("\\x1b") == 4  # never cuts an escape
    assert len(safe_text("y" * 10_000)) == 64 and safe_text("z" * 64) == "z" * 64


# --------------------------------------------------------------------------- content decides
def test_sniff_format_by_content() -> None:
    img = Image.fromarray(_ramp())
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("BMP", {})):
        assert sniff_format(_save(img, fmt, **kw)) == fmt
    assert sniff_format(_dicom(_ramp())) == "DICOM"
    assert sniff_format(_save(img, "ICO")) is None and sniff_format(b"%PDF-1.4") is None


def test_the_name_never_picks_the_decoder(tmp_path: Path) -> None:
    png = _save(Image.fromarray(_ramp()), "PNG")
    dcm = _dicom(_ramp())
    ds = pydicom.dcmread(io.BytesIO(dcm))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    bare = buf.getvalue()
    bare = bare[bare.index(b"\x08\x00"):]  # a data set without preamble, 'DICM' or file meta
    expected = _ramp().astype(np.float32) / 255.0
    for name, data, fmt in (("x.dcm", png, "PNG"), ("x.jpeg", dcm, "DICOM"), ("scan.png", bare, "DICOM")):
        (tmp_path / name).write_bytes(data)
        a, meta = read_image_with_meta(tmp_path / name)
        assert meta["format"] == fmt
        np.testing.assert_allclose(a, expected, atol=1e-6)
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedFormatError, match="not a recognised image"):
        read_image(tmp_path / "noise.dcm")


def test_format_policy_narrower_set() -> None:
    gif = _save(Image.fromarray(_ramp()), "GIF")
    assert read_image(gif).shape == (48, 64)
    with pytest.raises(UnsupportedFormatError, match=r"GIF images are not accepted here \(DICOM, JPEG, PNG expected\)"):
        read_image(gif, name="u.gif", formats={"JPEG", "PNG", "DICOM"})


# --------------------------------------------------------------------------- decode cost
def test_legit_progressive_jpeg_reads_and_counts_its_scans() -> None:
    data = _save(Image.fromarray(np.dstack([_ramp()] * 3)), "JPEG", progressive=True)
    info = jpeg_info(data, 100)
    assert info is not None and info.progressive and 5 <= info.scans <= 12 and (info.width, info.height) == (64, 48)
    assert read_image(data).shape == (48, 64)


@pytest.mark.parametrize(("scans", "declared", "match"), [
    (150, None, "JPEG with more than 100 scans"),
    (40, (7992, 7992), r"JPEG too costly to decode \(7992x7992 pixels x 40 scans"),
])
def test_jpeg_scan_bombs_are_refused_before_decoding(scans: int, declared: tuple[int, int] | None, match: str) -> None:
    data = progressive_jpeg_with_scans(scans, declared)
    assert len(data) < 60_000
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=match):
        read_image(data, name="bomb.jpg", max_side=224)
    assert time.perf_counter() - t0 < 1.0


def test_jpeg_scan_bomb_inside_dicom_is_refused() -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(io.BytesIO(_dicom(_ramp(64, 64))))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([progressive_jpeg_with_scans(40, (7992, 7992))])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.Rows = ds.Columns = 7992
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ImageTooLargeError, match="JPEG too costly to decode"):
        read_image(buf.getvalue(), name="bomb.dcm", max_side=224)


def _frames(n: int) -> list[Image.Image]:
    return [Image.new("L", (8, 8), (i * 37) % 256) for i in range(n)]


@pytest.mark.parametrize(("fmt", "kw"), [("GIF", {}), ("TIFF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_frame_counts(fmt: str, kw: dict) -> None:
    few, many = _frames(3), _frames(70)
    assert read_image(_save(few[0], fmt, save_all=True, append_images=few[1:], **kw)).shape == (8, 8)
    with pytest.raises(ImageTooLargeError, match=r"too many frames \(more than 64"):
        read_image(_save(many[0], fmt, save_all=True, append_images=many[1:], **kw), name=f"anim.{fmt.lower()}")


def test_declared_size_over_the_memory_budget_is_refused_quickly() -> None:
    data = webp_with_declared_size(7999, 7999)
    assert len(data) == 38
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"image too large to decode \(7999x7999 WEBP RGB needs about"):
        read_image(data, name="tiny.webp", max_side=224)
    assert time.perf_counter() - t0 < 1.0
    assert read_image(webp_with_declared_size(300, 200)).shape == (200, 300)  # the same file, sanely sized


def test_dicom_decode_cost_checked_from_the_header() -> None:
    ds = pydicom.dcmread(io.BytesIO(_dicom(_ramp(64, 64))))
    ds.Rows = ds.Columns = 8000
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ImageTooLargeError, match=r"image too large to decode \(8000x8000x3 at 32 bits"):
        read_image(buf.getvalue(), name="wide.dcm")


@pytest.mark.parametrize("uid", ["0.2.840.10008.1.2.1", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1"])
def test_dicom_with_a_uid_that_is_no_transfer_syntax(uid: str) -> None:
    """A transfer syntax UID that names no transfer syntax (a mutated or hostile header) is one
    ImageReadError line, or a plain read when pydicom can still parse the data set."""
    data = _dicom(_ramp(64, 64))
    at = data.index(b"1.2.840.10008.1.2.1\x00")  # the file meta's transfer syntax value
    data = data[:at] + uid.encode().ljust(20, b"\x00")[:20] + data[at + 20:]
    try:
        arr = read_image(data, name="odd-syntax.dcm")
    except ImageReadError as e:
        assert str(e).startswith("odd-syntax.dcm: ") and "\n" not in str(e)
    else:
        assert arr.shape == (64, 64)


# --------------------------------------------------------------------------- DICOM frames and text
def test_generated_multiframe_dicom_is_refused() -> None:
    frames = np.stack([np.full((32, 32), 40 * i, dtype=np.uint8) for i in range(5)])
    with pytest.raises(UnsupportedFormatError) as ei:
        read_image(_dicom(frames), name="series.dcm")
    assert str(ei.value) == "series.dcm: multi-frame DICOM (5 frames) is not a single radiograph"
    assert read_image(_dicom(frames[:1])).shape == (32, 32)  # NumberOfFrames = 1 is one image


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length")
def test_dicom_text_is_sanitised() -> None:
    data = _dicom(_ramp(), Modality="DX\x1b[2J", BodyPartExamined="CHEST\n" + "Z" * 200)
    _, meta = read_image_with_meta(data)
    assert meta["modality"] == "DX\\x1b[2J"
    assert meta["body_part"].startswith("CHEST\\x0aZ") and len(meta["body_part"]) == 64
    evil = _dicom(_ramp(), WindowCenter=100, WindowWidth=50, VOILUTFunction="EVIL\x1b]0;pwned\x07")
    with pytest.raises(ImageReadError) as ei:
        read_image(evil, name="evil.dcm")
    msg = str(ei.value)
    assert msg.isprintable() and "EVIL\\x1b]0;PWNED\\x07" in msg


# --------------------------------------------------------------------------- EXIF orientation
def test_exif_orientation_6_rotated_jpeg() -> None:
    a = np.zeros((60, 90), dtype=np.uint8)
    a[:20, :30] = 255  # a bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    data = _save(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())
    out, meta = read_image_with_meta(data)
    assert out.shape == (90, 60) and meta["original_size"] == (60, 90)
    assert out[:30, -20:].mean() > 0.9 and out[:30, :20].mean() < 0.1  # the block is now top-right
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
    np.testing.assert_array_equal(out, np.asarray(ref, dtype=np.float32) / 255.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exif_transpose(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(_ramp()), "PNG", exif=exif.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(read_image(data), ref)


# --------------------------------------------------------------------------- isolated decoding
@pytest.fixture(scope="module")
def rgba_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4000 x 4000 RGBA zeros: 64 MB decoded from a small file, long enough to decode to be timed out."""
    p = tmp_path_factory.mktemp("iso") / "rgba.png"
    p.write_bytes(png_bytes(4000, 4000, bytes(4 * 4000), colour_type=6))
    return p


def test_decode_isolated_same_result_and_errors(fixtures_dir: Path) -> None:
    f = fixtures_dir / "fullres" / "NORMAL2-IM-1438-0001.jpeg"
    a, meta = decode_isolated(f, max_side=224)
    b, meta_b = read_image_with_meta(f, max_side=224)
    np.testing.assert_array_equal(a, b)
    assert meta == meta_b and a.flags.writeable
    dcm = fixtures_dir / "dicom" / "ct.dcm"
    np.testing.assert_array_equal(decode_isolated(dcm.read_bytes(), "ct.dcm")[0], read_image(dcm))
    for data, cls in ((progressive_jpeg_with_scans(150), ImageTooLargeError), (b"not an image", UnsupportedFormatError)):
        with pytest.raises(cls) as ei:
            decode_isolated(data, "upload.jpg")
        with pytest.raises(cls) as ej:
            read_image(data, name="upload.jpg")
        assert type(ei.value) is type(ej.value) and str(ei.value) == str(ej.value)


def test_decode_isolated_stops_at_the_deadline(rgba_png: Path) -> None:
    decode_isolated(rgba_png, max_side=224)  # warm: starts the worker server, proves the file decodes
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as ei:
        decode_isolated(rgba_png, "slow.png", max_side=224, timeout_s=0.05)
    assert str(ei.value) == "slow.png: decoding took longer than 0.05 s"
    assert type(ei.value) is ImageReadError and time.perf_counter() - t0 < 5.0


def test_decode_isolated_memory_limit(rgba_png: Path) -> None:
    with pytest.raises(ImageTooLargeError, match="rgba.png: image too large to decode"):
        decode_isolated(rgba_png, max_side=224, max_memory=16 << 20)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether process ``pid`` has ended and been reaped (no /proc entry) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not Path(f"/proc/{pid}").exists()


def test_decode_pool_reuses_its_worker(fresh_pool: DecodePool, fixtures_dir: Path) -> None:
    f = fixtures_dir / "fullres" / "NORMAL2-IM-1438-0001.jpeg"
    decode_isolated(f, max_side=224)
    pids = fresh_pool.pids()
    assert len(pids) == 1
    for _ in range(5):  # errors too leave the worker in place
        decode_isolated(f, max_side=224)
        with pytest.raises(UnsupportedFormatError):
            decode_isolated(b"not an image", "x.jpg")
    assert fresh_pool.pids() == pids


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_decode_timeout_kills_and_replaces_the_worker(fresh_pool: DecodePool, rgba_png: Path, fixtures_dir: Path) -> None:
    decode_isolated(rgba_png, max_side=224)
    (slow_pid,) = fresh_pool.pids()
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="took longer than 0.05 s"):
        decode_isolated(rgba_png, "slow.png", max_side=224, timeout_s=0.05)
    assert time.perf_counter() - t0 < 5.0
    assert fresh_pool.pids() == [] and _gone(slow_pid)  # killed and reaped: no CPU spent on it afterwards
    f = fixtures_dir / "fullres" / "NORMAL2-IM-1438-0001.jpeg"
    np.testing.assert_array_equal(decode_isolated(f, max_side=224)[0], read_image(f, max_side=224))
    assert len(fresh_pool.pids()) == 1 and fresh_pool.pids() != [slow_pid]


def test_decode_memory_breach_is_one_line_and_the_pool_goes_on(fresh_pool: DecodePool, rgba_png: Path, fixtures_dir: Path) -> None:
    with pytest.raises(ImageTooLargeError) as ei:
        decode_isolated(rgba_png, max_side=224, max_memory=16 << 20)
    assert str(ei.value) == f"{rgba_png}: image too large to decode in memory (limit 16 MB)"
    dcm = fixtures_dir / "dicom" / "ct.dcm"
    np.testing.assert_array_equal(decode_isolated(dcm)[0], read_image(dcm))
    assert min(decode_isolated(rgba_png, max_side=224)[0].shape) >= 224  # within the default limit: decoded


def test_decode_isolated_from_8_threads_matches_in_process(fresh_pool: DecodePool, fixtures_dir: Path) -> None:
    files = sorted((fixtures_dir / "xray").rglob("*.jpeg")) + sorted((fixtures_dir / "fullres").glob("*.jpeg"))
    files += sorted((fixtures_dir / "dicom").glob("*.dcm"))
    jobs = [(f, side) for f in files for side in (224, None)]

    def both(job: tuple[Path, int | None]) -> tuple[object, object]:
        f, side = job
        out = []
        for read in (decode_isolated, read_image_with_meta):
            try:
                out.append(read(f, max_side=side))
            except ImageReadError as e:
                out.append((type(e), str(e)))
        return out[0], out[1]

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(both, jobs))
    decoded = 0
    for (f, side), (iso, ref) in zip(jobs, results):
        if isinstance(ref[0], type):  # an unreadable file: the same error
            assert iso == ref, f
            continue
        np.testing.assert_array_equal(iso[0], ref[0], err_msg=f"{f} {side}")
        assert iso[1] == ref[1] and iso[0].dtype == np.float32
        decoded += 1
    assert decoded >= 80 and 1 <= len(fresh_pool.pids()) <= fresh_pool.size


def test_decode_answers_are_checked() -> None:
    """What a subverted worker might send back is refused, never trusted."""
    good = {"ok": True, "shape": [2, 3], "meta": {"format": "PNG", "original_size": [3, 2]}}
    assert _parse_answer(good, 24, "x") == ((2, 3), {"format": "PNG", "original_size": (3, 2)})
    for msg, size in ((good, 25), ({**good, "shape": [100_000, 100_000]}, 4 * 10**10), ({**good, "shape": [0, 3]}, 0),
                      ({**good, "shape": "2x3"}, 24), ([1, 2], 0), ({"ok": False, "error": "ImageReadError"}, 8), ({}, 0)):
        with pytest.raises(ProtocolError):
            _parse_answer(msg, size, "x")
    with pytest.raises(UnsupportedFormatError, match=r"^x: evil\\x0aline$"):
        _parse_answer({"ok": False, "error": "UnsupportedFormatError", "reason": "evil\nline"}, 0, "x")
    with pytest.raises(ImageReadError, match="^x: odd$") as ei:  # an unknown class name: the base class
        _parse_answer({"ok": False, "error": "SystemExit", "reason": "odd"}, 0, "x")
    assert type(ei.value) is ImageReadError


_EXIT = """
import json, sys
from pneumoscan.data.decode_pool import default_pool
from pneumoscan.data.isolated import decode_isolated
from concurrent.futures import ThreadPoolExecutor
if __name__ == "__main__":
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda _: decode_isolated(sys.argv[1], max_side=224), range(8)))
    print(json.dumps(default_pool().pids()))
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_no_decoding_process_outlives_shutdown_or_exit(fresh_pool: DecodePool, fixtures_dir: Path) -> None:
    f = fixtures_dir / "fullres" / "NORMAL2-IM-1438-0001.jpeg"
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda _: decode_isolated(f, max_side=224), range(8)))
    pids = fresh_pool.pids()
    assert pids
    shutdown_decode_pool()
    assert all(_gone(pid) for pid in pids)
    # a script that just exits: the pool is stopped at interpreter exit
    res = subprocess.run([sys.executable, "-c", _EXIT, str(f)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    child_pids = json.loads(res.stdout)
    assert child_pids and all(_gone(pid) for pid in child_pids) and "Traceback" not in res.stderr


# --------------------------------------------------------------------------- peak memory
_CHILD = """
import json, sys, time
from pneumoscan.data.io import read_image
from pneumoscan.errors import ImageReadError
t0 = time.perf_counter()
try:
    shape, error = list(read_image(sys.argv[1], max_side=int(sys.argv[2]) or None).shape), None
except ImageReadError as e:
    shape, error = None, type(e).__name__
# VmHWM is this process's own peak (ru_maxrss would carry the forked test runner's peak across exec)
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"shape": shape, "error": error, "seconds": time.perf_counter() - t0, "peak_mb": hwm / 1024}))
"""


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big")
    files = {
        "webp_7999.webp": webp_with_declared_size(7999, 7999),
        "rgba_7999.png": png_bytes(7999, 7999, bytes(4 * 7999), colour_type=6),
        "jpeg_64mp.jpg": _save(Image.new("L", (8000, 8000), 100), "JPEG", quality=50),
        "progressive_64mp.jpg": _save(Image.new("L", (8000, 8000), 100), "JPEG", quality=50, progressive=True),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {n: d / n for n in files}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM in /proc/self/status is Linux")
@pytest.mark.parametrize(("name", "max_side", "expect"), [
    ("webp_7999.webp", 224, "ImageTooLargeError"), ("rgba_7999.png", 224, "ok"), ("rgba_7999.png", 0, "ok"),
    ("jpeg_64mp.jpg", 224, "ok"), ("jpeg_64mp.jpg", 0, "ok"), ("progressive_64mp.jpg", 224, "ok"),
])
def test_peak_memory_of_one_read_is_bounded(big_inputs: dict[str, Path], name: str, max_side: int, expect: str) -> None:
    p = subprocess.run([sys.executable, "-c", _CHILD, str(big_inputs[name]), str(max_side)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert (r["error"] or "ok") == expect, r
    assert r["peak_mb"] < RSS_LIMIT_MB, r
    assert r["seconds"] < 60, r
