"""Every benchmark runs in ``--smoke`` mode (tiny sizes; the figures mean nothing) and prints
the report structure: title, machine line, settings, a variant table with a baseline row and
ratios, and the JSON twin. Also the int8 quantiser's accuracy gate, both ways.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

FIXTURE_FULLRES = "NORMAL2-IM-1438-0001.jpeg"


def _check_report(out: str, js: dict, benchmark: str) -> None:
    lines = out.splitlines()
    assert lines[0].startswith(f"pneumoscan benchmark {benchmark}:")
    machine = next(ln for ln in lines if ln.startswith("machine:"))
    assert "cores" in machine and "torch" in machine and "bf16 autocast" in machine and "load average" in machine
    assert any(ln.startswith("settings:") for ln in lines)
    header = next(ln for ln in lines if ln.startswith("variant"))
    assert "img/s" in header and "vs baseline" in header and "peak RSS MB" in header
    base_rows = [ln for ln in lines if "[baseline]" in ln]
    assert len(base_rows) == 1 and "1.00x" in base_rows[0]
    assert lines[-1].startswith("load average at end:")

    assert js["benchmark"] == benchmark
    for key in ("cpu", "cores", "torch", "bf16_autocast", "load_avg_1min"):
        assert key in js["machine"]
    variants = js["variants"]
    assert sum(v["baseline"] for v in variants) == 1
    base = next(v for v in variants if v["baseline"])
    assert math.isclose(base["ratio"], 1.0)
    for v in variants:
        assert v["images_per_s"] is not None and v["images_per_s"] > 0, v["name"]
        assert v["name"] in out


def test_train_benchmark_smoke(cli, xray_dir: Path, tmp_path: Path) -> None:
    js = tmp_path / "train.json"
    r = cli("benchmark", "train", "--data", xray_dir, "--smoke", "--json", js)
    assert r.code == 0, r.err
    data = json.loads(js.read_text())
    _check_report(r.out, data, "train")
    assert "data ms/step" in r.out and "compute ms/step" in r.out
    for v in data["variants"]:
        assert v["extra"]["data_ms_per_step"] >= 0 and v["extra"]["compute_ms_per_step"] > 0
    assert "engine auto" in r.out
    assert any(ln.startswith("target: seed_cnn 128") for ln in r.out.splitlines())


@pytest.mark.slow
def test_predict_benchmark_smoke(cli, tiny_run: Path, xray_dir: Path, fullres_dir: Path, tmp_path: Path) -> None:
    js = tmp_path / "predict.json"
    r = cli("benchmark", "predict", "--checkpoint", tiny_run, "--data", xray_dir, "--latency-image",
            fullres_dir / FIXTURE_FULLRES, "--smoke", "--json", js)
    assert r.code == 0, r.err
    data = json.loads(js.read_text())
    _check_report(r.out, data, "predict")
    keys = {v["extra"]["key"] for v in data["variants"]}
    assert {"baseline", "predictor", "torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8", "e2e-baseline"} <= keys
    for v in data["variants"]:
        if v["extra"]["key"] in ("baseline", "predictor", "torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"):
            assert v["latency_ms"]["p50"] > 0
    by = {v["extra"]["key"]: v for v in data["variants"]}
    # every fast backend answers what the plain fp32 Predictor answers (up to its numerics)
    assert by["torch-fp32"]["extra"]["max_abs_prob_diff_vs_fp32"] < 1e-5
    assert by["onnx-fp32"]["extra"]["max_abs_prob_diff_vs_fp32"] < 1e-3
    assert by["torch-bf16"]["extra"]["max_abs_prob_diff_vs_fp32"] < 0.02
    assert "p50 ms" in r.out
    # the end-to-end ratio of each round (baseline script and pneumoscan predict run back to back)
    e2e = by["e2e-predict"]["extra"]
    assert len(e2e["e2e_ratio_rounds"]) == 1 and abs(e2e["e2e_ratio_rounds"][0] - e2e["e2e_ratio"]) < 0.01
    assert f"per round {e2e['e2e_ratio_rounds'][0]:.2f}x" in r.out


def test_serve_benchmark_smoke(cli, tiny_run: Path, fullres_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    js = tmp_path / "serve.json"
    r = cli("benchmark", "serve", "--checkpoint", tiny_run, "--image", fullres_dir / FIXTURE_FULLRES, "--smoke",
            "--backends", "torch-fp32,onnx-int8", "--json", js)
    assert r.code == 0, r.err
    data = json.loads(js.read_text())
    _check_report(r.out, data, "serve")
    served = [v for v in data["variants"] if not v["baseline"]]
    assert len(served) == 2
    for v in served:
        assert 0.0 <= v["extra"]["probability"] <= 1.0 and v["latency_ms"]["p99"] >= v["latency_ms"]["p50"] > 0


def test_quantize_writes_int8_model_with_metadata(cli, tiny_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out, js = tmp_path / "m.int8.onnx", tmp_path / "q.json"
    # the fixture run's 6 validation images cannot resolve an AUC change of 0.002: only the
    # machinery is checked here (the real gate runs on a trained model, docs/benchmarks.md)
    r = cli("benchmark", "quantize", "--checkpoint", tiny_run, "--out", out, "--calib-images", "16",
            "--max-auc-drop", "1", "--json", js)
    assert r.code == 0, r.err
    assert "accepted" in r.out and out.is_file()
    res = json.loads(js.read_text())
    for k in ("auc_fp32_torch", "auc_int8", "auc_change", "label_agreement", "max_abs_prob_diff"):
        assert k in res
    assert abs(res["auc_fp32_onnx"] - res["auc_fp32_torch"]) < 1e-6  # the fp32 export is exact
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    q = json.loads(meta["pneumoscan.quantization"])
    assert q["weights"] == "int8 per-channel" and "logit_correction" in q
    assert "pneumoscan.preprocessing" in meta or any("preprocess" in k for k in meta)


def test_quantize_gate_refuses_and_writes_nothing(cli, tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "never.onnx"
    r = cli("benchmark", "quantize", "--checkpoint", tiny_run, "--out", out, "--calib-images", "16",
            "--max-auc-drop", "-1")
    assert r.code == 1
    errors = [ln for ln in r.err_lines if ln.startswith("error:")]
    assert len(errors) == 1 and "int8 model rejected" in errors[0] and "Traceback" not in r.err
    assert not out.exists() and not list(tmp_path.glob("*.onnx"))


def test_load_benchmark_refuses_a_non_loopback_url(cli) -> None:
    r = cli("benchmark", "load", "--url", "http://192.0.2.1:8000")
    assert r.code == 1
    assert r.err_lines == ["error: --url must be an http(s) URL on a loopback address (got 'http://192.0.2.1:8000')"]
    r = cli("benchmark", "load", "--url", "http://127.0.0.1:9", "--big", "1000")
    assert r.code == 1 and r.err_lines == ["error: --big must be 0..200"]


def test_load_benchmark_smoke(cli, tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    js = tmp_path / "load.json"
    r = cli("benchmark", "load", "--checkpoint", tiny_run, "--backend", "torch", "--n", "1", "--json", js)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("server http://127.0.0.1:") and "seed_cnn" in lines[0]
    assert lines[1].startswith("N=  1    16 requests") and "p99" in lines[1]
    data = json.loads(js.read_text())
    (level,) = data["levels"]
    assert level["requests"] == 16 and sum(level["status"].values()) == 16
    assert level["p99_ms"] >= level["p50_ms"] > 0


@pytest.mark.slow
def test_precision_parity_smoke(cli, xray_dir: Path, tmp_path: Path) -> None:
    js = tmp_path / "parity.json"
    r = cli("benchmark", "precision-parity", "--data", xray_dir, "--images", "24", "--epochs", "1", "--seeds", "0,1",
            "--batch-size", "8", "--json", js)
    assert r.code == 0, r.err
    rows = json.loads(js.read_text())
    assert [(x["seed"], x["precision"]) for x in rows] == [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16")]
    assert all(0.0 <= x["val_auc_last_epoch"] <= 1.0 for x in rows)
    assert r.out.splitlines()[0].startswith("machine:")
    assert any(ln.startswith("paired bf16 - fp32 val AUC (last epoch):") for ln in r.out.splitlines())
