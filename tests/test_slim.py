"""The slim deployment (issue 16): ``pip install 'pneumoscan[serve]'`` predicts, explains and
serves without PyTorch.

Self-contained (no conftest fixtures), so that CI runs it in a second virtual environment
holding only the slim install plus pytest and httpx (``.ci/run``: ``pytest --noconftest``),
where ``import torch`` fails for real. In the full development environment the same command
checks run in subprocesses with PyTorch blocked (``sys.modules["torch"] = None``), and the tests
that need PyTorch show that the NumPy heat maps are Grad-CAM's (to 1e-4 on the bundled
samples) and which models qualify.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.errors import CheckpointError
from pneumoscan.inference import load_predictor
from pneumoscan.models import bundle as bundle_mod
from pneumoscan.models.bundle import default_manifest, default_model_dir

HAVE_TORCH = importlib.util.find_spec("torch") is not None
SAMPLES = Path(str(default_model_dir())).parent / "samples"
NEED_TORCH = "this command needs PyTorch: pip install 'pneumoscan[train]'"
#: The shipped default model's pinned answers (tests/test_pinned_default.py).
PINNED = {name: (float(v["probability"]), v["label"]) for name, v in json.loads(
    (Path(__file__).resolve().parent / "fixtures" / "pinned_default.json").read_text(encoding="utf-8"))["samples"].items()}
#: Run first in every subprocess: where PyTorch is installed, make it impossible to import.
NO_TORCH = "import sys; sys.modules.update(torch=None, torchvision=None)\n"


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PNEUMOSCAN_", "PYTEST_"))}
    env.update(PNEUMOSCAN_CACHE=str(tmp / "cache"), HOME=str(tmp), OMP_NUM_THREADS="2")
    return env


def _cli(tmp: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``pneumoscan ARGV`` in a fresh interpreter without PyTorch; stderr's last line is a JSON
    report of which heavy modules the command imported."""
    code = (
        NO_TORCH + "import json\nfrom pneumoscan.cli import main\n"
        f"rc = main({list(argv)!r})\n"
        "print(json.dumps({'rc': rc, 'mods': sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'sklearn', 'onnx') "
        "if sys.modules.get(m) is not None)}), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=_env(tmp), cwd=tmp)


def _report(p: subprocess.CompletedProcess[str]) -> tuple[dict, list[str]]:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return json.loads(lines[-1]), lines[:-1]


def _samples() -> list[Path]:
    return [SAMPLES / name for name in sorted(PINNED)]


# ----------------------------------------------------------------------------- without PyTorch
def test_torch_cannot_be_imported_there(tmp_path: Path) -> None:
    if not HAVE_TORCH:  # the slim environment itself
        with pytest.raises(ImportError):
            import torch  # noqa: F401
    p = subprocess.run([sys.executable, "-c", NO_TORCH + "import torch"], capture_output=True, text=True, env=_env(tmp_path))
    assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr


def test_shipped_onnx_is_listed_verified_and_explains() -> None:
    man = default_manifest()
    onnx_file = default_model_dir() / man["onnx_file"]
    assert onnx_file.is_file() and onnx_file.stat().st_size < 20_000_000
    p = load_predictor(None, backend="auto")
    assert p.backend == "onnx" and p.runner.path == onnx_file and p.bundle.state_dict is None
    # the same identity as the PyTorch backend: the .pt file's name, hash and card
    assert p.bundle.sha256 == man["sha256"] and p.bundle.path == default_model_dir() / man["file"]
    assert p.name == man["name"] and p.weights_id == man["sha256"][:12]
    assert p.runner.linear_head is not None and p.heatmap_layer() == "backbone.features.18"
    assert not p.torch_model.loaded


def test_shipped_onnx_must_match_its_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "default"
    shutil.copytree(default_model_dir(), copy)
    monkeypatch.setattr(bundle_mod, "default_model_dir", lambda: copy)
    onnx_file = copy / default_manifest(copy)["onnx_file"]
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_predictor(None, backend="onnx", cache=tmp_path / "cache")


def test_predict_with_heatmaps_without_torch(tmp_path: Path) -> None:
    heat = tmp_path / "heat"
    p = _cli(tmp_path, "-q", "predict", "--samples", "--format", "json", "--heatmap", str(heat))
    status, other = _report(p)
    assert status == {"rc": 0, "mods": []}, p.stderr
    assert not other, other  # no warning, no traceback
    got = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert sorted(Path(g["path"]).name for g in got) == sorted(PINNED)
    for g in got:
        prob, label = PINNED[Path(g["path"]).name]
        assert g["probability"] == pytest.approx(prob, abs=1e-6) and g["label"] == label
        png = Path(g["heatmap_file"])
        assert png.parent == heat and png.is_file()
        with Image.open(png) as im:
            assert im.mode == "RGB" and min(im.size) > 224  # at the original resolution


def test_serve_page_api_and_heatmaps_without_torch(tmp_path: Path) -> None:
    code = NO_TORCH + "from pneumoscan.cli import main\nsys.exit(main(['-q', 'serve', '--host', '127.0.0.1', '--port', '0']))\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), cwd=tmp_path)
    try:
        line = proc.stdout.readline()  # "pneumoscan: serving NAME on http://127.0.0.1:PORT/ ..."
        assert "serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split(" on ")[1].split()[0].rstrip("/")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no /healthz answer"
                time.sleep(0.2)
        with urllib.request.urlopen(base + "/", timeout=30) as r:
            assert r.status == 200 and "text/html" in r.headers["content-type"]
        with urllib.request.urlopen(base + "/v1/model", timeout=30) as r:
            info = json.loads(r.read())
        assert info["capabilities"]["heatmap"] is True and info["sha256"] == default_manifest()["sha256"]
        f = SAMPLES / "person1003_virus_1685.jpeg"
        boundary = "pneumoscan-test-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{f.name}\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + f.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(base + "/v1/predict?heatmap=true", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            ans = json.loads(r.read())
        assert ans["label"] == "PNEUMONIA" and ans["probability"] == pytest.approx(PINNED[f.name][0], abs=1e-4)
        png = Image.open(io.BytesIO(base64.b64decode(ans["heatmap"]["png_base64"])))
        assert png.mode == "RGBA" and ans["heatmap"]["layer"] == "backbone.features.18"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("argv", [
    ("train", "--data", "data"), ("export", "--out", "m.onnx"), ("benchmark", "train", "--data", "data"),
])
def test_torch_commands_say_what_to_install(tmp_path: Path, argv: tuple[str, ...]) -> None:
    p = _cli(tmp_path, *argv)
    status, lines = _report(p)
    assert status["rc"] == 2 and lines == [NEED_TORCH], p.stderr
    assert "Traceback" not in p.stderr


def test_a_pt_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    pt = default_model_dir() / default_manifest()["file"]
    p = _cli(tmp_path, "predict", "--checkpoint", str(pt), str(_samples()[1]))
    status, lines = _report(p)
    assert status["rc"] == 1 and len(lines) == 1 and "pip install 'pneumoscan[train]'" in lines[0] and "--onnx" in lines[0]


# ----------------------------------------------------------------------------- with PyTorch
@pytest.mark.skipif(not HAVE_TORCH, reason="compares with PyTorch Grad-CAM")
def test_numpy_heatmaps_equal_pytorch_gradcam_on_the_samples(tmp_path: Path) -> None:
    from pneumoscan.data.io import read_image

    onnx_p = load_predictor(None, backend="onnx", cache=tmp_path)
    torch_p = load_predictor(None, backend="torch")
    images = [read_image(f) for f in _samples()]
    for target in ("predicted", "pneumonia", "normal"):
        got = onnx_p.explain_arrays(images, target=target)
        ref = torch_p.explain_arrays(images, target=target)
        for g, r, im in zip(got, ref, images):
            assert g.shape == r.shape == im.shape and g.dtype == np.float32
            assert float(np.max(np.abs(g - r))) < 1e-4, target
            assert g.min() >= 0.0 and (g.max() > 0.99 or target != "predicted")  # [0, 1]; the prediction has evidence
    assert not onnx_p.torch_model.loaded  # the maps came from onnxruntime's feature maps
    pred = onnx_p.predict_image(_samples()[3], heatmap=True)
    assert pred.heatmap is not None and not onnx_p.torch_model.loaded


@pytest.mark.skipif(not HAVE_TORCH, reason="builds PyTorch models")
def test_which_heads_are_explained_without_torch() -> None:
    import torch

    from pneumoscan.explain import GradCAM, linear_head, linear_head_maps
    from pneumoscan.models import create_model, get_spec

    torch.manual_seed(0)
    for name, expected in (("mobilenet_v2", True), ("resnet18", True), ("densenet121", False), ("seed_cnn", False)):
        model = create_model(name, weights=None).eval()
        size = get_spec(name).input_size
        head = linear_head(model, size)
        assert (head is not None) == expected, name
        if head is None:
            continue
        assert head.layer == get_spec(name).gradcam_layer
        x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(1))
        feats: list[torch.Tensor] = []
        handle = dict(model.named_modules())[head.layer].register_forward_hook(lambda _m, _i, o: feats.append(o.detach()))
        with torch.no_grad():
            logits = model(x).reshape(-1)
        handle.remove()
        ref = GradCAM(model, target="pneumonia").compute(x)[0][:, 0].numpy()
        got = linear_head_maps(feats[0].numpy(), head, logits.numpy(), target="pneumonia", size=(size, size))
        assert float(np.max(np.abs(got - ref))) < 1e-4, name
