"""The image reader: DICOM display pipeline on the generated fixtures in
``tests/fixtures/dicom`` (exact values), and JPEG/PNG/TIFF/GIF in every Pillow mode a chest
X-ray arrives in."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumoscan.core.imaging import to_uint8
from pneumoscan.data.io import read_image, read_image_with_meta
from pneumoscan.errors import ImageReadError, UnsupportedFormatError

FIX = Path(__file__).resolve().parent / "fixtures"
DCM = FIX / "dicom"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_dicoms", FIX / "make_dicoms.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def _window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, normalised to [0, 1]."""
    return np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def _valid(a: np.ndarray) -> None:
    assert a.ndim == 2 and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0


# --------------------------------------------------------------------------- DICOM
def test_fixtures_match_their_generator() -> None:
    """The checked-in files are what make_dicoms.py builds (pixel data and key attributes)."""
    built = gen.build_all()
    assert sorted(built) == sorted(p.name for p in DCM.glob("*.dcm"))
    for name, ds in built.items():
        on_disk = pydicom.dcmread(DCM / name)
        assert on_disk.get("PhotometricInterpretation") == ds.get("PhotometricInterpretation"), name
        if "PixelData" in ds:
            assert on_disk.PixelData == ds.PixelData, name


def test_monochrome2_8bit_exact() -> None:
    a, meta = read_image_with_meta(DCM / "mono2_8bit.dcm")
    _valid(a)
    np.testing.assert_allclose(a, gen.gradient_u8() / 252.0, atol=1e-6)
    ids = meta.pop("identifiers")
    assert meta == {"format": "DICOM", "mode": "MONOCHROME2", "bits": 8, "original_size": (64, 64), "modality": "DX", "body_part": "CHEST"}
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(ids) and "PatientName" not in ids


def test_monochrome1_is_inverted_and_keeps_16bit_precision() -> None:
    a, meta = read_image_with_meta(DCM / "mono1_16bit.dcm")
    raw = gen.ramp_u12()
    np.testing.assert_allclose(a, 1.0 - raw / 4095.0, atol=1e-6)
    # ordering flipped: the raster ramp now decreases strictly
    assert a[0, 0] == 1.0 and a[-1, -1] == 0.0
    assert np.all(np.diff(a.ravel()) < 0)
    # all 4,096 stored levels survive (an 8-bit intermediate would leave at most 256)
    assert len(np.unique(a)) == 4096
    assert meta["mode"] == "MONOCHROME1" and meta["bits"] == 12


def test_rescale_slope_intercept_applied_before_window() -> None:
    a = read_image(DCM / "rescale_window.dcm")
    raw = gen.ramp_u12().astype(np.float64)
    c, w = gen.RESCALE_WINDOW
    expected = _window(raw * gen.RESCALE_SLOPE + gen.RESCALE_INTERCEPT, c, w)
    np.testing.assert_allclose(a, expected, atol=1e-6)
    # without the modality LUT the same window would give a different image
    assert np.abs(_window(raw, c, w) - a).max() > 0.2
    # raw 500 → -> 0 in rescaled units, the window centre
    assert abs(a.ravel()[500] - 0.5) < 1e-3


def test_window_clips_both_ends() -> None:
    a = read_image(DCM / "window.dcm")
    raw = gen.ramp_u12().astype(np.float64)
    c, w = gen.WINDOW
    np.testing.assert_allclose(a, _window(raw, c, w), atol=1e-6)
    flat = a.ravel()
    # centre 2048, width 1024: the LINEAR function reaches 0 at raw 1536 and 1 at raw 2559
    assert (flat == 0.0).sum() == 1537  # raw 0…1536
    assert (flat == 1.0).sum() == 4096 - 2559  # raw 2559…4095
    assert np.all(np.diff(flat[1536:2560]) > 0)  # strictly increasing inside the window


