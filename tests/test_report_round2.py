"""Evaluation reports and model cards, round 2 (issues 13.3, 15.4, 15.5): the threshold table
and ROC plot for choosing an operating point, small-sample warnings at the top of the report,
readable error grids with Grad-CAM (and none without errors), and model cards written from the
data's own README or data card, with YAML front matter and no absolute path.

Everything runs the real code on the real fixture X-rays with the session's tiny seed_cnn run
(``tiny_run`` in conftest)."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_cli_in_process
from pneumoscan.core.calibration import select_threshold
from pneumoscan.core.intervals import wilson_interval
from pneumoscan.core.metrics import confusion_counts, threshold_metrics
from pneumoscan.errors import DataError, ModelError
from pneumoscan.evaluation.data_card import hf_license, load_data_card, strip_paths
from pneumoscan.evaluation.model_card import UNKNOWN, render_model_card, write_model_card
from pneumoscan.evaluation.plots import ErrorItem, error_caption, plot_error_grid, wrap_name
from pneumoscan.models.bundle import load_bundle

#: An absolute POSIX path of at least two parts (``/tmp/x``), not part of a URL or a DOI.
ABS_PATH = re.compile(r"(?<![\w:/.~])/(?:[^\s/`'\"()|\]]+/)+[^\s/`'\"()|\]]*")
OTHER_README = """# Hospital Z chest radiographs

Source: Hospital Z radiology archive, anonymised export of 2024 (internal release 3).
Licence: CC BY-NC-SA 4.0
Population: adults aged 18–90 from two hospitals in Norway; PA and AP projections.

## Layout

train/NORMAL, train/PNEUMONIA, val/...
"""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, xray_dir: Path) -> Path:
    """``pneumoscan evaluate`` of the tiny run on the 8 labelled fixture validation images."""
    out = tmp_path_factory.mktemp("report2") / "eval"
    code = run_cli_in_process(["-q", "evaluate", "--data", xray_dir / "val", "--checkpoint", tiny_run, "--out", out,
                               "--bootstrap", "1000"])
    assert code == 0
    return out


def _predictions(report: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((report / "predictions.csv").open()))


def _exact_probabilities(tiny_run: Path, rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the unrounded probabilities of the report's images, through the same
    predictor settings as ``evaluate`` (torch backend, batch 16, same order)."""
    from pneumoscan.inference import load_predictor

    pred = load_predictor(tiny_run, backend="torch", batch_size=16)
    p = np.array([r.probability for r in pred.predict_paths([r["path"] for r in rows])])
    y = np.array([r["true_label"] == "PNEUMONIA" for r in rows], dtype=np.int64)
    assert np.allclose(p, [float(r["probability"]) for r in rows], atol=1e-6)
    return y, p


# --------------------------------------------------------------------------- 13.3: choosing a threshold
def test_threshold_table_matches_core_metrics(report_dir: Path, tiny_run: Path) -> None:
    m = json.loads((report_dir / "metrics.json").read_text())
    table = m["threshold_table"]
    y, p = _exact_probabilities(tiny_run, _predictions(report_dir))
    bundle = load_bundle(tiny_run)

    expected = {round(0.1 * k, 1) for k in range(1, 10)} | {bundle.threshold}
    expected |= {select_threshold(p, y, "sensitivity", s) for s in (0.90, 0.95, 0.98)}
    got = [row["threshold"] for row in table]
    assert got == sorted(got)
    assert all(any(abs(t - g) < 1e-9 for g in got) for t in expected) and len(got) == len(expected)
    op = next(row for row in table if abs(row["threshold"] - bundle.threshold) < 1e-12)
    assert any(label.startswith("operating threshold") for label in op["labels"])

    for row in table:
        t = row["threshold"]
        want = threshold_metrics(y, p, t)
        c = confusion_counts(y, p, t)
        assert row["counts"] == c
        dens = {"sensitivity": (c["tp"], c["tp"] + c["fn"]), "specificity": (c["tn"], c["tn"] + c["fp"]),
                "precision": (c["tp"], c["tp"] + c["fp"]), "npv": (c["tn"], c["tn"] + c["fn"])}
        for k, (x, n) in dens.items():
            e = row[k]
            if math.isnan(want[k]):
                assert e["value"] is None and n == 0, (t, k)
            else:
                assert e["value"] == pytest.approx(want[k], abs=1e-12), (t, k)
            assert e["n"] == n and e["ci_method"] == "wilson"
            if n:
                assert e["ci95"] == pytest.approx(list(wilson_interval(x, n)))
            else:
                assert e["ci95"] == [None, None]
    # the table's operating-threshold row is the report's operating-threshold section
    sec = m["at_operating_threshold"]
    assert op["sensitivity"] == sec["sensitivity"] and op["specificity"] == sec["specificity"]


