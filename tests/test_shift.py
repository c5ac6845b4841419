"""The distribution-shift check (issue 13): the detector on pooled features, its threshold
(at most 5 % of a fitted run's validation images flagged), higher scores for heavily perturbed
chest films, and the ``warnings`` of every answer (Python API, ``predict`` JSON/CSV/table, the
service's JSON and ``/v1/model``)."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pneumoscan.data.datasets import read_manifest
from pneumoscan.data.io import read_image
from pneumoscan.errors import CheckpointError, DataError, ModelError
from pneumoscan.inference import Predictor, load_predictor
from pneumoscan.inference.features import forward_files, pool_features
from pneumoscan.inference.shift import MAX_FLAG_RATE, ShiftDetector, fit_shift_detector, ledoit_wolf, read_npz, shift_detector
from pneumoscan.models.bundle import DEFAULT_MANIFEST, default_manifest, default_model_dir, load_bundle, save_bundle

SAMPLES = default_model_dir().parent / "samples"
HAS_SIDECAR = (default_model_dir() / DEFAULT_MANIFEST).is_file() and bool(default_manifest().get("shift_file"))
needs_sidecar = pytest.mark.skipif(not HAS_SIDECAR, reason="the default model's shift.npz is not installed")


def _gaussian(n: int, c: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.linspace(3.0, 0.2, c)
    return rng.normal(size=(n, c)) * scale + 1.0


def _blurred(img: np.ndarray) -> np.ndarray:
    """A strongly blurred copy (Gaussian, sigma 8 px at 224)."""
    im = Image.fromarray((img * 255).astype(np.uint8)).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(8))
    return np.asarray(im, np.float32) / 255.0


def _jpeg(img: np.ndarray, path: Path) -> Path:
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=95)
    return path


# ----------------------------------------------------------------------------- the detector on features
def test_fit_and_score_on_features() -> None:
    train, val = _gaussian(400), _gaussian(200, seed=1)
    det = fit_shift_detector(train, val, layer="backbone.x", population="test images", n_components=6)
    assert det.components.shape == (6, 12) and det.precision.shape == (6, 6)
    assert det.stats["n_train"] == 400 and det.stats["n_val"] == 200 and det.stats["components"] == 6
    s_val = det.score(val)
    assert np.mean(s_val > det.threshold) == pytest.approx(det.stats["val_flag_rate"]) and det.stats["val_flag_rate"] <= MAX_FLAG_RATE
    far = val + 25.0 * np.linspace(1, 0, 12)  # moved along the main directions
    assert np.all(det.score(far) > det.threshold)
    w = det.warning(float(det.score(far)[0]))
    assert w and "validated on test images" in w and f"> {det.threshold:.1f}" in w
    assert det.warning(float(np.median(s_val))) is None
    # JSON (provenance) and npz (sidecar) round trips give the same scores
    again = ShiftDetector.from_dict(json.loads(json.dumps(det.to_dict())))
    np.testing.assert_allclose(again.score(val), s_val, rtol=1e-6)
    loaded, extra = read_npz(det.to_npz({"val_logits": np.arange(3.0)}), "x.npz")
    np.testing.assert_allclose(loaded.score(val), s_val, rtol=1e-6)
    assert loaded.threshold == det.threshold and extra["val_logits"].tolist() == [0.0, 1.0, 2.0]


def test_threshold_falls_back_to_the_validation_percentile() -> None:
    """Validation images farther out than training (the usual case: training is in-sample)
    move the threshold up to the validation 95th percentile: at most 5 % flagged."""
    train, val = _gaussian(300), _gaussian(100, seed=2) * 1.6
    det = fit_shift_detector(train, val, layer="x", n_components=8)
    assert det.stats["rule"] == "val-p95" and det.stats["val_flag_rate"] <= MAX_FLAG_RATE
    assert det.stats["train_flag_rate"] < 0.01


def test_ledoit_wolf_and_pooling() -> None:
    x = _gaussian(50, c=5)
    x -= x.mean(0)
    cov, a = ledoit_wolf(x)
    emp = x.T @ x / len(x)
    assert 0.0 <= a <= 1.0 and np.allclose(cov, (1 - a) * emp + a * np.trace(emp) / 5 * np.eye(5))
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    maps = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.testing.assert_allclose(pool_features(maps), maps.mean(axis=(2, 3)))


def test_bad_detectors_are_refused() -> None:
    det = fit_shift_detector(_gaussian(50), _gaussian(20, seed=1), layer="x", n_components=4)
    d = det.to_dict()
    with pytest.raises(CheckpointError, match="malformed shift detector"):
        ShiftDetector.from_dict({**d, "precision": [[1.0]]})
    with pytest.raises(CheckpointError, match="malformed shift detector"):
        ShiftDetector.from_dict({k: v for k, v in d.items() if k != "mean"})
    with pytest.raises(CheckpointError):
        read_npz(b"not an npz", "x.npz")
    with pytest.raises(ModelError, match="expects 12 features"):
        det.score(np.zeros((1, 5)))
    with pytest.raises(DataError):
        fit_shift_detector(_gaussian(2), _gaussian(2), layer="x")


# ----------------------------------------------------------------------------- a fitted run
@pytest.fixture(scope="module")
def fitted_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny run whose best.pt carries a detector fitted on its split."""
    from pneumoscan.workflows.shift_fit import refit_bundle

    run = tmp_path_factory.mktemp("shift") / "run"
    shutil.copytree(tiny_run, run)
    save_bundle(refit_bundle(load_bundle(run)), run / "best.pt")
    return run