def test_voi_lut_sequence_takes_precedence_over_window() -> None:
    a = read_image(DCM / "voi_lut_seq.dcm")
    raw = gen.ramp_u12()
    expected = (raw // gen.VOI_LUT_STEP) / 7.0
    np.testing.assert_allclose(a, expected, atol=1e-6)
    assert len(np.unique(a)) == 8


def test_rgb_dicom_to_luma() -> None:
    a, meta = read_image_with_meta(DCM / "rgb.dcm")
    rgb = gen.rgb_u8().astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(a, _minmax(luma), atol=1e-5)
    assert meta["mode"] == "RGB"


def test_palette_colour_lut_applied() -> None:
    a = read_image(DCM / "palette.dcm")
    np.testing.assert_allclose(a, 1.0 - gen.gradient_u8() / 252.0, atol=1e-6)  # the palette reverses the ramp


def test_multiframe_is_refused() -> None:
    """A multi-frame file is a series, not one radiograph (docs/security.md)."""
    with pytest.raises(UnsupportedFormatError, match=r"multi-frame DICOM \(3 frames\) is not a single radiograph"):
        read_image(DCM / "multiframe.dcm")


def test_ct_modality_hounsfield_window_and_metadata() -> None:
    a, meta = read_image_with_meta(DCM / "ct.dcm")
    hu = gen.ramp_u12().astype(np.float64) + gen.CT_INTERCEPT
    np.testing.assert_allclose(a, _window(hu, *gen.CT_WINDOW), atol=1e-6)
    assert meta["modality"] == "CT" and meta["body_part"] == "ABDOMEN"


def test_dicom_without_pixel_data() -> None:
    with pytest.raises(ImageReadError, match="no pixel data") as ei:
        read_image(DCM / "no_pixels.dcm")
    assert type(ei.value) is ImageReadError and str(DCM / "no_pixels.dcm") in str(ei.value)


def test_dicom_transfer_syntax_without_decoder() -> None:
    with pytest.raises(UnsupportedFormatError, match="JPEG-LS") as ei:
        read_image(DCM / "jpegls_bogus.dcm")
    assert "no decoder" in str(ei.value)


def test_dicom_corrupt_compressed_data_with_decoder() -> None:
    with pytest.raises(ImageReadError, match="JPEG 2000") as ei:
        read_image(DCM / "jpeg2000_corrupt.dcm")
    assert type(ei.value) is ImageReadError and "cannot decode" in str(ei.value)


def test_dicom_without_preamble_named_dcm(tmp_path: Path) -> None:
    """A data set written without the 128-byte preamble and 'DICM' magic still reads when
    the name says .dcm."""
    ds = pydicom.dcmread(DCM / "mono2_8bit.dcm")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    data = buf.getvalue()
    data = data[data.index(b"\x08\x00"):] if data[128:132] == b"DICM" else data
    assert data[128:132] != b"DICM"
    f = tmp_path / "nopreamble.dcm"
    f.write_bytes(data)
    np.testing.assert_allclose(read_image(f), gen.gradient_u8() / 252.0, atol=1e-6)


def test_dicom_bytes_and_stream() -> None:
    data = (DCM / "mono1_16bit.dcm").read_bytes()
    a = read_image(data)
    b = read_image(io.BytesIO(data))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, read_image(DCM / "mono1_16bit.dcm"))


# --------------------------------------------------------------------------- Pillow formats
def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def test_kermany_jpeg(fixtures_dir: Path) -> None:
    f = fixtures_dir / "xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg"
    a, meta = read_image_with_meta(f)
    _valid(a)
    with Image.open(f) as im:
        expected = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(a, expected)
    assert meta["format"] == "JPEG" and meta["original_size"] == (224, 224)


def test_png_8bit_grey_exact(tmp_path: Path) -> None:
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    a, meta = read_image_with_meta(_save(Image.fromarray(v), tmp_path / "g.png"))
    np.testing.assert_array_equal(a, v / np.float32(255.0))
    assert meta["bits"] == 8


def test_png_16bit_keeps_precision(tmp_path: Path) -> None:
    v = (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)  # 4,096 levels
    a, meta = read_image_with_meta(_save(Image.fromarray(v), tmp_path / "g16.png"))
    np.testing.assert_allclose(a, v / 65535.0, atol=1e-7)
    assert meta["bits"] == 16 and len(np.unique(a)) == 4096


