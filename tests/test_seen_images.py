"""A model recognises the images it was trained and calibrated on, by content: content digests
in the bundle (``provenance["seen_images"]``), a warning on every answer about one of them in
``predict`` (table, JSON, Python API, ONNX path) and their count and list in ``evaluate``."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CliResult
from pneumoscan.core.fingerprint import pixel_digest
from pneumoscan.data.datasets import read_manifest
from pneumoscan.data.fingerprints import SeenImages, digest_file, fingerprint_files
from pneumoscan.data.io import read_image_with_meta
from pneumoscan.inference import load_predictor
from pneumoscan.models.bundle import load_bundle, save_bundle
from pneumoscan.models.seen import SEEN_KEY, record_seen_images, seen_images


def _png(src: Path, dest: Path) -> Path:
    """``src`` re-encoded losslessly as PNG (other bytes, same pixels)."""
    with Image.open(src) as im:
        im.save(dest, format="PNG")
    assert dest.read_bytes() != src.read_bytes()
    return dest


@pytest.fixture(scope="module")
def seen_split(tiny_run: Path) -> tuple[list[str], list[str]]:
    """The tiny run's training and validation (calibration) image paths."""
    return ([s.path for s in read_manifest(tiny_run / "split_train.csv")], [s.path for s in read_manifest(tiny_run / "split_val.csv")])


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory, seen_split: tuple[list[str], list[str]], xray_dir: Path) -> Path:
    """Labelled folders with a renamed copy of a training image, a PNG re-encode of a
    calibration image and two images the tiny run never saw (the official val split it ignores)."""
    train, val = seen_split
    root = tmp_path_factory.mktemp("mixed")
    for c in ("NORMAL", "PNEUMONIA"):
        (root / c).mkdir()
    t = Path(train[0])
    shutil.copyfile(t, root / t.parent.name / "renamed_copy.jpeg")
    v = Path(val[0])
    _png(v, root / v.parent.name / "reencoded.png")
    for c in ("NORMAL", "PNEUMONIA"):
        unseen = sorted((xray_dir / "val" / c).iterdir())[0]
        shutil.copyfile(unseen, root / c / f"unseen_{unseen.name}")
    return root


# ----------------------------------------------------------------------------- digests
def test_pixel_digest_survives_renaming_and_lossless_reencoding(fullres_dir: Path, tmp_path: Path) -> None:
    src = sorted(fullres_dir.glob("*.jpeg"))[0]
    full = digest_file(src)
    assert full.file is not None and full.pixels is not None
    for fmt in ("PNG", "BMP", "TIFF"):
        buf = io.BytesIO()
        with Image.open(src) as im:
            im.save(buf, format=fmt)
        # reduced on reading (max_side): the digest is still that of the full-resolution pixels
        _, meta = read_image_with_meta(buf.getvalue(), max_side=224, digest=True)
        assert meta["pixel_sha256"] == full.pixels.hex(), fmt
        assert meta["file_sha256"] != full.file.hex()
    # a JPEG decoded in draft mode has no full-resolution pixels: matched by its bytes only
    _, meta = read_image_with_meta(src, max_side=224, digest=True)
    assert meta["pixel_sha256"] is None and meta["file_sha256"] == full.file.hex()
    # one grey level changed anywhere: another digest
    arr, _ = read_image_with_meta(src)
    changed = arr.copy()
    changed[5, 7] = (round(changed[5, 7] * 255) ^ 1) / 255
    assert pixel_digest(arr) == full.pixels and pixel_digest(changed) != full.pixels


def test_record_round_trip_is_small_and_weights_only(tiny_run: Path, seen_split: tuple[list[str], list[str]], tmp_path: Path) -> None:
    b = load_bundle(tiny_run / "best.pt")  # torch.load(weights_only=True)
    rec = seen_images(b)
    train, val = seen_split
    assert rec is not None and rec.count("train") == len(train) and rec.count("calibration") == len(val)
    stored = b.provenance[SEEN_KEY]
    assert json.loads(json.dumps(stored)) == stored  # built-in types only (ONNX metadata, JSON)
    assert len(json.dumps(stored)) < 60 * (len(train) + len(val)) + 400  # ~44 base64 characters per image
    assert SeenImages.from_dict(rec.to_dict()) == rec
    assert SeenImages.from_dict({"format": "something else"}) is None