def test_roc_plot_and_table_are_in_both_reports(report_dir: Path) -> None:
    with Image.open(report_dir / "roc.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    md = (report_dir / "report.md").read_text()
    section = md.split("## Choosing a threshold", 1)[1].split("\n## ", 1)[0]
    assert "](roc.png)" in section
    assert "| threshold |" in section and "operating threshold" in section and "default 0.5" in section
    assert re.search(r"\| 0\.1 \|  \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \(n=\d+\) \|", section)
    html = (report_dir / "report.html").read_text()
    part = html.split(">Choosing a threshold<", 1)[1].split("<h2>", 1)[0]
    assert "src='data:image/png;base64," in part and "<th>sensitivity</th>" in part and "<th>NPV</th>" in part


# --------------------------------------------------------------------------- warnings, n and interval methods
def test_small_class_warnings_are_at_the_top(report_dir: Path) -> None:
    m = json.loads((report_dir / "metrics.json").read_text())
    warnings = m["at_operating_threshold"]["warnings"]
    assert any(w.startswith("only 4 NORMAL images") for w in warnings)
    md = (report_dir / "report.md").read_text()
    top = md.split("## Metrics", 1)[0]
    for w in warnings:
        assert f"> **Warning:** {w}" in top
    html = (report_dir / "report.html").read_text()
    box = re.search(r"<div class='warn' role='alert'>(.*?)</div>", html, re.S)
    assert box and html.index(box.group(0)) < html.index("<h2>Metrics</h2>")
    assert all(w in box.group(1) for w in warnings)


def test_every_figure_shows_n_and_its_interval_method(report_dir: Path) -> None:
    m = json.loads((report_dir / "metrics.json").read_text())
    b = m["bootstrap"]
    assert b["ci_methods"]["sensitivity"] == "wilson" and b["ci_methods"]["roc_auc"] == "bootstrap"
    assert "Wilson score interval" in b["method"] and "stratified percentile bootstrap" in b["method"]
    # the bootstrap is named only for the metrics it computes
    wilson_part = b["method"].split(";")[0]
    assert "Sensitivity" in wilson_part and "bootstrap" not in wilson_part
    md = (report_dir / "report.md").read_text()
    assert "95% CI method |" in md
    assert re.search(r"\| Sensitivity \| [^|]*\(n=4\) \| [^|]*\(n=4\) \| Wilson \|", md)
    assert re.search(r"\| ROC-AUC \| [^|]*\(n=8\) \| [^|]*\(n=8\) \| bootstrap \|", md)
    html = (report_dir / "report.html").read_text()
    assert "ROC-AUC · 95% CI" in html and "n = 8 · bootstrap" in html and "n = 4 · Wilson" in html


# --------------------------------------------------------------------------- 15.4: errors.png
def test_error_grid_names_are_not_cut(report_dir: Path, xray_dir: Path) -> None:
    for f in sorted(xray_dir.rglob("*.jpeg")):
        lines = wrap_name(f.name, 30)
        assert "".join(lines) == f.name and all(len(ln) <= 30 for ln in lines)
    long = "patient_00012345_study_0099_series_3_image_000017_AP_portable_supine_final.dcm"
    lines = wrap_name(long, 24, 2)
    joined = "".join(lines)
    assert len(lines) == 2 and all(len(ln) <= 24 for ln in lines)
    assert "…" in joined and joined.endswith(long[-20:]) and joined.startswith(long[:10])
    assert error_caption("/some/where/person1946_bacteria_4875.jpeg", 0.91234).splitlines() == [
        "person1946_bacteria_4875.jpeg", "p = 0.912"]
    # the report lists the errors of the grid by their full file names
    rows = _predictions(report_dir)
    wrong = {Path(r["path"]).name for r in rows if r["predicted_label"] != r["true_label"]}
    assert wrong, "the tiny model is expected to make mistakes on the fixture images"
    md = (report_dir / "report.md").read_text()
    listed = re.findall(r"\| false (?:positive|negative) \([^)]*\) \| ([^|]+) \|", md)
    assert listed and {n.strip() for n in listed} <= wrong
    assert "](errors.png)" in md and (report_dir / "errors.png").is_file()


def test_error_panels_carry_gradcam_and_fall_back_to_the_image(report_dir: Path, tiny_run: Path,
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pneumoscan.evaluation.evaluate import error_panels
    from pneumoscan.evaluation.summaries import most_confident_errors
    from pneumoscan.inference import load_predictor

    rows = [{"path": r["path"], "label": int(r["true_label"] == "PNEUMONIA"), "probability": float(r["probability"])}
            for r in _predictions(report_dir)]
    bundle = load_bundle(tiny_run)
    errors = most_confident_errors(rows, bundle.threshold, 2)
    pred = load_predictor(tiny_run, backend="torch")
    panels = error_panels(pred, errors)
    items = panels["false_positives"] + panels["false_negatives"]
    assert items and all(it.cam is not None and it.cam.shape == it.image.shape for it in items)
    assert all(0.0 <= float(it.cam.min()) and float(it.cam.max()) <= 1.0 for it in items)

    def no_torch(*a: object, **k: object) -> None:
        raise ModelError("no PyTorch model")

    monkeypatch.setattr(pred, "gradcam", no_torch)
    plain = error_panels(pred, errors)
    assert [it.caption for it in plain["false_negatives"]] == [it.caption for it in panels["false_negatives"]]
    assert all(it.cam is None for its in plain.values() for it in its)
    plot_error_grid(plain["false_positives"], plain["false_negatives"], tmp_path / "plain.png")
    plot_error_grid([ErrorItem(items[0].image, items[0].caption, items[0].cam)], [], tmp_path / "cam.png")
    for f in ("plain.png", "cam.png"):
        with Image.open(tmp_path / f) as im:
            assert im.format == "PNG"
    with pytest.raises(ValueError):
        plot_error_grid([], [], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_no_errors_png_without_errors(report_dir: Path, tiny_run: Path, tmp_path: Path) -> None:
    right = [r for r in _predictions(report_dir) if r["predicted_label"] == r["true_label"]]
    if not right:
        pytest.skip("the tiny model got every fixture image wrong")
    manifest = tmp_path / "right.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([r["path"], r["true_label"]] for r in right)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "errors.png").write_bytes((report_dir / "errors.png").read_bytes())  # stale grid of an earlier report
    code = run_cli_in_process(["-q", "evaluate", "--data", manifest, "--checkpoint", tiny_run, "--out", out,
                               "--bootstrap", "1000", "--no-summary"])
    assert code == 0
    assert not (out / "errors.png").exists()
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "no misclassified images" in md.lower() and "no misclassified images" in html.lower()
    assert "errors.png" not in md
    assert "## Most confident errors" in md and ">Most confident errors<" in html


# --------------------------------------------------------------------------- 15.5: model card from the data
def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


def _no_absolute_path(card: str, *paths: Path) -> None:
    for p in paths:
        assert str(p) not in card and str(p.resolve()) not in card
    assert not ABS_PATH.findall(card), ABS_PATH.findall(card)


def test_card_of_a_run_without_data_facts_says_unknown(tiny_run: Path, xray_dir: Path) -> None:
    card = (tiny_run / "MODEL_CARD.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "unknown" and meta["tags"] == ["chest-x-ray", "pneumonia", "image-classification"]
    assert meta["datasets"] == [xray_dir.name] and "roc_auc" in meta["metrics"]
    assert card.count(UNKNOWN) >= 4  # dataset, source, licence, population
    for stale in ("Kermany", "Guangzhou", "1–5 years", "CC BY 4.0", "one centre"):
        assert stale not in card, stale
    train = list(csv.DictReader((tiny_run / "split_train.csv").open()))
    n_patients = len({r["patient_id"] for r in train})
    assert re.search(rf"\| training \| {len(train)} \| \d+ \| \d+ \| {n_patients} \|", card)
    _no_absolute_path(card, tiny_run, xray_dir)


def test_card_from_a_data_readme_shows_its_source_and_licence(tiny_run: Path, xray_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "hospital_z"
    shutil.copytree(xray_dir, data)
    (data / "README.md").write_text(OTHER_README, encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    b = load_bundle(run / "best.pt")
    cfg = b.provenance["config"]
    b = b.replace(provenance={**b.provenance, "data": {**b.provenance["data"], "root": str(data)},
                              "config": {**cfg, "data": {**cfg["data"], "root": str(data)}}})
    card = (write_model_card(run, b)).read_text()
    assert "Hospital Z radiology archive, anonymised export of 2024 (internal release 3)." in card
    assert "**Licence:** CC BY-NC-SA 4.0" in card and "adults aged 18–90 from two hospitals in Norway" in card
    assert "**Dataset:** Hospital Z chest radiographs" in card and "`README.md`" in card
    for stale in ("Kermany", "Guangzhou", "1–5 years", "Mendeley", "CC BY 4.0", UNKNOWN):
        assert stale not in card, stale
    meta = _front_matter(card)
    assert meta["license"] == "cc-by-nc-sa-4.0" and meta["datasets"] == ["Hospital Z chest radiographs"]
    _no_absolute_path(card, run, data, tiny_run)
    assert f"root: {data.name}" in card  # the training configuration names the folder, not its path


def test_card_from_a_data_card_file(tiny_run: Path, tmp_path: Path) -> None:
    yml = tmp_path / "card.yaml"
    yml.write_text(yaml.safe_dump({"name": "Clinic Q CXR", "source": "Clinic Q PACS export, /mnt/pacs/export/2023",
                                   "license": "proprietary, internal use only", "citation": "Q et al. 2023, Radiology 1:2",
                                   "population": "outpatients aged 40–80"}), encoding="utf-8")
    md = tmp_path / "card.md"
    md.write_text("---\nname: Clinic R\nlicense: MIT\n---\n\n# ignored title\n\nPopulation: children under 2\n", encoding="utf-8")
    b = load_bundle(tiny_run)
    card = render_model_card(b, tiny_run, n_resamples=200, data_card=yml)
    meta = _front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == "proprietary, internal use only"
    assert meta["datasets"] == ["Clinic Q CXR"]
    assert "Clinic Q PACS export, 2023" in card and "**Citation:** Q et al. 2023, Radiology 1:2" in card
    assert "outpatients aged 40–80" in card and "`card.yaml`" in card
    _no_absolute_path(card, tmp_path, tiny_run)
    r = load_data_card(md)
    assert r == {"name": "Clinic R", "source": None, "license": "MIT", "citation": None, "population": "children under 2",
                 "file": "card.md"}
    assert _front_matter(render_model_card(b, None, n_resamples=200, data_card=md))["license"] == "mit"
    with pytest.raises(DataError):
        load_data_card(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(DataError):
        load_data_card(tmp_path / "bad.yaml")


def test_data_card_helpers() -> None:
    assert hf_license("CC BY 4.0") == "cc-by-4.0" and hf_license("CC0 1.0") == "cc0-1.0"
    assert hf_license("Apache 2.0") == "apache-2.0" and hf_license(None) == "unknown" and hf_license("ask us") == "other"
    assert strip_paths("see /home/alice/data/chest_xray/README.md or https://doi.org/10.1/x, NORMAL / PNEUMONIA") == \
        "see README.md or https://doi.org/10.1/x, NORMAL / PNEUMONIA"


def test_the_shared_data_readme_is_read(shared_dir: Path | None) -> None:
    if shared_dir is None or not (shared_dir / "chest_xray_224").is_dir():
        pytest.skip("shared development data not present")
    card = load_data_card(shared_dir / "chest_xray_224")
    assert card["file"] == "README.md" and card["license"] == "CC BY 4.0"
    assert "Kermany" in card["source"] and "doi:10.17632/rscbjbr9sj.2" in card["citation"]
    assert "1–5 years" in card["population"]
