"""Behaviour pin: the shipped default model's probabilities on the committed sample X-rays.

Recorded from the PyTorch backend when the model was shipped (``scripts/ship_default.py`` writes
``tests/fixtures/pinned_default.json`` with the model's sha256); every backend must keep
reproducing them to 1e-6, so moving code around cannot silently change an answer.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from pneumoscan.inference import load_predictor

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "assets" / "samples"

PINNED = {name: (float(v["probability"]), v["label"]) for name, v in json.loads(
    (Path(__file__).resolve().parent / "fixtures" / "pinned_default.json").read_text(encoding="utf-8"))["samples"].items()}


def test_pins_belong_to_the_shipped_model() -> None:
    from pneumoscan.models.bundle import default_manifest

    pins = json.loads((Path(__file__).resolve().parent / "fixtures" / "pinned_default.json").read_text(encoding="utf-8"))
    assert pins["sha256"] == default_manifest()["sha256"], "re-shipped without re-pinning: run scripts/ship_default.py"
    assert sorted(pins["samples"]) == sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".jpeg", ".dcm"))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_default_model_probabilities_are_pinned(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path))
    predictor = load_predictor(None, backend=backend)
    files = [SAMPLES / name for name in sorted(PINNED)]
    preds = list(predictor.predict_paths(files, guard=False))
    assert [Path(p.path).name for p in preds] == sorted(PINNED)
    for p in preds:
        prob, label = PINNED[Path(p.path).name]
        assert p.error is None and p.refused is None
        assert p.probability == pytest.approx(prob, abs=1e-6), p.path
        assert p.label == label


# ----------------------------------------------------------------------------- what ships
_ABS_PATH = re.compile(r"(?:^|[\s`'\"(=:])(?:[A-Za-z]:\\|/)(?:[\w.-]+[/\\]){1,}[\w.-]*")
_URL = re.compile(r"[a-z]+://\S+")


def _strings(value: object, where: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{where}[{i}]")]
    return [(where, value)] if isinstance(value, str) else []


def test_nothing_shipped_names_a_machine_path() -> None:
    """The default model's checkpoint, manifest, ONNX metadata and card carry no absolute path
    of the machine that trained it."""
    from pneumoscan.inference.onnx_export import read_onnx_metadata
    from pneumoscan.models.bundle import default_manifest, default_model_dir, load_bundle

    folder = default_model_dir()
    bundle = load_bundle(None)
    texts = _strings({k: v for k, v in bundle.provenance.items() if k != "seen_images"}, "provenance")  # digests, not text + _strings(default_manifest(folder), "default.json")
    texts.append(("MODEL_CARD.md", (folder / "MODEL_CARD.md").read_text(encoding="utf-8")))
    onnx = folder / str(default_manifest(folder)["onnx_file"])
    if importlib.util.find_spec("onnx") is not None:
        texts += [(f"onnx:{k}", v) for k, v in read_onnx_metadata(onnx).items()]
    found = [(w, m.group(0).strip()) for w, t in texts for m in _ABS_PATH.finditer(_URL.sub("", t))]
    assert not found, found[:5]


def test_shipped_default_is_small_and_sha256_verified() -> None:
    from pneumoscan.models.bundle import default_manifest, default_model_dir
    from pneumoscan.utils.io import sha256_file

    folder = default_model_dir()
    man = default_manifest(folder)
    pt = folder / str(man["file"])
    assert pt.stat().st_size <= 25 * 1024 * 1024
    assert sha256_file(pt) == man["sha256"]
    assert sha256_file(folder / str(man["onnx_file"])) == man["onnx_sha256"]
    assert sha256_file(folder / str(man["shift_file"])) == man["shift_sha256"]


@pytest.mark.parametrize("device_backend", ["onnx"])
def test_every_path_serves_the_default_model_alike(device_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Python API (PyTorch and ONNX), ``pneumoscan predict --format json`` and the service's
    ``/v1/predict`` give the same probabilities (1e-5) for the default model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    import json

    from fastapi.testclient import TestClient

    from pneumoscan.cli import main as cli_main
    from pneumoscan.serving import create_app

    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path))
    files = [SAMPLES / name for name in sorted(PINNED)]
    api = {b: {Path(p.path).name: p.probability for p in load_predictor(None, backend=b).predict_paths(files, guard=False)}
           for b in ("torch", device_backend)}
    capsys.readouterr()
    assert cli_main(["predict", *map(str, files), "--format", "json", "--no-guard"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out) if out.lstrip().startswith("[") else [json.loads(line) for line in out.splitlines() if line.strip()]
    cli = {Path(r["path"]).name: r["probability"] for r in rows}
    served = {}
    with TestClient(create_app(load_predictor(None)), base_url="http://127.0.0.1") as c:
        for f in files:
            r = c.post("/v1/predict?guard=false", files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
            assert r.status_code == 200, r.text[:300]
            served[f.name] = r.json()["probability"]
    for name in PINNED:
        ref = api["torch"][name]
        for where, probs in ((device_backend, api[device_backend]), ("cli", cli), ("service", served)):
            assert probs[name] == pytest.approx(ref, abs=1e-5), (where, name)


def test_default_model_recognises_its_own_training_images(tmp_path: Path) -> None:
    """The default model records the digests of the 5,216 images it was trained on: one of
    them, renamed, is answered with a warning; a bundled sample it never saw is not."""
    from pneumoscan.models.bundle import load_bundle
    from pneumoscan.models.seen import seen_images

    seen = seen_images(load_bundle(None))
    assert seen is not None and 5100 < seen.count("train") <= 5216  # distinct digests: the data holds a few duplicate files
    train_img = sorted((Path(__file__).resolve().parent / "fixtures" / "xray" / "train" / "NORMAL").iterdir())[0]
    renamed = tmp_path / "renamed.jpeg"
    renamed.write_bytes(train_img.read_bytes())
    unseen = SAMPLES / "NORMAL2-IM-1437-0001.jpeg"
    preds = list(load_predictor(None).predict_paths([renamed, unseen], guard=False))
    assert any("build this model" in w for w in preds[0].warnings), preds[0].warnings
    assert not any("build this model" in w for w in preds[1].warnings), preds[1].warnings
