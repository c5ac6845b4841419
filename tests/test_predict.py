"""``pneumoscan predict`` and the Predictor API on real X-rays: every input kind (JPEG, PNG
8/16-bit, DICOM, folders, globs), input order with failures mixed in, output formats, TTA,
the guard inside predict, the bundled samples and the shipped default model."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.data.io import read_image
from pneumoscan.errors import CheckpointError
from pneumoscan.inference import Predictor, load_predictor
from pneumoscan.cli.predict import expand_inputs, sample_files


# ----------------------------------------------------------------------------- helpers
def _fixture_images(xray_dir: Path) -> list[Path]:
    return sorted(xray_dir.rglob("*.jpeg"))


def _write_png8(src: Path, dest: Path) -> Path:
    Image.open(src).convert("L").save(dest)
    return dest


def _write_png16(src: Path, dest: Path) -> Path:
    a = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(a).save(dest)
    return dest


def _write_dicom(src: Path, dest: Path, photometric: str = "MONOCHROME2") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 16  # 12-bit range
    if photometric == "MONOCHROME1":
        grey = 4095 - grey
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = grey.astype(np.uint16).tobytes()
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / max(a.max() - a.min(), 1e-12)


def _json_lines(out: str) -> list[dict]:
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return load_predictor(tiny_run, batch_size=4)


# ----------------------------------------------------------------------------- Python API
def test_predict_paths_keeps_input_order_with_failures_mixed_in(predictor: Predictor, xray_dir: Path, tmp_path: Path) -> None:
    good = _fixture_images(xray_dir)[:7]
    corrupt = tmp_path / "truncated.jpeg"
    corrupt.write_bytes(good[0].read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpeg"
    paths = [good[0], corrupt, good[1], good[2], text, good[3], good[4], missing, good[5], good[6]]
    preds = list(predictor.predict_paths(paths))  # batch size 4: failures fall inside batches
    assert [p.path for p in preds] == [str(p) for p in paths]
    failed = {p.path: p.error for p in preds if p.error}
    assert set(failed) == {str(corrupt), str(text), str(missing)}
    assert "not found" in failed[str(missing)]
    for p in preds:
        if p.error is None:
            assert 0.0 < p.probability < 1.0
            assert p.label == ("PNEUMONIA" if p.probability >= p.threshold else "NORMAL")
            assert p.model == predictor.name and p.extra["weights"] == predictor.weights_id
    # the batched answers equal one-by-one answers
    single = predictor.predict_image(good[3])
    batched = next(p for p in preds if p.path == str(good[3]))
    assert batched.probability == pytest.approx(single.probability, abs=1e-6)


def test_all_input_formats_give_the_same_answer(predictor: Predictor, fullres_dir: Path, tmp_path: Path) -> None:
    src = sorted(fullres_dir.glob("*.jpeg"))[1]
    png8 = _write_png8(src, tmp_path / "x8.png")
    png16 = _write_png16(src, tmp_path / "x16.png")
    dcm2 = _write_dicom(src, tmp_path / "x2.dcm")
    dcm1 = _write_dicom(src, tmp_path / "x1.dcm", "MONOCHROME1")
    ref = predictor.predict_image(png8).probability
    ref_img = _minmax(read_image(png8))
    for f in (png16, dcm2, dcm1):
        # the same pixels reach the model (DICOM: 12-bit, MONOCHROME1 inverted back) ...
        assert np.abs(_minmax(read_image(f)) - ref_img).max() <= 1.5 / 255, f.name
        # ... and the same answer comes out
        p = predictor.predict_image(f)
        assert p.error is None
        assert p.probability == pytest.approx(ref, abs=1e-3), f.name
    # bytes and streams work as well as paths
    data = png16.read_bytes()
    assert predictor.predict_image(data, name="upload.png").probability == pytest.approx(ref, abs=2e-3)
    assert predictor.predict_image(io.BytesIO(data), name="upload.png").path == "upload.png"


def test_tta_flip_is_invariant_to_mirroring(tiny_run: Path, fullres_dir: Path) -> None:
    img = read_image(sorted(fullres_dir.glob("*.jpeg"))[0], max_side=256)
    plain = load_predictor(tiny_run)
    tta = load_predictor(tiny_run, tta="flip")
    crops = load_predictor(tiny_run, tta="crops")
    mirrored = np.ascontiguousarray(img[:, ::-1])
    p, pm = tta.probabilities([img, mirrored])
    assert p == pytest.approx(pm, abs=1e-6)  # averaging a view with its mirror is mirror-symmetric
    q, qm = plain.probabilities([img, mirrored])
    assert p == pytest.approx((q + qm) / 2, abs=2e-3)  # close to the mean of both probabilities
    c = crops.probabilities([img])[0]
    assert 0.0 < c < 1.0


def test_guard_in_predict_refuses_non_xrays(predictor: Predictor, tmp_path: Path, xray_dir: Path) -> None:
    from pneumoscan.workflows.guard_synth import encode, generate

    doc = tmp_path / "letter.png"
    doc.write_bytes(encode(generate("document", 424_242)))
    xray = _fixture_images(xray_dir)[0]
    preds = list(predictor.predict_paths([doc, xray], guard=True))
    assert preds[0].refused and preds[0].probability is None and preds[0].label is None
    assert "guard_score" in preds[0].extra
    assert preds[1].refused is None and preds[1].probability is not None
    assert predictor.predict_image(doc, guard=True).refused
    assert predictor.predict_image(doc, guard=False).probability is not None


# ----------------------------------------------------------------------------- CLI
def test_cli_predict_json_folders_globs_and_bad_files(cli, tiny_run: Path, xray_dir: Path, fullres_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(fullres_dir / "person1003_virus_1685.jpeg", folder / "sub" / "a.jpeg")
    _write_dicom(fullres_dir / "NORMAL2-IM-1438-0001.jpeg", folder / "b.dcm")
    _write_png16(_fixture_images(xray_dir)[0], folder / "c.png")
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "readme.txt").write_text("ignored: no image suffix")
    pattern = str(xray_dir / "val" / "*" / "*.jpeg")
    res = cli("predict", "--checkpoint", tiny_run, "--format", "json", "--no-guard", folder, pattern, tmp_path / "nope.png", "*.nomatch")
    assert res.code == 1  # some files failed
    rows = _json_lines(res.out)
    expected = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")
    expected += sorted(str(p) for p in (xray_dir / "val").glob("*/*.jpeg"))
    expected += [str(tmp_path / "nope.png"), "*.nomatch"]
    assert [r["path"] for r in rows] == expected
    for r in rows:
        assert {"path", "probability", "label", "threshold", "model"} <= set(r)
        if Path(r["path"]).name in ("broken.jpeg", "nope.png", "*.nomatch"):
            assert r["error"] and r["probability"] is None
        else:
            assert "error" not in r and 0 < r["probability"] < 1 and r["label"] in ("NORMAL", "PNEUMONIA")
    assert "Traceback" not in res.err
    summary = [ln for ln in res.err_lines if "images/s" in ln]
    assert summary and "11 predicted" in summary[-1] and "3 failed" in summary[-1] and "0 refused" in summary[-1]


def test_cli_predict_table_and_csv(cli, tiny_run: Path, fullres_dir: Path) -> None:
    res = cli("predict", "--checkpoint", tiny_run, fullres_dir)
    assert res.code == 0
    lines = res.out.strip().splitlines()
    assert lines[0].split()[:3] == ["path", "probability", "label"]
    assert len(lines) == 3 and all(ln.split()[-1] in ("NORMAL", "PNEUMONIA") for ln in lines[1:])
    res = cli("predict", "--checkpoint", tiny_run, "--format", "csv", "--tta", fullres_dir)
    assert res.code == 0
    import csv

    rows = list(csv.DictReader(io.StringIO(res.out)))
    assert len(rows) == 2 and all(r["status"] == "ok" and 0 < float(r["probability"]) < 1 for r in rows)


def test_cli_predict_samples_are_accepted_and_predicted(cli, tiny_run: Path) -> None:
    samples = sample_files()
    assert 4 <= len([s for s in samples if s.suffix == ".jpeg"]) and any(s.suffix == ".dcm" for s in samples)
    assert all(s.stat().st_size < 300_000 for s in samples)
    res = cli("predict", "--samples", "--checkpoint", tiny_run, "--format", "json")
    assert res.code == 0, res.err
    rows = _json_lines(res.out)
    assert [Path(r["path"]).name for r in rows] == [s.name for s in samples]
    assert all("refused" not in r and "error" not in r for r in rows), rows


def test_cli_predict_heatmaps_at_original_resolution(cli, tiny_run: Path, fullres_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "heat"
    res = cli("predict", "--checkpoint", tiny_run, "--heatmap", out, "--heatmap-style", "overlay", "--format", "json", fullres_dir)
    assert res.code == 0, res.err
    for r in _json_lines(res.out):
        f = Path(r["heatmap_file"])
        assert f.parent == out and f.suffix == ".png"
        with Image.open(f) as im, Image.open(r["path"]) as orig:
            assert im.size == orig.size and im.mode == "RGB"


def test_cli_predict_clear_errors(cli, tiny_run: Path, tmp_path: Path, fullres_dir: Path) -> None:
    res = cli("predict", "--checkpoint", tmp_path / "none.pt", fullres_dir)
    assert res.code == 1 and len(res.err_lines) == 1 and "checkpoint not found" in res.err
    res = cli("predict", "--checkpoint", tiny_run, "--heatmap", tmp_path / "h", "--layer", "backbone.nope", fullres_dir)
    assert res.code == 1 and "unknown layer" in res.err and "Traceback" not in res.err
    res = cli("predict", "--checkpoint", tiny_run)
    assert res.code == 1 and "nothing to predict" in res.err


def test_expand_inputs_reports_empty_folders_and_patterns(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.JPEG").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.png").write_bytes(b"")
    got = expand_inputs([str(tmp_path / "empty"), str(tmp_path / "*.JPEG"), str(tmp_path / "*.gif"), str(tmp_path)])
    assert got[0][1] and got[1] == (str(tmp_path / "x.JPEG"), None) and got[2][1] == "no file matches this pattern"
    assert got[3:] == [(str(tmp_path / "x.JPEG"), None)]


# ----------------------------------------------------------------------------- default model
def _default_installed() -> bool:
    from pneumoscan.models.bundle import DEFAULT_MANIFEST, default_model_dir

    return (default_model_dir() / DEFAULT_MANIFEST).is_file()


@pytest.mark.skipif(not _default_installed(), reason="the shipped default model is not in src/pneumoscan/assets/default yet")
def test_default_model_loads_verified_and_refuses_a_corrupted_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscan.models import bundle as dm
    from pneumoscan.utils.io import sha256_file

    man = dm.default_manifest()
    b = dm.load_bundle(None)
    assert b.sha256 == man["sha256"] == sha256_file(dm.default_model_dir() / man["file"]) and b.name == man["name"]
    p = load_predictor(None)
    assert p.name == man["name"] and p.weights_id == man["sha256"][:12]
    pred = p.predict_image(sample_files()[0])
    assert 0.0 < pred.probability < 1.0
    # a copy with one flipped byte fails its checksum
    copy = tmp_path / "default"
    shutil.copytree(dm.default_model_dir(), copy)
    f = copy / man["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(dm, "default_model_dir", lambda: copy)
    with pytest.raises(CheckpointError, match="checksum"):
        dm.load_bundle(None)
    with pytest.raises(CheckpointError, match="checksum"):
        load_predictor(None, backend="torch")  # "auto" runs the shipped ONNX export and never reads the .pt


def test_predict_without_checkpoint_uses_the_default_model(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _default_installed():
        res = cli("predict", "--samples", "--format", "json")
        assert res.code == 0, res.err
        from pneumoscan.models.bundle import default_manifest

        assert {r["model"] for r in _json_lines(res.out)} == {default_manifest()["name"]}
    else:
        res = cli("predict", "--samples")
        assert res.code == 1 and len(res.err_lines) == 1 and "default model is not installed" in res.err
    # an absent default model is one clear line, never a traceback
    from pneumoscan.models import bundle as dm

    monkeypatch.setattr(dm, "default_model_dir", lambda: tmp_path)
    res = cli("predict", "--samples")
    assert res.code == 1 and "not installed" in res.err and "Traceback" not in res.err


def test_prediction_to_dict_keeps_field_order_and_drops_the_heatmap() -> None:
    from dataclasses import asdict

    from pneumoscan.inference.records import Prediction

    heat = np.ones((4, 4), dtype=np.float32)
    for p in (
        Prediction("a.png", 0.8, "PNEUMONIA", 0.5, "m", heatmap=heat, extra={"guard_score": 0.99, "seen_as": "train"}, warnings=["w"]),
        Prediction("b.png", None, None, 0.5, "m", error="unreadable"),
        Prediction("c.png", None, None, 0.5, "m", refused="not a chest X-ray", extra={"guard_score": 0.01}),
    ):
        ref = {k: v for k, v in asdict(p).items() if k not in ("heatmap", "extra") and not (k in ("error", "refused") and v is None)}
        ref.update(p.extra)
        d = p.to_dict()
        assert d == ref and list(d) == list(ref) and "heatmap" not in d
        assert d["warnings"] is not p.warnings  # a copy: the caller may change it
        json.dumps(d)
