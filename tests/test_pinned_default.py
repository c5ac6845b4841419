"""Behaviour pin: the shipped default model's probabilities on the committed sample X-rays.

Recorded from the PyTorch backend before the architecture refactor (issue 11); every backend
must keep reproducing them to 1e-6, so moving code around cannot silently change an answer.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscan.inference import load_predictor

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "assets" / "samples"

PINNED = {
    "NORMAL2-IM-1436-0001.dcm": (0.03704166036424629, "NORMAL"),
    "NORMAL2-IM-1437-0001.jpeg": (0.19235190437931723, "NORMAL"),
    "NORMAL2-IM-1438-0001.jpeg": (0.028696461976178072, "NORMAL"),
    "person1003_virus_1685.jpeg": (0.998821710032252, "PNEUMONIA"),
    "person1947_bacteria_4876.dcm": (0.9252836899661824, "PNEUMONIA"),
    "person1951_bacteria_4882.jpeg": (0.9107163919768907, "PNEUMONIA"),
}


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
