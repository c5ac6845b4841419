"""Property-based tests (hypothesis) of the reader and the preprocessing.

Whatever bytes arrive — random, or valid JPEG/PNG/DICOM files with bytes flipped, cut,
inserted or overwritten — the reader returns a valid image (2-D float32, finite, in [0, 1])
or raises pneumoscan's own ImageReadError, never anything else. ``preprocess_batch`` turns any
2-D array into a finite ``(B, 1, S, S)`` tensor in [0, 1].
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from pneumoscan.data.io import read_image
from pneumoscan.data.transforms import preprocess_batch
from pneumoscan.errors import ImageReadError

FIX = Path(__file__).resolve().parent / "fixtures"
#: More examples for a deep local run: PNEUMOSCAN_FUZZ_EXAMPLES=5000 pytest tests/test_properties.py
EXAMPLES = int(os.environ.get("PNEUMOSCAN_FUZZ_EXAMPLES", "150"))
COMMON = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(FIX / "xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg").convert("L").resize((32, 32)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _small_png(bits: int) -> bytes:
    buf = io.BytesIO()
    if bits == 16:
        Image.fromarray((np.arange(16 * 16, dtype=np.uint16) * 250).reshape(16, 16)).save(buf, "PNG")
    else:
        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, "PNG")
    return buf.getvalue()


SEEDS: dict[str, bytes] = {
    "jpeg": _small_jpeg(),
    "png8": _small_png(8),
    "png16": _small_png(16),
    "dicom_mono1": (FIX / "dicom" / "mono1_16bit.dcm").read_bytes(),
    "dicom_window": (FIX / "dicom" / "rescale_window.dcm").read_bytes(),
    "dicom_voilut": (FIX / "dicom" / "voi_lut_seq.dcm").read_bytes(),
    "dicom_rgb": (FIX / "dicom" / "rgb.dcm").read_bytes(),
    "dicom_palette": (FIX / "dicom" / "palette.dcm").read_bytes(),
}
# The DICOM seeds' headers end before their pixel data; mutations there exercise the parser.
HEADER_END = {k: (v.index(b"\xe0\x7f\x10\x00") if v[128:132] == b"DICM" else min(len(v), 600)) for k, v in SEEDS.items()}


def _check(data: bytes, name: str) -> None:
    """The property: a valid image or ImageReadError naming ``name``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stray warning is a leak of library noise to users
        try:
            a = read_image(data, name=name, max_side=64)
        except ImageReadError as e:
            assert str(e).startswith(f"{name}: ")
            assert "\n" not in str(e)
            return
    assert isinstance(a, np.ndarray) and a.ndim == 2 and a.dtype == np.float32 and a.size > 0
    assert np.isfinite(a).all()
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@COMMON
@given(data=st.binary(max_size=4096), name=st.sampled_from(["upload.png", "upload.jpg", "upload.dcm", "upload"]))
@example(data=b"", name="upload.png")
@example(data=b"\x89PNG\r\n\x1a\n", name="upload.png")
@example(data=b"\xff\xd8\xff", name="upload.jpg")
def test_any_bytes(data: bytes, name: str) -> None:
    _check(data, name)


@COMMON
@given(body=st.binary(max_size=2048))
def test_any_bytes_after_dicom_magic(body: bytes) -> None:
    """Bytes that claim to be DICOM (preamble + 'DICM') go through pydicom: still safe."""
    _check(b"\0" * 128 + b"DICM" + body, "claims.dcm")


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    focus_header = kind.startswith("dicom") and draw(st.booleans())
    hi = HEADER_END[kind] if focus_header else len(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "overwrite"]))
        if not data:
            break
        pos = draw(st.integers(0, max(0, min(hi, len(data)) - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:  # overwrite 4 bytes with an extreme little/big-endian integer (lengths, sizes)
            data[pos : pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\x00\x00", b"\x00\x00\xff\xff", b"\x7f\xff\xff\xff"]))
    return kind, bytes(data)


@COMMON
@given(case=mutated())
def test_mutated_valid_files(case: tuple[str, bytes]) -> None:
    kind, data = case
    _check(data, f"mutated-{kind}" + (".dcm" if kind.startswith("dicom") else ".img"))


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_seeds_themselves_read(kind: str) -> None:
    """The unmutated seeds are valid images, so the mutation tests start from real files."""
    a = read_image(SEEDS[kind], max_side=64)
    assert a.ndim == 2 and a.shape[0] >= 16 and a.std() > 0.05


# --------------------------------------------------------------------------- preprocessing
@st.composite
def any_2d_array(draw: st.DrawFn) -> np.ndarray:
    """2-D arrays of any common dtype, floats including NaN, ±inf and extremes.

    Subnormal floats are left out: training (in the same test session) turns on
    flush-to-zero, under which hypothesis cannot generate them.
    """
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.uint8, np.int32, np.bool_]))
    shape = draw(array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=80))
    if np.dtype(dtype).kind == "f":
        elements = st.floats(width=8 * np.dtype(dtype).itemsize, allow_nan=True, allow_infinity=True, allow_subnormal=False)
        return draw(arrays(dtype, shape, elements=elements))
    return draw(arrays(dtype, shape))


@settings(max_examples=120, deadline=None)
@given(arr=any_2d_array(), size=st.sampled_from([1, 7, 32, 128, 224]))
def test_preprocess_batch_any_2d_array(arr: np.ndarray, size: int) -> None:
    before = arr.copy()
    t = preprocess_batch([arr], size)
    assert t.shape == (1, 1, size, size) and t.dtype == torch.float32
    assert torch.isfinite(t).all()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    np.testing.assert_array_equal(arr, before)  # the caller's array is never modified


@settings(max_examples=60, deadline=None)
@given(
    arr=arrays(np.float32, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=64),
               elements=st.floats(0, 1, width=32, allow_subnormal=False)),
    size=st.integers(1, 96),
)
def test_preprocess_in_range_values_are_only_resized(arr: np.ndarray, size: int) -> None:
    """For valid input (the reader's output) nothing is clipped away: a constant image stays
    that constant, and at its own size the image passes through unchanged."""
    t = preprocess_batch([arr], size)
    assert t.shape == (1, 1, size, size)
    if arr.shape == (size, size):
        np.testing.assert_array_equal(t[0, 0].numpy(), arr)
    c = np.full_like(arr, float(arr.flat[0]))
    assert torch.allclose(preprocess_batch([c], size), torch.tensor(float(arr.flat[0])), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batch=st.lists(arrays(np.uint8, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)), min_size=1, max_size=5))
def test_preprocess_uint8_batches(batch: list[np.ndarray]) -> None:
    assume(all(a.size for a in batch))
    tensors = [torch.from_numpy(a).unsqueeze(0) for a in batch]  # the dataset's (1, H, W) uint8 form
    t = preprocess_batch(tensors, 16)
    assert t.shape == (len(batch), 1, 16, 16) and torch.isfinite(t).all()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