# ----------------------------------------------------------------------------- predict
def test_predict_api_flags_renamed_and_reencoded_training_images(tiny_run: Path, mixed_dir: Path) -> None:
    p = load_predictor(tiny_run, backend="torch", guard=False)
    files = sorted(mixed_dir.rglob("*.*"))
    by_name = {Path(pr.path).name: pr for pr in p.predict_paths(files)}
    assert by_name["renamed_copy.jpeg"].extra["seen_as"] == "train"
    assert by_name["reencoded.png"].extra["seen_as"] == "calibration"
    assert any("training image" in w for w in by_name["renamed_copy.jpeg"].warnings)
    assert any("calibration image" in w for w in by_name["reencoded.png"].warnings)
    unseen = [pr for n, pr in by_name.items() if n.startswith("unseen_")]
    assert len(unseen) == 2 and all("seen_as" not in pr.extra and not any("build this model" in w for w in pr.warnings) for pr in unseen)
    # one image at a time and decoded arrays: the same answer
    assert p.predict_image(mixed_dir.joinpath(*Path(by_name["reencoded.png"].path).parts[-2:])).extra["seen_as"] == "calibration"
    arr, _ = read_image_with_meta(by_name["reencoded.png"].path)
    assert p.predict_arrays([arr])[0].extra["seen_as"] == "calibration"


