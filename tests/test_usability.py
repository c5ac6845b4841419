"""Issue 15: mistakes get help, pictures that explain, outputs a hospital can file.

Real command lines (in-process through :func:`pneumoscan.cli.main`, or a fresh interpreter where
the exact terminal output matters), real X-rays (the bundled JPEG and DICOM samples, the
fixtures) and real DICOM files read back with pydicom.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumoscan.cli.predict import sample_files
from pneumoscan.config import TrainConfig, suggest_keys
from pneumoscan.core.imaging import jet
from pneumoscan.data.datasets import parse_columns, read_manifest
from pneumoscan.data.io import read_image, read_image_with_meta
from pneumoscan.errors import ConfigError, DataError
from pneumoscan.explain.figure import FIGURE_MAX_SIDE, Caption, heatmap_figure
from pneumoscan.workflows.dicom_output import SECONDARY_CAPTURE, SecondaryCaptureWriter

from conftest import REPO_ROOT, CliResult

DICOM_IDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber", "ViewPosition")
STATIC = REPO_ROOT / "src" / "pneumoscan" / "serving" / "static"


def _dicom_samples() -> list[Path]:
    return [p for p in sample_files() if p.suffix == ".dcm"]


def _jpeg_samples() -> list[Path]:
    return [p for p in sample_files() if p.suffix == ".jpeg"]


def _json_lines(out: str) -> list[dict]:
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- 3. mistakes get help
def test_unknown_option_names_the_closest_option_of_its_subcommand(cli_subprocess: Callable[..., CliResult]) -> None:
    r = cli_subprocess("predict", "--heatmaps", "x", "--samples")
    assert r.code == 2 and r.out == ""
    assert r.err_lines == ["pneumoscan predict: error: unknown option --heatmaps (did you mean --heatmap?)"]
    r = cli_subprocess("evaluate", "--data", "d", "--out", "o", "--chekpoint", "c")
    assert r.code == 2 and r.err_lines == ["pneumoscan evaluate: error: unknown option --chekpoint (did you mean --checkpoint?)"]


def test_unknown_option_in_process_and_nested_and_misspelt_command(cli: Callable[..., CliResult], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli("benchmark", "predict", "--checkpoint", "c", "--data", "d", "--latency-imgae", "x")
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "pneumoscan benchmark predict: error: unknown option --latency-imgae (did you mean --latency-image?)" in err
    with pytest.raises(SystemExit) as ei:
        cli("predcit", "x")
    assert ei.value.code == 2 and "did you mean 'predict'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli("models", "--zzzzzz")
    assert ei.value.code == 2 and "see 'pneumoscan models --help'" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "expected"), [
    ("optim.learning_rate", "optim.lr"), ("lr", "optim.lr"), ("optim.wd", "optim.weight_decay"), ("optimizer.lr", "optim.lr"),
    ("data.epochs", "epochs"), ("batchsize", "batch_size"), ("model.nmae", "model.name"), ("augment.flip", "augment.hflip"),
])
def test_config_key_suggestions(key: str, expected: str) -> None:
    assert suggest_keys(key)[0] == expected
    with pytest.raises(ConfigError, match=re.escape(f"did you mean '{expected}'")):
        TrainConfig().override({key: "1"})
    assert suggest_keys("zzzzzzzz") == []


def test_set_unknown_key_names_the_close_key(cli: Callable[..., CliResult], xray_dir: Path, tmp_path: Path) -> None:
    r = cli("train", "--data", xray_dir, "--set", "optim.learning_rate=1e-3", "--out", tmp_path / "run")
    assert r.code == 1
    assert r.err_lines == ["error: unknown config key 'optim.learning_rate' (did you mean 'optim.lr'?)"]
    assert not (tmp_path / "run").exists()


def test_a_text_file_as_checkpoint_says_so(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# notes\n\nnot a model\n")
    r = cli("predict", "--checkpoint", readme, _jpeg_samples()[0])
    assert r.code == 1 and r.err_lines == [f"error: {readme} is a text file, not a pneumoscan checkpoint"]
    r = cli("predict", "--checkpoint", _jpeg_samples()[0], _jpeg_samples()[0])
    assert r.code == 1 and "is an image, not a pneumoscan checkpoint" in r.err


def test_evaluate_missing_split_lists_the_splits_there(cli: Callable[..., CliResult], xray_dir: Path, tmp_path: Path) -> None:
    r = cli("evaluate", "--data", xray_dir, "--split", "test", "--out", tmp_path / "r")
    assert r.code == 1
    assert r.err_lines == [f"error: {xray_dir}: no 'test' split folder (splits here: train, val)"]


def test_predict_summary_has_no_throughput_when_nothing_was_predicted(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    r = cli("predict", tmp_path / "nope.jpg")
    assert r.code == 1
    assert "nothing predicted: 1 file could not be read" in r.err and "images/s" not in r.err
    r = cli("predict", tmp_path / "nope.jpg", tmp_path / "gone.png")
    assert "nothing predicted: 2 files could not be read" in r.err and "images/s" not in r.err


def _foreign_manifest(xray_dir: Path, tmp_path: Path) -> Path:
    rows = [(p, "PNEUMONIA" if p.parent.name == "PNEUMONIA" else "NORMAL") for p in sorted((xray_dir / "val").rglob("*.jpeg"))]
    m = tmp_path / "foreign.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Filename", "Target", "Site"])
        w.writerows([(str(p), lab, "A") for p, lab in rows])
    return m


def test_manifest_columns_are_mapped(xray_dir: Path, tmp_path: Path) -> None:
    m = _foreign_manifest(xray_dir, tmp_path)
    with pytest.raises(DataError, match=r"--columns path=COLUMN,label=COLUMN") as ei:
        read_manifest(m)
    assert "filename" in str(ei.value) and "target" in str(ei.value)
    samples = read_manifest(m, columns="path=filename,label=target")
    assert len(samples) == 8 and sum(s.label for s in samples) == 4
    assert read_manifest(m, columns={"path": "FILENAME", "label": "target"}) == samples
    assert parse_columns("path=filename, label=target") == {"path": "filename", "label": "target"}
    with pytest.raises(DataError, match="NAME one of path, label, patient_id, split"):
        parse_columns("image=filename")


def test_evaluate_with_columns(cli: Callable[..., CliResult], tiny_run: Path, xray_dir: Path, tmp_path: Path) -> None:
    m = _foreign_manifest(xray_dir, tmp_path)
    r = cli("evaluate", "--data", m, "--checkpoint", tiny_run, "--out", tmp_path / "r0", "--bootstrap", "100", "--no-summary")
    assert r.code == 1 and "--columns" in r.err
    r = cli("evaluate", "--data", m, "--columns", "path=filename,label=target", "--checkpoint", tiny_run,
            "--out", tmp_path / "r", "--bootstrap", "100", "--no-summary", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["at_operating_threshold"]["n"] == 8


def test_calibrate_needs_out_or_in_place(cli: Callable[..., CliResult], tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "best.pt").read_bytes()
    r = cli("calibrate", "--checkpoint", run, "--method", "f1")
    assert r.code == 1 and "--out" in r.err and "--in-place" in r.err
    r = cli("calibrate", "--checkpoint", run, "--method", "f1", "--out", tmp_path / "x.pt", "--in-place")
    assert r.code == 1 and "not both" in r.err
    assert (run / "best.pt").read_bytes() == before and not (tmp_path / "x.pt").exists()
    r = cli("calibrate", "--checkpoint", run, "--method", "f1", "--in-place")
    assert r.code == 0, r.err
    assert (run / "best.pt").read_bytes() != before


# ----------------------------------------------------------------------------- 4. pictures that explain
def _cam(h: int = 7, w: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / 4).astype(np.float32)


def test_figure_is_bounded_and_carries_a_true_jet_colour_bar() -> None:
    big = np.random.default_rng(0).random((4000, 3000), dtype=np.float32)
    fig = heatmap_figure(big, _cam(), Caption(0.91, "PNEUMONIA", 0.73, "m", "abc"))
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    assert fig.shape[0] < FIGURE_MAX_SIDE + 300 and fig.shape[1] < 2 * 768 + 300  # panels 1024 x 768
    # the colour bar: a column whose top is jet(1) and bottom jet(0), in order
    ref_top, ref_bottom = (jet(np.float32(1.0)) * 255).round(), (jet(np.float32(0.0)) * 255).round()
    cols = [x for x in range(fig.shape[1] - 1, fig.shape[1] // 2, -1)
            if np.abs(fig[:, x].astype(int) - ref_top).sum(axis=1).min() <= 3 and np.abs(fig[:, x].astype(int) - ref_bottom).sum(axis=1).min() <= 3]
    assert cols, "no colour bar"
    col = fig[:, cols[0]].astype(int)
    top = int(np.argmin(np.abs(col - ref_top).sum(axis=1)))
    bottom = int(np.argmin(np.abs(col - ref_bottom).sum(axis=1)))
    assert bottom - top > 600
    # small images are enlarged so that the caption stays legible
    small = heatmap_figure(big[:64, :80], _cam(), Caption(None, None, 0.5, "m"))
    assert small.shape[1] > 700


def test_predict_heatmap_figure_by_default_and_paths_in_every_format(cli: Callable[..., CliResult], fullres_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "heat"
    res = cli("predict", "--heatmap", out, "--format", "json", fullres_dir)
    assert res.code == 0, res.err
    rows = _json_lines(res.out)
    for r in rows:
        f = Path(r["heatmap_file"])
        assert f.parent == out
        with Image.open(f) as im, Image.open(r["path"]) as orig:
            assert im.mode == "RGB" and im.width > 2 * min(orig.size[0], FIGURE_MAX_SIDE) and im.height <= FIGURE_MAX_SIDE + 200
            assert im.width <= 2 * FIGURE_MAX_SIDE + 300  # two panels of at most 1024 px, colour bar, margins
    # the table shows where each heat map went (new folder: the figures above are not overwritten)
    res = cli("predict", "--heatmap", tmp_path / "t", fullres_dir)
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].split() == ["path", "probability", "label", "heatmap", "warn"]
    for ln in lines[1:]:
        cells = [c for c in ln.split() if c.endswith(".gradcam.png")]
        assert len(cells) == 1 and Path(cells[0]).is_file(), ln
    res = cli("predict", "--heatmap", tmp_path / "c", "--heatmap-style", "overlay", "--format", "csv", fullres_dir)
    assert res.code == 0, res.err
    for r in csv.DictReader(io.StringIO(res.out)):
        with Image.open(r["heatmap_file"]) as im, Image.open(r["path"]) as orig:
            assert im.size == orig.size


def test_page_colour_scale_matches_jet() -> None:
    html = (STATIC / "index.html").read_text()
    css = (STATIC / "style.css").read_text()
    assert 'id="heat-legend"' in html and "heat-legend-bar" in html and 'style="' not in html  # CSP: no inline styles
    block = css[css.index(".heat-legend-bar"):]
    stops = [(float(p) / 100, (int(r), int(g), int(b))) for r, g, b, p in
             re.findall(r"rgb\((\d+), (\d+), (\d+)\) ([\d.]+)%", block[: block.index("}")])]
    assert stops[0][0] == 0.0 and stops[-1][0] == 1.0
    v = np.linspace(0, 1, 501)
    xs = [s for s, _ in stops]
    grad = np.stack([np.interp(v, xs, [c[i] for _, c in stops]) for i in range(3)], axis=-1)
    assert np.abs(grad - jet(v) * 255).max() <= 1.0


# ----------------------------------------------------------------------------- 6. outputs a hospital can file
def test_dicom_identifiers_in_rows_without_patient_names(cli: Callable[..., CliResult]) -> None:
    dcm, jpg = _dicom_samples()[0], _jpeg_samples()[0]
    src = pydicom.dcmread(dcm, stop_before_pixels=True)
    res = cli("predict", "--format", "json", dcm, jpg)
    assert res.code == 0, res.err
    rows = _json_lines(res.out)
    assert all(r["schema_version"] == "1" for r in rows)
    for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ViewPosition"):
        assert rows[0][k] == str(src.get(k))
    assert not set(DICOM_IDS) & set(rows[1])
    assert str(src.PatientName) not in res.out and "PatientName" not in res.out
    res = cli("predict", "--format", "csv", dcm, jpg)
    assert res.code == 0, res.err
    got = list(csv.DictReader(io.StringIO(res.out)))
    assert set(DICOM_IDS) | {"dicom_output"} <= set(got[0])
    assert got[0]["SOPInstanceUID"] == str(src.SOPInstanceUID) and got[1]["SOPInstanceUID"] == ""
    assert str(src.PatientName) not in res.out


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # pydicom warns about the hostile values it writes
def test_dicom_identifiers_are_sanitised(fixtures_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(fixtures_dir / "dicom" / "mono2_8bit.dcm")
    ds.AccessionNumber = "A1\x1b[31m" + "9" * 10
    ds.ViewPosition = "PA"
    f = tmp_path / "hostile.dcm"
    ds.save_as(f)
    ds = pydicom.dcmread(f)
    ds["StudyInstanceUID"].value = "1.2." + "3" * 100 + "\n"
    ds.save_as(f)
    _, meta = read_image_with_meta(f)
    ids = meta["identifiers"]
    assert all(v.isprintable() and len(v) <= 64 for v in ids.values())
    assert ids["ViewPosition"] == "PA" and "\x1b" not in ids["AccessionNumber"]


def test_output_dicom_writes_a_secondary_capture_in_the_source_study(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    dcms, jpg = _dicom_samples(), _jpeg_samples()[0]
    out = tmp_path / "sc"
    res = cli("predict", "--output-dicom", out, "--format", "json", *dcms, jpg)
    assert res.code == 0, res.err
    rows = _json_lines(res.out)
    assert "dicom_output" not in rows[-1] and "heatmap_file" not in rows[0]  # no --heatmap: no PNG
    series = set()
    for row, dcm in zip(rows, dcms):
        f = Path(row["dicom_output"])
        assert f.parent == out and f.suffix == ".dcm"
        src = pydicom.dcmread(dcm, stop_before_pixels=True)
        sc = pydicom.dcmread(f)
        assert sc.file_meta.MediaStorageSOPClassUID == sc.SOPClassUID == SECONDARY_CAPTURE
        assert sc.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID != src.SOPInstanceUID
        assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
        assert sc.PatientID == src.PatientID and str(sc.PatientName) == str(src.PatientName)
        assert sc.Modality == "OT" and sc.SeriesDescription == "pneumoscan heatmap"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        arr = sc.pixel_array
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.shape == (sc.Rows, sc.Columns, 3) and arr.shape[1] > arr.shape[0]
        assert f"{row['probability']:.3f}" in sc.ImageComments and row["label"] in sc.ImageComments
        assert f"{row['threshold']:.3f}" in sc.ImageComments and row["model"] in sc.ImageComments
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        series.add(sc.SeriesInstanceUID)
    assert len(series) == len(dcms)  # the samples are two studies: one new series each
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.sc.dcm" for p in dcms)
    # a second run adds new instances, never overwrites
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    res = cli("predict", "--output-dicom", out, dcms[0])
    assert res.code == 0, res.err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in first} == first
    assert len(list(out.iterdir())) == len(first) + 1


def test_secondary_capture_writer_reads_back(tmp_path: Path) -> None:
    dcm = _dicom_samples()[0]
    rgb = heatmap_figure(read_image(dcm), _cam(), Caption(0.2, "NORMAL", 0.5, "m"))
    w = SecondaryCaptureWriter(tmp_path)
    a, b = w.write(dcm, rgb, "one"), w.write(dcm, rgb, "two")
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    assert a != b and da.SeriesInstanceUID == db.SeriesInstanceUID and (da.InstanceNumber, db.InstanceNumber) == (1, 2)
    assert np.array_equal(da.pixel_array, rgb) and da.ImageComments == "one"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
