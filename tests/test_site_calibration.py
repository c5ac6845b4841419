"""``pneumoscan calibrate --data DIR``: temperature and threshold refitted on a site's own
labelled images, before/after metrics with intervals, what it was calibrated on recorded in the
new bundle and its model card, the input never overwritten (issue 13, part 2)."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pneumoscan.core.calibration import sigmoid
from pneumoscan.core.metrics import threshold_metrics
from pneumoscan.data.datasets import load_samples
from pneumoscan.evaluation.recalibrate import files_fingerprint
from pneumoscan.models.bundle import default_manifest, load_bundle
from pneumoscan.utils.io import sha256_file


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def test_calibrate_on_site_images_writes_a_new_bundle(run: Path, xray_dir: Path, tmp_path: Path, cli: Any) -> None:
    before = load_bundle(run)
    new_file = tmp_path / "site.pt"
    r = cli("calibrate", "--checkpoint", run, "--data", xray_dir, "--split", "train", "--method", "sensitivity", "--target", "0.95",
            "--out", new_file, "--bootstrap", "200")
    assert r.code == 0, r.err
    assert load_bundle(run).sha256 == before.sha256  # the input is untouched
    new = load_bundle(new_file)
    assert (new.threshold, new.temperature) != (before.threshold, before.temperature)
    cal = new.provenance["calibration"]
    samples = load_samples(xray_dir, "train")
    d = cal["data"]
    assert d["n"] == len(samples) == 32 and d["n_per_class"] == {"NORMAL": 16, "PNEUMONIA": 16} and d["n_unreadable"] == 0
    assert d["sha256"] == files_fingerprint([s.path for s in samples]) and str(xray_dir) in d["description"] and d["split"] == "train"
    assert cal["method"] == "sensitivity" and cal["target_sensitivity"] == 0.95
    assert cal["previous"]["threshold"] == pytest.approx(before.threshold) and cal["previous"]["temperature"] == pytest.approx(before.temperature)
    # the new operating point is the site's: sensitivity >= 0.95 on these images, recomputed from what the bundle stores
    y, z = np.asarray(new.provenance["val_labels"]), np.asarray(new.provenance["val_logits"])
    assert y.size == 32 and new.provenance["val_logits_source"] == "site-calibration"
    assert threshold_metrics(y, sigmoid(z / new.temperature), new.threshold)["sensitivity"] >= 0.95
    assert new.val_metrics["n"] == 32
    # before/after with intervals on DIR, and the small-DIR warning (16 images per class < 30)
    assert re.search(r"^sensitivity\s+\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \(n=16\)\s+\d\.\d{3} \[", r.out, re.M), r.out
    assert "temperature" in r.out and f"written: {new_file}" in r.out
    assert "only 16 NORMAL image(s)" in r.err and "only 16 PNEUMONIA image(s)" in r.err and "fewer than 30" in r.err
    # its model card says what it was calibrated on; the run's own card is not touched
    card = (tmp_path / "site.MODEL_CARD.md").read_text()
    assert "Site calibration" in card and d["sha256"] in card and "`xray`" in card and str(xray_dir) not in card
    assert "Site calibration" not in (run / "MODEL_CARD.md").read_text()


def test_site_calibrated_model_serves_its_card(run: Path, xray_dir: Path, tmp_path: Path, cli: Any) -> None:
    from pneumoscan.inference import load_predictor
    from pneumoscan.serving.service import _identity, _model_card, operating_curve

    new_file = tmp_path / "site.pt"
    assert cli("calibrate", "--checkpoint", run, "--data", xray_dir, "--split", "val", "--out", new_file, "--bootstrap", "200").code == 0
    p = load_predictor(new_file, backend="torch")
    assert "Site calibration" in (_model_card(_identity(p)) or "")
    curve = operating_curve(p)
    assert curve is not None and curve["source"] == "site-calibration images" and curve["n"] == {"NORMAL": 4, "PNEUMONIA": 4}


def test_in_place_and_refusals(run: Path, xray_dir: Path, tmp_path: Path, cli: Any) -> None:
    before = sha256_file(run / "best.pt")
    for argv, needle in [
        (("--checkpoint", run, "--data", xray_dir, "--split", "val"), "--out NEW.pt, or --in-place"),
        (("--checkpoint", run, "--data", xray_dir, "--split", "val", "--out", run), "is the input checkpoint"),
        (("--checkpoint", run, "--data", xray_dir, "--split", "val", "--out", run / "best.pt"), "is the input checkpoint"),
        (("--data", xray_dir, "--split", "val", "--in-place"), "default model is never overwritten"),
        (("--checkpoint", run, "--data", tmp_path / "missing", "--out", tmp_path / "x.pt"), "not found"),
        (("--out", tmp_path / "x.pt"), "needs --checkpoint"),
    ]:
        r = cli("calibrate", *argv)
        assert r.code == 1 and len(r.err_lines) == 1 and needle in r.err and "Traceback" not in r.err, (argv, r.err)
    assert sha256_file(run / "best.pt") == before and not (tmp_path / "x.pt").exists()
    # one class only: no threshold can be chosen
    one = tmp_path / "one"
    shutil.copytree(xray_dir / "val" / "NORMAL", one / "NORMAL")
    (one / "PNEUMONIA").mkdir()
    r = cli("calibrate", "--checkpoint", run, "--data", one, "--out", tmp_path / "x.pt")
    assert r.code == 1 and "both classes" in r.err
    # --in-place rewrites the run's best.pt and its MODEL_CARD.md together
    r = cli("calibrate", "--checkpoint", run, "--data", xray_dir, "--split", "val", "--method", "youden", "--in-place", "--bootstrap", "200")
    assert r.code == 0, r.err
    new = load_bundle(run)
    assert new.sha256 != before and new.provenance["calibration"]["data"]["n"] == 8
    assert "Site calibration" in (run / "MODEL_CARD.md").read_text()


def test_refit_shift_on_site_images(run: Path, xray_dir: Path, tmp_path: Path, cli: Any) -> None:
    r = cli("calibrate", "--checkpoint", run, "--data", xray_dir, "--split", "train", "--refit-shift", "--keep-temperature",
            "--out", tmp_path / "site.pt", "--bootstrap", "200")
    assert r.code == 0, r.err
    new = load_bundle(tmp_path / "site.pt")
    shift = new.provenance["shift"]
    assert shift["layer"] == "backbone.4.2" and shift["stats"]["n_train"] + shift["stats"]["n_val"] == 32
    assert shift["stats"]["val_flag_rate"] <= 0.05 and "site calibration images of xray" == shift["stats"]["fitted_on"]
    assert new.temperature == pytest.approx(load_bundle(run).temperature) and new.provenance["calibration"]["refit_shift"] is True
    assert "shift detector refitted" in r.out


def test_refit_shift_on_the_runs_split(run: Path, tmp_path: Path, cli: Any) -> None:
    r = cli("calibrate", "--checkpoint", run, "--refit-shift", "--out", tmp_path / "new.pt")
    assert r.code == 0, r.err
    shift = load_bundle(tmp_path / "new.pt").provenance["shift"]
    assert shift["stats"]["n_val"] == len((run / "split_val.csv").read_text().strip().splitlines()) - 1
    assert "shift detector refitted" in r.out


@pytest.mark.skipif(not default_manifest().get("shift_file"), reason="the default model's shift.npz is not installed")
def test_default_model_site_calibration_keeps_its_detector(xray_dir: Path, tmp_path: Path, cli: Any) -> None:
    r = cli("calibrate", "--data", xray_dir, "--split", "val", "--out", tmp_path / "site.pt", "--bootstrap", "200")
    assert r.code == 0, r.err
    new = load_bundle(tmp_path / "site.pt")
    man = default_manifest()
    assert new.sha256 != man["sha256"] and new.name == man["name"]
    assert new.provenance["shift"]["layer"] == "backbone.features.18"  # the sidecar's detector now travels in the bundle
    assert hashlib.sha256((tmp_path / "site.pt").read_bytes()).hexdigest() == new.sha256