def test_fitted_run_flags_at_most_five_percent_of_its_validation(fitted_run: Path) -> None:
    bundle = load_bundle(fitted_run)
    det = shift_detector(bundle)
    assert det is not None and det.layer == "backbone.4.2"
    val = read_manifest(fitted_run / "split_val.csv")
    assert det.stats["n_val"] == len(val) and det.stats["n_train"] == len(read_manifest(fitted_run / "split_train.csv"))
    p = load_predictor(fitted_run, backend="torch", guard=False)
    assert p.shift is not None and p.shift.detector.threshold == det.threshold
    fs = forward_files(p, [s.path for s in val], det.layer)
    rate = float(np.mean(det.score(fs.features) > det.threshold))
    assert rate <= MAX_FLAG_RATE and rate == pytest.approx(det.stats["val_flag_rate"])
    # every answer carries a score and a (possibly empty) list of warnings; the logits are the runner's
    preds = list(p.predict_paths([s.path for s in val]))
    assert all(isinstance(x.warnings, list) and "shift_score" in x.extra for x in preds)
    np.testing.assert_allclose(p.calibrate(fs.logits), [x.probability for x in preds], rtol=1e-5)


def test_onnx_export_without_feature_maps_gives_no_score(fitted_run: Path, tmp_path: Path) -> None:
    """seed_cnn's head is not a pooled linear unit: its export has no ``features`` output, so the
    ONNX backend answers without a shift score, and without a warning about it."""
    p = load_predictor(fitted_run, backend="onnx", guard=False, cache=tmp_path)
    assert p.shift is None
    pred = p.predict_image(sorted(SAMPLES.glob("*.jpeg"))[0])
    assert pred.warnings == [] and "shift_score" not in pred.extra and 0 < pred.probability < 1


# ----------------------------------------------------------------------------- the shipped default model
@pytest.fixture(scope="module")
def default_predictor() -> Predictor:
    return load_predictor(None, guard=False)


@needs_sidecar
def test_default_sidecar_is_verified_and_within_five_percent(default_predictor: Predictor) -> None:
    man = default_manifest()
    assert default_predictor.shift is not None, "the shipped ONNX export has feature maps: the check runs without PyTorch"
    det = default_predictor.shift.detector
    assert det.layer == "backbone.features.18" and det.n_features == 1280
    assert det.stats["n_val"] == 1044 and det.stats["val_flag_rate"] <= MAX_FLAG_RATE  # fold 1 of the default's cross-validation
    assert "paediatric" in det.population
    from pneumoscan.utils.io import sha256_file

    assert sha256_file(default_model_dir() / man["shift_file"]) == man["shift_sha256"]