def test_cli_predict_counts_them_on_the_onnx_path(cli: Callable[..., CliResult], tiny_run: Path, mixed_dir: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    files = sorted(mixed_dir.rglob("*.*"))
    r = cli("predict", "--backend", "onnx", "--checkpoint", tiny_run, "--no-guard", "--format", "json", *files)
    assert r.code == 0, r.err
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # the record came through the export's metadata
    rows = {Path(d["path"]).name: d for d in map(json.loads, r.out.splitlines())}
    assert rows["renamed_copy.jpeg"]["seen_as"] == "train" and rows["reencoded.png"]["seen_as"] == "calibration"
    assert all("seen_as" not in d for n, d in rows.items() if n.startswith("unseen_"))
    assert "2 of 4 inputs were among this model's training/calibration images" in r.err
    t = cli("predict", "--backend", "onnx", "--checkpoint", tiny_run, "--no-guard", *files)
    assert t.code == 0 and "2 of 4 inputs were among" in t.err and "renamed_copy.jpeg" in t.err


def test_bundles_without_a_record_stay_silent(cli: Callable[..., CliResult], tiny_run: Path, mixed_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(tiny_run / "best.pt")
    old = b.replace(provenance={k: v for k, v in b.provenance.items() if k != SEEN_KEY})
    save_bundle(old, tmp_path / "old.pt")
    r = cli("predict", "--backend", "torch", "--checkpoint", tmp_path / "old.pt", "--no-guard", "--format", "json",
            *sorted(mixed_dir.rglob("*.*")))
    assert r.code == 0, r.err
    assert not any("seen_as" in json.loads(line) for line in r.out.splitlines()) and "training/calibration" not in r.err
    # and a record attached by hand (what shipping the default model does) brings the warnings back
    unseen = sorted((mixed_dir / "NORMAL").glob("unseen_*"))[0]
    again = record_seen_images(old, train=[unseen])
    save_bundle(again, tmp_path / "again.pt")
    r = cli("predict", "--backend", "torch", "--checkpoint", tmp_path / "again.pt", "--no-guard", "--format", "json",
            *sorted(mixed_dir.rglob("*.*")))
    flagged = [Path(d["path"]).name for d in map(json.loads, r.out.splitlines()) if d.get("seen_as")]
    assert len(flagged) == 1 and flagged[0].startswith("unseen_")


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_counts_and_lists_them(cli: Callable[..., CliResult], tiny_run: Path, mixed_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    r = cli("evaluate", "--data", mixed_dir, "--checkpoint", tiny_run, "--out", out, "--bootstrap", "200", "--no-summary", "--json")
    assert r.code == 0, r.err
    ov = json.loads(r.out)["training_overlap"]
    assert (ov["images"], ov["train"], ov["calibration"]) == (2, 1, 1)
    assert sorted(Path(f["path"]).name for f in ov["files"]) == ["reencoded.png", "renamed_copy.jpeg"]
    assert json.loads((out / "metrics.json").read_text())["training_overlap"]["images"] == 2
    assert "2 of 4 images of this data set were among this model's training/calibration images" in r.err
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "Images this model was trained or calibrated on" in text
        assert "renamed_copy.jpeg" in text and "reencoded.png" in text and "unseen_" not in text.split("trained or calibrated on")[1][:600]
    assert "Warning:" in md
    t = cli("evaluate", "--data", mixed_dir, "--checkpoint", tiny_run, "--out", tmp_path / "t", "--bootstrap", "200", "--no-summary")
    assert t.code == 0 and "warning: 2 of 4 images" in t.out


def test_evaluate_on_unseen_images_reports_no_overlap(cli: Callable[..., CliResult], tiny_run: Path, xray_dir: Path, tmp_path: Path) -> None:
    r = cli("evaluate", "--data", xray_dir, "--split", "val", "--checkpoint", tiny_run, "--out", tmp_path / "r", "--bootstrap", "200",
            "--no-summary", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["training_overlap"] == {"images": 0, "train": 0, "calibration": 0, "files": []}
    assert "Images this model was trained or calibrated on" not in (tmp_path / "r" / "report.md").read_text()


# ----------------------------------------------------------------------------- ensembles and site calibration
def test_site_calibration_and_ensembles_record_images(tiny_run: Path, xray_dir: Path, mixed_dir: Path, tmp_path: Path) -> None:
    from pneumoscan.evaluation.recalibrate import site_calibrate
    from pneumoscan.workflows.ensemble import combine

    b = load_bundle(tiny_run / "best.pt")
    site = site_calibrate(b, xray_dir, split="val", n_resamples=200).bundle
    rec = seen_images(site)
    site_digests = fingerprint_files(sorted((xray_dir / "val").rglob("*.jpeg")))
    assert rec is not None and all(rec.match(d) == "calibration" for d in site_digests)
    assert rec.count("train") == seen_images(b).count("train")  # type: ignore[union-attr]
    other = b.replace(state_dict={k: v + 0.01 if torch.is_floating_point(v) else v for k, v in b.state_dict.items()},
                      provenance={k: v for k, v in b.provenance.items() if k != SEEN_KEY})
    save_bundle(other, tmp_path / "other.pt")
    ens = combine([site, load_bundle(tmp_path / "other.pt")])
    ens_rec = seen_images(ens)
    assert ens_rec is not None and ens_rec == rec  # the union of the members' records
    assert np.isfinite(ens.temperature)


def test_service_answer_warns_through_the_decode_workers(tiny_run: Path, seen_split: tuple[list[str], list[str]], xray_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from pneumoscan.data.isolated import decode_isolated
    from pneumoscan.serving import create_app

    train, _ = seen_split
    png = io.BytesIO()
    with Image.open(train[0]) as im:
        im.save(png, format="PNG")
    arr, meta = decode_isolated(png.getvalue(), "x.png", digest=True)
    assert meta["pixel_sha256"] == digest_file(train[0]).pixels.hex()  # type: ignore[union-attr]
    unseen = sorted((xray_dir / "val" / "NORMAL").glob("*.jpeg"))[0]
    with TestClient(create_app(load_predictor(tiny_run, backend="torch")), base_url="http://127.0.0.1") as c:
        seen = c.post("/v1/predict", files={"file": ("upload.png", png.getvalue(), "image/png")}).json()
        other = c.post("/v1/predict", files={"file": ("a.jpeg", unseen.read_bytes(), "image/jpeg")}).json()
    assert seen["extra"]["seen_as"] == "train" and any("training image" in w for w in seen["warnings"])
    assert "seen_as" not in other["extra"] and not any("build this model" in w for w in other["warnings"])
