"""The not-a-chest-X-ray guard: the shipped parameters accept real chest X-rays (fixtures,
bundled samples, PNG/DICOM versions) and refuse generated noise, blank images, documents,
screenshots, photographs and CT/MR data, each with a clear one-line reason."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.data.io import read_image_with_meta
from pneumoscan.errors import ConfigError
from pneumoscan.guard import Guard, check
from pneumoscan.guard.core import default_guard_path
from pneumoscan.guard.features import feature_names, image_features
from pneumoscan.workflows.guard_synth import GENERATORS, encode, generate
from pneumoscan.cli.predict import sample_files

#: Seeds far from the ones ``guard fit`` uses.
TEST_SEEDS = range(2_000_000_000, 2_000_000_004)


def _check_bytes(data: bytes, name: str = "upload.png"):
    img, meta = read_image_with_meta(data, max_side=224, name=name)
    return Guard.default().check(img, meta)


def test_shipped_parameters_load_and_describe_their_fit() -> None:
    params = json.loads(default_guard_path().read_text())
    assert params["features"] == feature_names()
    g = Guard.default()
    assert 0 < g.threshold < 1 and g.template is not None and g.template.shape == (16, 16)
    fit = params["fit"]
    assert fit["cxr_accepted"] >= 0.99 and fit["other_refused"] >= 0.95 and fit["cxr_n"] > 1000
    assert fit["cxr_transformed_accepted"] >= 0.98 and fit["cxr_transformed_n"] >= 1000


def test_accepts_real_chest_xrays(xray_dir: Path, fullres_dir: Path) -> None:
    files = sorted(xray_dir.rglob("*.jpeg")) + sorted(fullres_dir.glob("*.jpeg")) + sample_files()
    refused = []
    for f in files:
        img, meta = read_image_with_meta(f, max_side=224)
        ok, reason, score = check(img, meta)
        if not ok:
            refused.append((f.name, reason))
        else:
            assert reason is None and 0.0 <= score <= 1.0
    assert not refused, refused


def test_accepts_xrays_as_png16_and_without_metadata(fullres_dir: Path) -> None:
    src = sorted(fullres_dir.glob("*.jpeg"))[0]
    a = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert _check_bytes(buf.getvalue()).ok
    img, _ = read_image_with_meta(src)
    assert Guard.default().check(img).ok  # pixels only


@pytest.mark.parametrize("category", ["noise", "blank", "document", "screenshot", "chart", "smooth_noise", "cross_section", "shapes"])
def test_refuses_generated_images(category: str) -> None:
    results = [_check_bytes(encode(generate(category, s))) for s in TEST_SEEDS]
    refused = [r for r in results if not r.ok]
    assert len(refused) >= len(results) - 1, [r.to_dict() for r in results]  # at most one miss in four
    for r in refused:
        assert r.reason and "\n" not in r.reason and r.rule


def test_refuses_photographs() -> None:
    from sklearn.datasets import load_sample_image

    for name in ("china.jpg", "flower.jpg"):  # held out from the fit
        rgb = load_sample_image(name)
        r = _check_bytes(encode(rgb, "JPEG"), name)
        assert not r.ok and r.rule == "colour", r
        grey = np.asarray(Image.fromarray(rgb).convert("L"))
        r = _check_bytes(encode(grey, "JPEG"), name)
        assert not r.ok and r.rule == "classifier" and "guard score" in r.reason, r


def test_blank_and_tiny_images_are_refused_by_rules() -> None:
    r = _check_bytes(encode(np.full((300, 300), 128, np.uint8)))
    assert (r.ok, r.rule, r.reason) == (False, "blank", "does not look like a frontal chest X-ray (blank image: no contrast)")
    r = _check_bytes(encode(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)))
    assert r.rule == "too_small" and "40x40" in r.reason
    r = _check_bytes(encode(np.random.default_rng(0).integers(0, 255, (100, 900), dtype=np.uint8)))
    assert r.rule == "aspect"


def test_dicom_modality_and_body_part(fixtures_dir: Path) -> None:
    ct = fixtures_dir / "dicom" / "ct.dcm"
    if ct.is_file():
        r = Guard.default().check_source(ct)
        assert not r.ok and r.rule == "dicom_modality" and "CT" in r.reason
    img = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    g = Guard.default()
    assert g.check(img, {"format": "DICOM", "modality": "MR"}).rule == "dicom_modality"
    assert g.check(img, {"format": "DICOM", "modality": "DX", "body_part": "HAND"}).rule == "dicom_body_part"
    for sample in sample_files():
        if sample.suffix == ".dcm":
            assert g.check_source(sample).ok


def test_features_are_finite_for_degenerate_inputs() -> None:
    names = feature_names()
    for img in (np.zeros((1, 1), np.float32), np.ones((3, 500), np.float32), np.full((64, 64), np.nan, np.float32),
                np.random.default_rng(0).random((700, 90)).astype(np.float32)):
        f = image_features(img, {}, np.zeros((16, 16)))
        assert list(f) == names and all(np.isfinite(v) for v in f.values())


def test_malformed_parameters_raise_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "g.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError):
        Guard.from_file(bad)
    params = json.loads(default_guard_path().read_text())
    short = {**params, "coef": params["coef"][:-1]}
    with pytest.raises(ConfigError, match="do not fit"):
        Guard(short)
    with pytest.raises(ConfigError, match="same length"):
        Guard({**params, "mean": params["mean"][:-1]})
    with pytest.raises(ConfigError, match="threshold"):
        Guard({**params, "threshold": 1.5})
    with pytest.raises(ConfigError, match="format"):
        Guard({**params, "format": "something-else"})
    with pytest.raises(ConfigError, match="not found"):
        Guard.from_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="clip_lo"):
        Guard({**params, "clip_hi": None})


def test_features_are_clipped_to_their_fitted_range() -> None:
    """A measurement far outside anything fitted scores as the edge of the fitted range: an
    unusual film cannot push the network into extrapolation (and a score of 0)."""
    g = Guard.default()
    assert g.clip_lo is not None and g.clip_hi is not None and np.all(g.clip_lo <= g.clip_hi)
    rng = np.random.default_rng(0)
    base = {n: float(v) for n, v in zip(g.names, rng.uniform(g.clip_lo, g.clip_hi))}
    for k in rng.choice(len(g.names), 10, replace=False):
        name, hi, lo = g.names[k], float(g.clip_hi[k]), float(g.clip_lo[k])
        span = hi - lo + 1.0
        assert g._score({**base, name: hi + 100 * span}) == pytest.approx(g._score({**base, name: hi}), abs=1e-12)
        assert g._score({**base, name: lo - 100 * span}) == pytest.approx(g._score({**base, name: lo}), abs=1e-12)
    unclipped = Guard({k: v for k, v in g.params.items() if k not in ("clip_lo", "clip_hi")})
    k = int(np.argmax(np.abs(g.hidden_w).sum(axis=1)))  # the feature the network weighs most
    far = {**base, g.names[k]: float(g.clip_hi[k]) + 1_000 * float(g.scale[k])}
    assert unclipped._score(far) != pytest.approx(g._score(far), abs=1e-6)  # the clip does something


def test_guard_evaluate_command_reports_every_family(tmp_path: Path, xray_dir: Path, fullres_dir: Path, cli) -> None:
    """``pneumoscan guard evaluate`` measures the shipped guard on a data root without refitting
    it and prints a row per transformation family and per non-X-ray category."""
    pytest.importorskip("skimage")
    from pneumoscan.workflows.guard_transforms import FAMILIES

    root = tmp_path / "data"
    for split in ("train", "val"):
        for f in (xray_dir / split).rglob("*.jpeg"):
            dst = root / "chest_xray_224" / split / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    (root / "chest_xray_fullres" / "val" / "NORMAL").mkdir(parents=True)
    for f in fullres_dir.glob("*.jpeg"):
        (root / "chest_xray_fullres" / "val" / "NORMAL" / f.name).write_bytes(f.read_bytes())
    r = cli("guard", "evaluate", "--data", root, "--per-family", "1", "--generated", "1", "--bundled-variants", "0",
            "--seed", "0", "--no-progress", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    per = report["per_category"]
    assert {f"cxr_{f}" for f in FAMILIES} <= set(per) and set(GENERATORS) <= set(per)
    assert report["cxr_n"] > 0 and report["other_n"] > len(GENERATORS) and 0 < report["threshold"] < 1


def test_fit_pipeline_on_a_small_set(xray_dir: Path, fullres_dir: Path) -> None:
    """Fit the classifier on fixture X-rays and generated images; the measurement uses
    only held-out ones and the written parameters load as a Guard."""
    from pneumoscan.workflows.guard_fit import _placeholder_guard, featurise, fit_rows, fit_template
    from pneumoscan.workflows.guard_sources import Item, _file_loader, _synth_loader

    xrays = sorted(xray_dir.rglob("*.jpeg"))
    items = [Item(1, "cxr_fit", "fit", str(p), _file_loader(p)) for p in xrays if "train" in p.parts]
    items += [Item(1, "cxr_val", "eval", str(p), _file_loader(p)) for p in xrays if "val" in p.parts]
    for ci, cat in enumerate(("noise", "document", "cross_section", "smooth_noise")):
        items += [Item(0, cat, "fit", f"synth:{cat}", _synth_loader(cat, 5_000 + ci * 100 + k)) for k in range(8)]
        items += [Item(0, cat, "eval", f"synth:{cat}", _synth_loader(cat, 7_000 + ci * 100 + k)) for k in range(3)]
    template = fit_template(items)
    rows = featurise(items, _placeholder_guard(), template)
    report = fit_rows(rows, template, target_acceptance=0.99)
    assert report["cxr_n"] == 8 and report["other_n"] == 12
    assert report["cxr_accepted"] >= 0.75 and report["other_refused"] >= 0.75
    g = Guard(json.loads(json.dumps(report["params"])))  # JSON round trip, no pickle
    img, meta = read_image_with_meta(sorted(fullres_dir.glob("*.jpeg"))[0], max_side=224)
    assert g.check(img, meta).ok


def test_cli_guard_check(cli, tmp_path: Path, fullres_dir: Path) -> None:
    doc = tmp_path / "doc.png"
    doc.write_bytes(encode(generate("document", 2_000_000_123)))
    res = cli("guard", "check", "--json", doc, fullres_dir)
    assert res.code == 0
    rows = [json.loads(ln) for ln in res.out.splitlines()]
    assert rows[0]["ok"] is False and rows[0]["reason"]
    assert [r["ok"] for r in rows[1:]] == [True, True]


def test_every_generator_makes_uint8_images() -> None:
    for cat in GENERATORS:
        a = generate(cat, 3)
        assert a.dtype == np.uint8 and a.ndim in (2, 3) and min(a.shape[:2]) >= 16


def test_photo_scenes_are_seeded_and_use_only_fitting_photographs() -> None:
    from pneumoscan.workflows.guard_scenes import photo_scene
    from pneumoscan.workflows.guard_sources import EVAL_SOURCES, FIT_SOURCES, fit_photo_keys

    keys = fit_photo_keys()
    assert keys and set(keys) <= set(FIT_SOURCES) and not set(keys) & set(EVAL_SOURCES)
    srcs = [np.random.default_rng(k).integers(0, 256, (120 + 30 * k, 150, 3), dtype=np.uint8) for k in range(3)]
    for s in range(12):
        a = photo_scene(np.random.default_rng(s), srcs)
        assert a.dtype == np.uint8 and a.ndim in (2, 3) and min(a.shape[:2]) >= 100
        assert np.array_equal(a, photo_scene(np.random.default_rng(s), srcs))
    assert photo_scene(np.random.default_rng(1), []).dtype == np.uint8  # natural-statistics scenes only
