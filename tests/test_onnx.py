"""ONNX export and the onnxruntime backend: metadata, dynamic batch axis, and parity with
PyTorch (probabilities within 1e-4) on real X-rays, from the API and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pneumoscan.errors import CheckpointError  # noqa: E402
from pneumoscan.inference import load_predictor  # noqa: E402
from pneumoscan.inference.onnx_export import ONNX_FORMAT, export_onnx, read_onnx_metadata  # noqa: E402
from pneumoscan.models.bundle import load_bundle  # noqa: E402
from pneumoscan.utils.io import sha256_file  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_run, out)
    return out


def _images(xray_dir: Path, fullres_dir: Path) -> list[str]:
    return [str(p) for p in sorted(xray_dir.rglob("*.jpeg"))] + [str(p) for p in sorted(fullres_dir.glob("*.jpeg"))]


def test_export_metadata_opset_and_dynamic_batch(exported: Path, tiny_run: Path) -> None:
    model = onnx.load(str(exported))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in model.metadata_props}
    b = load_bundle(tiny_run)
    assert props["pneumoscan.format"] == ONNX_FORMAT
    assert props["model_name"] == "seed_cnn"
    assert props["source_sha256"] == sha256_file(tiny_run / "best.pt")
    assert float(props["threshold"]) == pytest.approx(b.threshold)
    assert float(props["temperature"]) == pytest.approx(b.temperature)
    assert json.loads(props["pneumoscan.bundle"]) == b.info()  # the whole description, read back by the ONNX backend
    assert json.loads(props["preprocessing"])["input_size"] == 128
    inp = model.graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    assert read_onnx_metadata(exported)["weight_name"] == props["weight_name"]
    assert not list(exported.parent.glob("*.data"))  # weights inside the file


def test_onnx_matches_pytorch_on_real_images(exported: Path, tiny_run: Path, xray_dir: Path, fullres_dir: Path) -> None:
    paths = _images(xray_dir, fullres_dir)
    torch_p = load_predictor(tiny_run, backend="torch", batch_size=16)
    onnx_p = load_predictor(onnx=exported, batch_size=5)  # other batch sizes: dynamic axis
    a = [p.probability for p in torch_p.predict_paths(paths)]
    b = [p.probability for p in onnx_p.predict_paths(paths)]
    assert len(a) == len(b) == len(paths)
    assert np.max(np.abs(np.array(a) - np.array(b))) < 1e-4
    assert onnx_p.threshold == pytest.approx(torch_p.threshold) and onnx_p.name == torch_p.name
    assert onnx_p.weights_id == torch_p.weights_id
    with pytest.raises(Exception, match="PyTorch"):
        onnx_p.explain(paths[0])  # no torch model inside an exported file
    # TTA is shared by both backends
    ta = load_predictor(tiny_run, backend="torch", tta="flip").predict_image(paths[0]).probability
    tb = load_predictor(onnx=exported, tta="flip").predict_image(paths[0]).probability
    assert abs(ta - tb) < 1e-4


def test_files_exported_before_the_bundle_entry_still_load(exported: Path, tmp_path: Path, fullres_dir: Path) -> None:
    model = onnx.load(str(exported))
    props = {p.key: p.value for p in model.metadata_props if p.key != "pneumoscan.bundle"}
    props["preprocessing"] = json.dumps({**json.loads(props["preprocessing"]), "interpolation": "bilinear"})  # an old field
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    new_p, old_p = load_predictor(onnx=exported), load_predictor(onnx=old)
    for key in ("name", "arch", "sha256", "threshold", "threshold_method", "temperature", "preprocessing", "class_names", "val_metrics"):
        assert getattr(old_p.bundle, key) == getattr(new_p.bundle, key), key
    paths = [str(p) for p in sorted(fullres_dir.glob("*.jpeg"))]
    assert [p.probability for p in old_p.predict_paths(paths)] == [p.probability for p in new_p.predict_paths(paths)]


def test_cli_backends_agree(cli, exported: Path, tiny_run: Path, fullres_dir: Path, xray_dir: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    folder = xray_dir / "val"
    runs = {
        "torch": cli("predict", "--checkpoint", tiny_run, "--format", "json", folder, fullres_dir),
        "onnx-file": cli("predict", "--onnx", exported, "--format", "json", folder, fullres_dir),
        "onnx-cache": cli("predict", "--backend", "onnx", "--checkpoint", tiny_run, "--format", "json", folder, fullres_dir),
    }
    probs = {}
    for k, res in runs.items():
        assert res.code == 0, (k, res.err)
        probs[k] = np.array([json.loads(ln)["probability"] for ln in res.out.splitlines()])
    assert len(probs["torch"]) == 10
    for k in ("onnx-file", "onnx-cache"):
        assert np.max(np.abs(probs[k] - probs["torch"])) < 1e-4, k
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and read_onnx_metadata(cached[0])["source_sha256"] == sha256_file(tiny_run / "best.pt")


def test_cli_export_and_bad_onnx_files(cli, tiny_run: Path, tmp_path: Path, fullres_dir: Path) -> None:
    out = tmp_path / "m.onnx"
    res = cli("export", "--checkpoint", tiny_run, "--out", out, "--opset", "17")
    assert res.code == 0 and res.out.strip() == str(out) and out.is_file()
    assert read_onnx_metadata(out)["model_name"] == "seed_cnn"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01not a model")
    res = cli("predict", "--onnx", garbage, fullres_dir)
    assert res.code == 1 and len(res.err_lines) == 1 and "ONNX" in res.err
    with pytest.raises(CheckpointError):
        load_predictor(onnx=tmp_path / "missing.onnx")
    res = cli("export", "--checkpoint", tiny_run, "--out", tmp_path / "x.onnx", "--opset", "13")
    assert res.code == 1 and "opset" in res.err


@pytest.mark.slow
def test_legacy_exporter_also_matches(tiny_run: Path, tmp_path: Path, fullres_dir: Path) -> None:
    out = export_onnx(tiny_run, tmp_path / "legacy.onnx", exporter="legacy")
    paths = [str(p) for p in sorted(fullres_dir.glob("*.jpeg"))]
    a = [p.probability for p in load_predictor(tiny_run, backend="torch").predict_paths(paths)]
    b = [p.probability for p in load_predictor(onnx=out).predict_paths(paths)]
    assert np.max(np.abs(np.array(a) - np.array(b))) < 1e-4
