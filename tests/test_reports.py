"""``pneumoscan evaluate``, ``calibrate``, ``compare`` and ``reproduce`` end to end on real
fixture images with a tiny seed_cnn trained in the session (``tiny_run`` in conftest)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, CliResult, run_cli_in_process
from pneumoscan.core.metrics import METRIC_KEYS
from pneumoscan.models.bundle import load_bundle

CHROMIUM = Path("/usr/bin/chromium")
PLOT_FILES = ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "errors.png", "training_curves.png")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, xray_dir: Path) -> Path:
    """``pneumoscan evaluate`` of the tiny run on the 8 labelled fixture validation images."""
    out = tmp_path_factory.mktemp("report") / "eval"
    code = run_cli_in_process(["-q", "evaluate", "--data", xray_dir / "val", "--checkpoint", tiny_run, "--out", out,
                               "--bootstrap", "1000"])
    assert code == 0
    return out


def _one_error_line(r: CliResult) -> None:
    assert r.code == 1
    assert "Traceback" not in r.err
    errors = [ln for ln in r.err_lines if ln.startswith("error:")]
    assert len(errors) == 1, r.err


# --------------------------------------------------------------------------- evaluate
def test_evaluate_writes_every_report_file(report_dir: Path) -> None:
    for name in ("metrics.json", "predictions.csv", "report.html", "report.md", *PLOT_FILES):
        f = report_dir / name
        assert f.is_file() and f.stat().st_size > 0, name
    for name in PLOT_FILES:
        with Image.open(report_dir / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert not list(report_dir.glob(".*"))  # no temporary files left behind


def test_metrics_json_has_the_documented_keys(report_dir: Path, tiny_run: Path) -> None:
    m = json.loads((report_dir / "metrics.json").read_text())
    b = load_bundle(tiny_run)
    assert m["model"] == b.name and m["temperature"] == pytest.approx(b.temperature)
    assert m["threshold"] == pytest.approx(b.threshold) and m["sha256"] == b.sha256
    assert m["bootstrap"]["resamples"] >= 1000
    for section, thr in (("at_operating_threshold", b.threshold), ("at_0.5", 0.5)):
        s = m[section]
        assert s["threshold"] == pytest.approx(thr)
        assert s["n"] == 8 and s["n_per_class"] == {"NORMAL": 4, "PNEUMONIA": 4}
        for k in METRIC_KEYS:
            assert set(s[k]) == {"value", "ci95", "n", "ci_method"} and len(s[k]["ci95"]) == 2, k
        assert s["roc_auc"]["value"] is not None and 0 <= s["roc_auc"]["value"] <= 1
        cm = s["confusion_matrix"]["value"]
        assert sum(cm[0]) == 4 and sum(cm[1]) == 4
    val = m["calibration"]["validation"]
    assert val["n"] == len(b.provenance["val_logits"]) and val["ece_before"] is not None and val["ece_after"] is not None


def test_predictions_agree_with_the_predictor_and_the_metrics(report_dir: Path, tiny_run: Path, xray_dir: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from pneumoscan.inference import load_predictor

    rows = list(csv.DictReader((report_dir / "predictions.csv").open()))
    assert [k for k in rows[0]] == ["path", "true_label", "probability", "predicted_label", "error", "shift_score", "warnings"]
    assert len(rows) == 8
    pred = load_predictor(tiny_run, backend="torch", guard=False)  # as evaluate predicts: every image, PyTorch
    direct = {p.path: p for p in pred.predict_paths([r["path"] for r in rows])}
    for r in rows:
        assert float(r["probability"]) == pytest.approx(direct[r["path"]].probability, abs=1e-6)
        assert r["predicted_label"] == direct[r["path"]].label
        assert r["true_label"] == Path(r["path"]).parent.name
    m = json.loads((report_dir / "metrics.json").read_text())["at_operating_threshold"]
    y = np.array([r["true_label"] == "PNEUMONIA" for r in rows], dtype=int)
    p = np.array([float(r["probability"]) for r in rows])
    correct = np.mean([(r["predicted_label"] == r["true_label"]) for r in rows])
    assert m["accuracy"]["value"] == pytest.approx(correct)
    assert m["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)


def test_report_html_is_self_contained(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    srcs = re.findall(r"src=['\"]([^'\"]+)['\"]", page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    for heading in ("Metrics", "Calibration", "Most confident errors", "Training", "Data summary", "Model", "Training configuration"):
        assert f">{heading}<" in page, heading
    md = (report_dir / "report.md").read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (report_dir / name).is_file()
    assert "| ROC-AUC |" in md and "Data summary" in md


@pytest.mark.browser
def test_report_renders_in_a_headless_browser(report_dir: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    shot = tmp_path / "out.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}",
           "--window-size=1200,1600", f"--screenshot={shot}", (report_dir / "report.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert shot.is_file()
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.int16)
    grey = a.mean(2)
    assert grey.std() > 10  # not a blank page
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 200  # text, tables and embedded plots
    assert (grey < 100).mean() > 0.005  # dark text/plot pixels present


def test_evaluate_accepts_a_csv_manifest(tiny_run: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    r = cli("evaluate", "--data", tiny_run / "split_val.csv", "--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "r",
            "--bootstrap", "1000", "--no-summary", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    n_val = sum(1 for _ in open(tiny_run / "split_val.csv")) - 1
    assert out["at_operating_threshold"]["n"] == n_val
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    # the run's own validation split: no training image, but every one fixed the operating point
    ov = m["training_overlap"]
    assert (ov["images"], ov["train"], ov["calibration"]) == (n_val, 0, n_val) and len(ov["files"]) == n_val


def test_evaluate_warns_when_the_data_were_trained_on(tiny_run: Path, xray_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    r = cli("evaluate", "--data", xray_dir, "--split", "train", "--checkpoint", tiny_run, "--out", tmp_path / "r",
            "--bootstrap", "1000", "--no-summary")
    assert r.code == 0, r.err
    assert "were among this model's training/calibration images" in r.err
    assert "Warning:" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("args", [
    ["--data", "/nonexistent/data"],
    ["--data", "{xray}", "--split", "nosuchsplit"],
    ["--data", "{xray}/val", "--checkpoint", "/nonexistent/best.pt"],
    ["--data", "{xray}/val", "--checkpoint", "{garbage}"],
])
def test_evaluate_bad_input_is_one_line(args: list[str], tiny_run: Path, xray_dir: Path, tmp_path: Path,
                                         cli: Callable[..., CliResult]) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    args = [a.format(xray=xray_dir, garbage=garbage) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(tiny_run)]
    _one_error_line(cli("evaluate", *args, "--out", tmp_path / "r"))


def test_evaluate_without_checkpoint_uses_the_default_model(xray_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    from pneumoscan.errors import CheckpointError
    from pneumoscan.models.bundle import default_manifest

    r = cli("evaluate", "--data", xray_dir / "val", "--out", tmp_path / "r", "--bootstrap", "1000", "--no-summary", "--json")
    try:
        man = default_manifest()
    except CheckpointError:
        _one_error_line(r)
        assert "default model" in r.err
        return
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["model"] == man["name"] and m["at_operating_threshold"]["n"] == 8


# --------------------------------------------------------------------------- model card
def test_training_writes_a_model_card(tiny_run: Path) -> None:
    card = (tiny_run / "MODEL_CARD.md").read_text()
    b = load_bundle(tiny_run)
    # the data facts come from the data folder (the fixtures have no README: unknown), see test_report_round2.py
    for needle in ("## Intended use", "not a diagnostic device", "## Training data", "unknown — supply --data-card",
                   "## Validation metrics", "95% confidence intervals", "## Operating point", "## Calibration",
                   "## Known limitations", "Population and site", "specificity", f"{b.threshold:.4f}", f"T = {b.temperature:.3f}", b.sha256):
        assert needle.lower() in card.lower(), needle
    assert re.search(r"\| ROC-AUC \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]( \(n=\d+\))? \|", card)


# --------------------------------------------------------------------------- calibrate
def test_calibrate_rederives_the_operating_point(tiny_run: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    from pneumoscan.core.calibration import sigmoid
    from pneumoscan.core.metrics import threshold_metrics

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = load_bundle(run)
    r = cli("calibrate", "--checkpoint", run, "--method", "sensitivity", "--target", "0.95", "--out", tmp_path / "new.pt")
    assert r.code == 0, r.err
    assert "written:" in r.out
    new = load_bundle(tmp_path / "new.pt")
    assert new.threshold_method == "sensitivity" and new.provenance["calibration"]["target_sensitivity"] == 0.95
    assert new.name == before.name and new.state_dict.keys() == before.state_dict.keys()
    y = np.asarray(new.provenance["val_labels"])
    p = sigmoid(np.asarray(new.provenance["val_logits"]) / new.temperature)
    assert threshold_metrics(y, p, new.threshold)["sensitivity"] >= 0.95
    assert load_bundle(run).sha256 == before.sha256  # --out leaves the source alone
    # in place: best.pt and the model card change together
    r = cli("calibrate", "--checkpoint", run, "--method", "sensitivity", "--target", "0.95", "--in-place")
    assert r.code == 0, r.err
    assert load_bundle(run).threshold == pytest.approx(new.threshold)
    assert f"{new.threshold:.4f}" in (run / "MODEL_CARD.md").read_text()


def test_calibrate_bad_input(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    _one_error_line(cli("calibrate", "--checkpoint", tmp_path / "missing.pt"))


# --------------------------------------------------------------------------- compare
def test_compare_two_models(tiny_run: Path, xray_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    other = tmp_path / "f1.pt"
    assert cli("calibrate", "--checkpoint", tiny_run, "--method", "f1", "--out", other).code == 0
    out = tmp_path / "cmp"
    r = cli("compare", tiny_run, other, "--data", xray_dir, "--split", "val", "--out", out, "--bootstrap", "1000")
    assert r.code == 0, r.err
    for name in ("compare.json", "compare.md", "compare.html", "roc_overlay.png", "pr_overlay.png", "auc.png"):
        assert (out / name).is_file(), name
    c = json.loads((out / "compare.json").read_text())
    assert c["n"] == 8 and len(c["models"]) == 2 and len(c["pairs"]) == 1
    for m in c["models"]:
        assert m["trainable_parameters"] == 2_524_033
        assert m["training"]["seconds_per_epoch"] > 0 and m["inference"]["images_per_s"] > 0
        assert set(METRIC_KEYS) <= set(m["at_operating_threshold"])
    pair = c["pairs"][0]
    # same network, different threshold: identical scores, so no AUC difference
    assert pair["delong"]["diff"] == 0 and pair["delong"]["p_value"] == 1.0 and pair["bootstrap"]["p_value"] == 1.0
    assert "DeLong" in (out / "compare.md").read_text()
    assert all(s.startswith("data:image/png") for s in re.findall(r"src='([^']+)'", (out / "compare.html").read_text()))


def test_compare_bad_input(xray_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    _one_error_line(cli("compare", tmp_path / "nope", "--data", xray_dir, "--split", "val", "--out", tmp_path / "c"))


# --------------------------------------------------------------------------- reproduce
@pytest.mark.slow
def test_reproduce_trains_compares_on_validation_and_skips_missing_weights(xray_dir: Path, tmp_path: Path) -> None:
    """seed_cnn trains; vgg16's ImageNet weights are made unreachable (empty TORCH_HOME and a
    dead proxy), so it is skipped with a clear message and the study continues."""
    out = tmp_path / "study"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "", "no_proxy": "", "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-m", "pneumoscan", "reproduce", "--data", str(xray_dir), "--out", str(out),
                        "--models", "seed_cnn,vgg16", "--epochs", "1", "--no-progress", "--bootstrap", "1000"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "vgg16: skipped" in p.stderr and "weights import" in p.stderr
    res = json.loads((out / "reproduce.json").read_text())
    assert res["models"]["seed_cnn"]["status"] == "trained" and res["models"]["vgg16"]["status"] == "skipped"
    assert (out / "seed_cnn" / "MODEL_CARD.md").is_file()
    c = json.loads((out / "compare" / "compare.json").read_text())
    val = {r["path"] for r in csv.DictReader(open(out / "seed_cnn" / "split_val.csv"))}
    compared = {r["path"] for r in csv.DictReader(open(out / "compare" / "val_split.csv"))}
    train = {r["path"] for r in csv.DictReader(open(out / "seed_cnn" / "split_train.csv"))}
    assert compared == val and not compared & train and c["n"] == len(val)
    assert all("/val/" not in s for s in compared)  # carved from train, not the official val/test folders