@needs_sidecar
def test_default_sidecar_with_a_bad_checksum_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscan.inference import shift as shift_mod
    from pneumoscan.models import bundle as dm

    copy = tmp_path / "default"
    shutil.copytree(default_model_dir(), copy)
    f = copy / default_manifest()["shift_file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(dm, "default_model_dir", lambda: copy)
    monkeypatch.setattr(shift_mod, "_sidecar_cache", {})
    with pytest.raises(CheckpointError, match="checksum"):
        load_predictor(None, guard=False)


@needs_sidecar
def test_perturbed_films_score_higher_and_are_flagged(default_predictor: Predictor) -> None:
    films = [read_image(f, max_side=224) for f in sorted(SAMPLES.glob("*.jpeg"))]
    inverted = [1.0 - f for f in films]
    blurred = [_blurred(f) for f in films]
    preds = default_predictor.predict_arrays(films + inverted + blurred, guard=False)
    scores = np.array([p.extra["shift_score"] for p in preds]).reshape(3, -1)
    assert np.all(scores[1] > scores[0]) and np.all(scores[2] > scores[0]), scores
    originals, _, blurry = (preds[i * len(films):(i + 1) * len(films)] for i in range(3))
    # about 2 % of the model's own validation images score above the threshold: originals mostly do not
    assert sum(bool(p.warnings) for p in originals) <= 1 and np.median(scores[0]) < default_predictor.shift.detector.threshold
    assert all(p.warnings and "unlike the images this model was validated on" in p.warnings[0] for p in blurry)
    assert all(p.probability is not None and p.label for p in blurry)  # flagged, still answered


@needs_sidecar
def test_predict_rows_carry_warnings(cli: Any, tmp_path: Path) -> None:
    film = sorted(SAMPLES.glob("*.jpeg"))[0]
    odd = _jpeg(_blurred(read_image(film, max_side=224)), tmp_path / "blurred.jpeg")
    res = cli("predict", "--format", "json", "--no-guard", film, odd)
    assert res.code == 0, res.err
    rows = [json.loads(ln) for ln in res.out.splitlines()]
    assert all(isinstance(r["warnings"], list) for r in rows)
    assert rows[0]["warnings"] == [] and "shift_score" in rows[0]
    assert len(rows[1]["warnings"]) == 1 and "validated on paediatric" in rows[1]["warnings"][0]
    res = cli("predict", "--format", "csv", "--no-guard", film, odd)
    got = list(csv.DictReader(io.StringIO(res.out)))
    assert got[0]["warnings"] == "" and got[1]["warnings"] == rows[1]["warnings"][0] and float(got[1]["shift_score"]) > 0
    res = cli("predict", "--no-guard", film, odd)
    lines = res.out.strip().splitlines()
    assert lines[0].split()[-1] == "warn" and lines[1].split()[-1] in ("NORMAL", "PNEUMONIA") and lines[2].split()[-1] == "!"
    assert "unlike the images this model was validated on" in res.err


@pytest.fixture(scope="module")
def default_client(default_predictor: Predictor) -> Iterator[TestClient]:
    from pneumoscan.serving import create_app

    with TestClient(create_app(default_predictor), base_url="http://127.0.0.1") as c:
        yield c


@needs_sidecar
def test_service_json_carries_warnings_and_the_operating_curve(default_client: TestClient, tmp_path: Path) -> None:
    film = sorted(SAMPLES.glob("*.jpeg"))[0]
    odd = _jpeg(_blurred(read_image(film, max_side=224)), tmp_path / "blurred.jpeg")
    ok = default_client.post("/v1/predict", files={"file": ("a.jpeg", film.read_bytes(), "image/jpeg")}).json()
    flagged = default_client.post("/v1/predict", files={"file": ("b.jpeg", odd.read_bytes(), "image/jpeg")}).json()
    assert ok["warnings"] == [] and ok["extra"]["shift_score"] > 0
    assert len(flagged["warnings"]) == 1 and "treat this answer with caution" in flagged["warnings"][0]
    assert flagged["probability"] is not None
    m = default_client.get("/v1/model").json()
    assert m["capabilities"]["shift"] is True and m["shift"]["val_flag_rate"] <= MAX_FLAG_RATE
    curve = m["operating_curve"]
    assert curve["n"] == {"NORMAL": 1341, "PNEUMONIA": 3875}  # the out-of-fold logits of all 5,216 training images
    i = curve["thresholds"].index(round(m["operating_point"]["threshold"], 6))
    assert curve["sensitivity"][i] == pytest.approx(m["val_metrics"]["sensitivity"], abs=1e-4)
    assert curve["specificity"][i] == pytest.approx(m["val_metrics"]["specificity"], abs=1e-4)
    assert curve["sensitivity"][0] == 1.0 and curve["specificity"][0] == 0.0
    assert all(a >= b for a, b in zip(curve["sensitivity"], curve["sensitivity"][1:]))


@needs_sidecar
def test_evaluation_report_shows_the_flagged_share(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "site"
    for cls, pattern in (("NORMAL", "NORMAL*.jpeg"), ("PNEUMONIA", "person*.jpeg")):
        (data / cls).mkdir(parents=True)
        for f in sorted(SAMPLES.glob(pattern)):
            _jpeg(_blurred(read_image(f, max_side=224)), data / cls / f.name)
    r = cli("evaluate", "--data", data, "--out", tmp_path / "report", "--bootstrap", "200", "--no-summary")
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["shift"]["n_scored"] == 4 and m["shift"]["n_flagged"] == 4 and m["shift"]["share"] == 1.0
    assert m["shift"]["validation_share"] <= MAX_FLAG_RATE
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Distribution shift: 4 of 4 images (100.0 %)" in md
    assert "100 % of these images are unlike the images the model was validated on" in md  # > 20 %: a report warning
    rows = list(csv.DictReader((tmp_path / "report" / "predictions.csv").open()))
    assert all(float(x["shift_score"]) > m["shift"]["threshold"] and "treat this answer with caution" in x["warnings"] for x in rows)
    assert "are unlike the images the model was validated on" in r.err
