"""Issue 14, hardening round 2, on the command line and the Python API: no silent wrong answers
(heat-map names unique per input and never replacing a file silently; the API guarded and on
the CLI's backend; bad bundles refused in one line), output errors as one line per failed write
with the scored rows still printed and nothing half-written, and no injection through file
names or DICOM text (escaped tables and logs, CSV formulas neutralised, exact JSON).

Failures are real where the test runs as root: a folder under a file (ENOTDIR), sysfs (EACCES),
a file-size limit (EFBIG, ``RLIMIT_FSIZE``) and ``/dev/full`` (ENOSPC); a full disk in the heat
map folder is simulated in-process.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.cli.predict_outputs import csv_cell, heatmap_names
from pneumoscan.inference import load_predictor
from pneumoscan.models.bundle import load_bundle, save_bundle
from pneumoscan.utils.io import atomic_open, atomic_write_text, os_error_reason

if TYPE_CHECKING:
    from conftest import CliResult

REPO = Path(__file__).resolve().parents[1]
ESC = "\x1b"


# ----------------------------------------------------------------------------- helpers
def _xrays(xray_dir: Path, n: int) -> list[Path]:
    return sorted((xray_dir / "val").rglob("*.jpeg"))[:n]


def _json_rows(out: str) -> list[dict]:
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


def _run(*argv: object, cwd: Path | None = None, fsize: int | None = None, stdout: object = subprocess.PIPE) -> CliResult:
    """``python -m pneumoscan ARGS`` in a fresh interpreter, optionally under a file-size limit
    (writes past ``fsize`` bytes fail with EFBIG, also for root)."""
    from conftest import CliResult

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "pneumoscan", *[str(a) for a in argv]], stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.PIPE, text=True, timeout=300, env=env, cwd=str(cwd or REPO), preexec_fn=limit if fsize else None,
    )
    return CliResult(p.returncode, p.stdout or "", p.stderr)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith(".pneumoscan-probe"))


# ----------------------------------------------------------------------------- 5. silent wrong answers
def test_heatmap_names_are_unique_per_input_file() -> None:
    a, b = "/d1/x.jpeg", "/d2/x.jpeg"
    h = hashlib.sha256(os.fsencode(a)).hexdigest()[:8]
    crafted = f"/d3/x-{h}.jpeg"  # named like a's hashed name: must not take it
    names = heatmap_names([a, b, crafted, "/d1/./x.jpeg", "/d4/X.JPEG", "/d5/x-2.jpeg"])
    assert len(names) == 5  # /d1/./x.jpeg is /d1/x.jpeg: one file, one heat map
    assert len({n.casefold() for n in names.values()}) == 5  # unique even on case-insensitive file systems
    assert names[crafted] == f"x-{h}.gradcam.png" and names["/d5/x-2.jpeg"] == "x-2.gradcam.png"
    assert names[a].startswith(f"x-{h}-") and names[b] == f"x-{hashlib.sha256(os.fsencode(b)).hexdigest()[:8]}.gradcam.png"
    hostile = heatmap_names(["/d/evil\n\x1b[31m.jpeg", "/d/..hidden.png", "/d/" + "é" * 300 + ".png"])
    for n in hostile.values():
        assert n.isprintable() and not n.startswith(".") and "/" not in n and len(n.encode()) <= 140


def test_heatmaps_never_collide_and_never_replace_files_silently(cli: Callable[..., CliResult], tiny_run: Path,
                                                                 xray_dir: Path, tmp_path: Path) -> None:
    src = _xrays(xray_dir, 4)
    inputs = [tmp_path / "a" / "x.jpeg", tmp_path / "b" / "x.jpeg", tmp_path / "c" / "x-2.jpeg", tmp_path / "d" / "X.jpeg"]
    for s, d in zip(src, inputs):
        d.parent.mkdir()
        shutil.copy(s, d)
    out = tmp_path / "heat"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["predict", "--checkpoint", tiny_run, "--no-guard", "--heatmap", out, "--heatmap-style", "overlay", "--format", "json"]
    res = cli(*args, *inputs, tmp_path / "a" / "." / "x.jpeg")
    assert res.code == 0, res.err
    rows = _json_rows(res.out)
    files = [r["heatmap_file"] for r in rows]
    assert len(set(files[:4])) == 4 and files[4] == files[0]  # one per input file; the repeated file shares it
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", *(Path(f).name for f in files[:4])])
    assert (out / "notes.txt").read_text() == "mine"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the same run again: refused before any work, in one line, nothing touched
    res = cli(*args, *inputs)
    assert res.code == 1 and res.out == ""
    assert len(res.err_lines) == 1 and "4 heat map file(s) already there" in res.err and "--overwrite" in res.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces them, under the same names
    res = cli(*args, "--overwrite", *inputs)
    assert res.code == 0, res.err
    assert [r["heatmap_file"] for r in _json_rows(res.out)] == files[:4] and _leftovers(out) == []


def test_api_is_guarded_and_picks_the_cli_backend(cli: Callable[..., CliResult], tiny_run: Path, tmp_path: Path) -> None:
    from pneumoscan.workflows.guard_synth import encode, generate

    plot = tmp_path / "plot.png"
    plot.write_bytes(encode(generate("chart", 424_242)))
    predictor = load_predictor(tiny_run)
    pred = predictor.predict_image(plot)
    assert pred.refused and pred.probability is None and pred.label is None  # not NORMAL
    unguarded = load_predictor(tiny_run, guard=False).predict_image(plot)  # the explicit opt-out
    assert unguarded.refused is None and unguarded.label in ("NORMAL", "PNEUMONIA")
    res = cli("predict", "--checkpoint", tiny_run, "--format", "json", plot)
    assert res.code == 0 and _json_rows(res.out)[0]["refused"] == pred.refused
    expected = "onnx" if importlib.util.find_spec("onnxruntime") else "torch"  # as the CLI's "auto"
    assert predictor.backend == expected and f"backend {expected}" in res.err
    # heat maps still work on that backend (the PyTorch model is loaded lazily)
    xray = sorted((REPO / "tests" / "fixtures" / "fullres").glob("*.jpeg"))[0]
    assert predictor.predict_image(xray, guard=False, heatmap=True).heatmap is not None


def test_load_predictor_is_a_lazy_top_level_export_without_torch() -> None:
    code = (
        "import sys, pneumoscan\n"
        "from pneumoscan import load_predictor\n"
        "from pneumoscan.inference import load_predictor as inner\n"
        "assert load_predictor is inner and 'load_predictor' in pneumoscan.__all__ and 'load_predictor' in dir(pneumoscan)\n"
        "print('torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def _bad_bundles(tiny_run: Path) -> dict[str, tuple[dict, str]]:
    b = load_bundle(tiny_run)
    pre = b.preprocessing
    n = pre.in_channels
    return {
        "negative_temperature": ({"temperature": -1.0}, "temperature"),
        "nan_temperature": ({"temperature": math.nan}, "temperature"),
        "zero_threshold": ({"threshold": 0.0}, "threshold"),
        "threshold_above_one": ({"threshold": 1.5}, "threshold"),
        "swapped_class_names": ({"class_names": ("PNEUMONIA", "NORMAL")}, "class names"),
        "wrong_class_names": ({"class_names": ("NORMAL", "COVID")}, "class names"),
        "huge_input": ({"preprocessing": dataclasses.replace(pre, input_size=100_000)}, "input size"),
        "zero_std": ({"preprocessing": dataclasses.replace(pre, std=(0.0,) * n)}, "std"),
        "nan_mean": ({"preprocessing": dataclasses.replace(pre, mean=(math.nan,) * n)}, "mean"),
        "crop_resize": ({"preprocessing": dataclasses.replace(pre, resize="crop")}, "resize"),
    }


@pytest.mark.parametrize("case", [
    "negative_temperature", "nan_temperature", "zero_threshold", "threshold_above_one", "swapped_class_names",
    "wrong_class_names", "huge_input", "zero_std", "nan_mean", "crop_resize",
])
def test_bad_bundle_values_are_refused_in_one_line(case: str, cli: Callable[..., CliResult], tiny_run: Path,
                                                   fullres_dir: Path, tmp_path: Path) -> None:
    changes, words = _bad_bundles(tiny_run)[case]
    bad = tmp_path / "BAD.pt"
    save_bundle(load_bundle(tiny_run).replace(**changes), bad)
    res = cli("predict", "--checkpoint", bad, "--format", "json", fullres_dir)
    assert res.code == 1 and res.out == ""
    assert len(res.err_lines) == 1, res.err
    line = res.err_lines[0]
    assert line.startswith("error: ") and str(bad) in line and "refused" in line and words in line, line


def test_bundle_edited_as_a_dict_is_refused_in_one_line(cli: Callable[..., CliResult], tiny_run: Path,
                                                        fullres_dir: Path, tmp_path: Path) -> None:
    d = torch.load(tiny_run / "best.pt", weights_only=True)
    d["threshold"] = "0.5"  # a string where a number belongs
    bad = tmp_path / "BAD.pt"
    torch.save(d, bad)
    res = cli("predict", "--checkpoint", bad, fullres_dir)
    assert res.code == 1 and res.out == "" and len(res.err_lines) == 1 and str(bad) in res.err and "Traceback" not in res.err


# ----------------------------------------------------------------------------- 6. output errors
def test_unwritable_heatmap_folder_is_one_line_before_any_work(cli: Callable[..., CliResult], tiny_run: Path,
                                                               fullres_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    res = cli("predict", "--checkpoint", tiny_run, "--heatmap", blocker / "sub", fullres_dir)
    assert res.code == 1 and res.out == "" and len(res.err_lines) == 1, res.err
    assert "cannot write there (not a directory)" in res.err and "internal error" not in res.err
    try:  # sysfs refuses new files, even to root
        fd, probe = tempfile.mkstemp(dir="/sys")
    except PermissionError:
        res = cli("predict", "--checkpoint", tiny_run, "--heatmap", "/sys", fullres_dir)
        assert res.code == 1 and res.out == "" and res.err_lines == ["error: --heatmap /sys: cannot write there (permission denied)"]
    except OSError:
        pass
    else:  # pragma: no cover - not Linux sysfs
        os.close(fd)
        os.unlink(probe)


def test_full_disk_mid_run_keeps_the_rows_and_names_each_failed_write(cli: Callable[..., CliResult], tiny_run: Path,
                                                                      xray_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pneumoscan.utils.io as uio

    images = _xrays(xray_dir, 3)
    out = tmp_path / "heat"

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(uio.os, "fsync", full)
    res = cli("predict", "--checkpoint", tiny_run, "--backend", "torch", "--no-guard", "--heatmap", out, "--format", "json", *images)
    monkeypatch.undo()
    assert res.code == 1
    rows = _json_rows(res.out)
    assert [r["path"] for r in rows] == [str(p) for p in images]  # every image scored is printed
    assert all(0 < r["probability"] < 1 and "heatmap_file" not in r for r in rows)
    failed = [ln for ln in res.err_lines if "heat map not written" in ln]
    assert len(failed) == 3 and all(ln.startswith(f"error: heat map not written: {out}/") for ln in failed)
    assert all(ln.endswith(".gradcam.png: no space left on device") for ln in failed)
    assert "3 heat map(s) could not be written" in res.err and "internal error" not in res.err
    assert list(out.iterdir()) == []  # nothing half-written


def test_file_size_limit_in_a_fresh_interpreter(tiny_run: Path, fullres_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "heat"
    res = _run("predict", "--checkpoint", tiny_run, "--backend", "torch", "--no-guard", "--heatmap", out, "--format", "csv",
               fullres_dir, fsize=20_000)  # the full-resolution heat maps are larger
    assert res.code == 1, res.err
    rows = list(csv.DictReader(io.StringIO(res.out)))
    assert len(rows) == 2 and all(r["status"] == "ok" and r["heatmap_file"] == "" for r in rows)
    failed = [ln for ln in res.err_lines if "heat map not written" in ln]
    assert len(failed) == 2 and all(ln.endswith("file too large") for ln in failed), res.err
    assert "Traceback" not in res.err and "internal error" not in res.err
    assert list(out.iterdir()) == []


def test_evaluate_output_error_is_one_line_and_nothing_half_written(tiny_run: Path, xray_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = _run("-q", "evaluate", "--checkpoint", tiny_run, "--data", xray_dir / "val", "--out", out, "--bootstrap", "100",
               "--no-summary", fsize=100_000)
    assert res.code == 1
    errors = [ln for ln in res.err_lines if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}/") and errors[0].endswith(": file too large"), res.err
    assert "internal error" not in res.err and "Traceback" not in res.err and "inline_container" not in res.err
    assert _leftovers(out) == []
    for f in out.iterdir():  # what was written is whole
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".png":
            with Image.open(f) as im:
                im.load()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_standard_output_is_one_line(tiny_run: Path, fullres_dir: Path) -> None:
    for fmt in ("json", "csv", "table"):
        with open("/dev/full", "w") as full:
            res = _run("-q", "predict", "--checkpoint", tiny_run, "--no-guard", "--format", fmt, fullres_dir, stdout=full)
        assert res.code == 1
        assert res.err_lines == ["error: <standard output>: no space left on device"], res.err


def test_atomic_writes_name_the_destination_and_can_refuse_to_replace(tmp_path: Path) -> None:
    f = tmp_path / "report.md"
    atomic_write_text(f, "old\n")
    with pytest.raises(FileExistsError) as info:
        with atomic_open(f, "w", overwrite=False) as fh:
            fh.write("new\n")
    assert f.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert os_error_reason(info.value) == f"{f}: file exists"
    with atomic_open(tmp_path / "new.md", "w", overwrite=False) as fh:
        fh.write("x")
    assert (tmp_path / "new.md").read_text() == "x"
    with pytest.raises(NotADirectoryError) as nd:
        atomic_write_text(f / "sub" / "x.json", "{}")
    assert os_error_reason(nd.value).endswith(": not a directory")


def test_decode_timeout_gives_an_error_row_per_file(cli: Callable[..., CliResult], tiny_run: Path, fullres_dir: Path) -> None:
    res = cli("predict", "--checkpoint", tiny_run, "--decode-timeout", "0.001", "--format", "json", fullres_dir)
    assert res.code == 1
    rows = _json_rows(res.out)
    assert len(rows) == 2 and all(r["probability"] is None and "took longer than 0.001 s" in r["error"] for r in rows)
    with pytest.raises(SystemExit) as usage:
        cli("predict", "--checkpoint", tiny_run, "--decode-timeout", "-1", fullres_dir)
    assert usage.value.code == 2


# ----------------------------------------------------------------------------- 7. injection
HOSTILE_NAMES = [
    "evil\nINJECTED ROW\x1b[31mred\x1b]0;title\x07.jpeg", "=HYPERLINK(\"http:x\",\"y\").jpeg", "+1.jpeg", "-2.jpeg",
    "@SUM(1).jpeg", "\tTAB.jpeg", "plain.jpeg",
]


def _dicom_with_hostile_tags(src: Path, dest: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    with warnings.catch_warnings():  # pydicom warns: these are not valid code strings (the point)
        warnings.simplefilter("ignore", UserWarning)
        ds.Modality, ds.BodyPartExamined = "CT\x1b[2J\nFAKE", "HAND\x1b[31m"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = grey.tobytes()
    ds.save_as(dest, enforce_file_format=True)
    return dest


@pytest.fixture
def hostile_dir(tmp_path: Path, xray_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    d = tmp_path / "in"
    d.mkdir()
    src = _xrays(xray_dir, 1)[0]
    for name in HOSTILE_NAMES:
        shutil.copy(src, d / name)
    _dicom_with_hostile_tags(src, d / "ct.dcm")
    monkeypatch.chdir(d)  # relative names: a cell starts with the file name
    return d, [*HOSTILE_NAMES, "ct.dcm", "gone\x1b[2J.jpeg"]


def test_table_and_logs_escape_names_and_dicom_text(cli: Callable[..., CliResult], tiny_run: Path,
                                                    hostile_dir: tuple[Path, list[str]]) -> None:
    _, names = hostile_dir
    res = cli("predict", "--checkpoint", tiny_run, "--", *names)
    assert res.code == 1  # the missing file
    assert ESC not in res.out and ESC not in res.err and "\x07" not in res.out + res.err
    lines = res.out.splitlines()
    assert len(lines) == 1 + len(names)  # one row per input: a newline in a name starts no row
    assert not any(ln.startswith("INJECTED") for ln in lines + res.err.splitlines())
    assert "evil\\x0aINJECTED ROW\\x1b[31mred" in res.out and "gone\\x1b[2J.jpeg" in res.out
    dcm = next(ln for ln in lines if ln.startswith("ct.dcm"))
    assert "REFUSED" in dcm and "\\x1b[2j" in dcm.lower()  # the DICOM modality, quoted in the reason
    res = cli("predict", "--checkpoint", tiny_run, "--format", "json", "gone\x1b[2J.jpeg")
    assert ESC not in res.err and "\ngone\\x1b[2J.jpeg: " in res.err  # the log line of a failed file


def test_csv_neutralises_formulas_and_escapes_control_characters(cli: Callable[..., CliResult], tiny_run: Path,
                                                                 hostile_dir: tuple[Path, list[str]]) -> None:
    _, names = hostile_dir
    res = cli("predict", "--checkpoint", tiny_run, "--format", "csv", "--", *names)
    assert ESC not in res.out and "\r" not in res.out
    rows = list(csv.DictReader(io.StringIO(res.out)))
    assert len(rows) == len(names)
    paths = [r["path"] for r in rows]
    assert paths[1:6] == ["'=HYPERLINK(\"http:x\",\"y\").jpeg", "'+1.jpeg", "'-2.jpeg", "'@SUM(1).jpeg", "\\x09TAB.jpeg"]
    assert paths[0].startswith("evil\\x0aINJECTED ROW\\x1b[31mred") and paths[6] == "plain.jpeg"
    for r in rows:
        for v in r.values():
            assert v[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert "\\x1b" in rows[7]["reason"].lower()  # the DICOM's modality, quoted in the refusal, escaped
    assert csv_cell("-0.5") == "'-0.5" and csv_cell(None) == "" and csv_cell("ok") == "ok"


def test_json_keeps_names_exact(cli: Callable[..., CliResult], tiny_run: Path, hostile_dir: tuple[Path, list[str]]) -> None:
    _, names = hostile_dir
    res = cli("predict", "--checkpoint", tiny_run, "--format", "json", "--", *names)
    assert ESC not in res.out  # JSON escapes control characters itself
    assert [r["path"] for r in _json_rows(res.out)] == names  # exact, newline and escape codes included