def test_tiff_16bit(tmp_path: Path) -> None:
    v = (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)
    a = read_image(_save(Image.fromarray(v), tmp_path / "g16.tif"))
    np.testing.assert_allclose(a, v / 65535.0, atol=1e-7)


def test_float_tiff_with_nan_is_finite(tmp_path: Path) -> None:
    v = np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8)
    v[0, 0] = np.nan
    v[0, 1] = np.inf
    a = read_image(_save(Image.fromarray(v), tmp_path / "f.tif"))
    _valid(a)
    assert a[7, 7] == 1.0 and a[0, 2] == 0.0 and a[0, 0] == 0.0


def test_rgb_png_is_itu601_luma(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB")
    a = read_image(_save(img, tmp_path / "c.png"))
    np.testing.assert_array_equal(a, np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
    assert a.shape == (20, 30)


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # opaque top half
    rgba[2:, :, 3] = 0  # transparent bottom half
    a = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert np.allclose(a[:2], 200 / 255.0) and np.all(a[2:] == 0.0)


def test_la_mode(tmp_path: Path) -> None:
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 100
    la[..., 1] = 255
    la[0, 0, 1] = 0
    a = read_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert a[0, 0] == 0.0 and np.isclose(a[1, 1], 100 / 255.0)


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    v = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    p = Image.fromarray(v).convert("P")
    a = read_image(_save(p, tmp_path / "p.png"))
    np.testing.assert_allclose(a, v / 255.0, atol=1 / 255)
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    b = read_image(_save(p, tmp_path / "pt.png", transparency=p.info["transparency"]))
    assert b[0, 0] == 0.0 and np.isclose(b[7, 7], a[7, 7])


def test_bilevel_mode_1(tmp_path: Path) -> None:
    img = Image.fromarray(np.eye(8, dtype=bool))
    a = read_image(_save(img, tmp_path / "b.png"))
    np.testing.assert_array_equal(a, np.eye(8, dtype=np.float32))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))).convert("CMYK")
    a, meta = read_image_with_meta(_save(img, tmp_path / "k.jpg"))
    _valid(a)
    assert meta["mode"] == "CMYK" and a[:, -1].mean() > a[:, 0].mean() + 0.5  # the ramp survives


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    f0 = Image.new("L", (16, 16), 30)
    f1 = Image.new("L", (16, 16), 220)
    a = read_image(_save(f0, tmp_path / "a.gif", save_all=True, append_images=[f1]))
    assert np.allclose(a, 30 / 255.0, atol=2 / 255)


def test_jpeg_draft_mode_for_large_files(fullres_dir: Path) -> None:
    f = fullres_dir / "NORMAL2-IM-1438-0001.jpeg"
    full, meta = read_image_with_meta(f)
    small, meta_small = read_image_with_meta(f, max_side=224)
    assert meta["original_size"] == meta_small["original_size"] == (1328, 1104)
    assert full.shape == (1104, 1328)
    assert min(small.shape) >= 224 and max(small.shape) < 1328 / 2  # reduced, never below max_side
    _valid(small)


def test_unreadable_inputs_name_the_file(tmp_path: Path) -> None:
    txt = tmp_path / "notes.png"
    txt.write_text("patient notes, not an image")
    with pytest.raises(UnsupportedFormatError, match=r"notes\.png: not a recognised image"):
        read_image(txt)
    with pytest.raises(ImageReadError, match=r"absent\.jpeg: file not found"):
        read_image(tmp_path / "absent.jpeg")
    with pytest.raises(ImageReadError, match=r"upload\.jpg: empty file"):
        read_image(b"", name="upload.jpg")
    with pytest.raises(ImageReadError, match="^<bytes>: "):
        read_image(b"GIF89a-broken")


def test_to_uint8_round_trip() -> None:
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_uint8(v / np.float32(255.0)), v)
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 2.0])), [0, 255])
