"""The PyTorch-free prediction path: ``pneumoscan predict`` with a cached ONNX export starts
without importing PyTorch, answers like the PyTorch backend, loads the PyTorch model only for
Grad-CAM, and ignores cache entries that do not belong to the checkpoint. Also the NumPy /
Pillow preprocessing and TTA against PyTorch's antialiased resize, and onnxruntime's
batch-parallel lanes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoscan.data.io import read_image
from pneumoscan.data.preprocessing import preprocess_arrays
from pneumoscan.data.transforms import preprocess_batch
from pneumoscan.inference import load_predictor
from pneumoscan.inference.tta import make_views
from pneumoscan.utils.io import sha256_file

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pneumoscan.inference.onnx_cache import export_dir, open_cached_export  # noqa: E402
from pneumoscan.inference.runners import OnnxRunner, plan_threads  # noqa: E402
from pneumoscan.models.bundle import bundle_ref  # noqa: E402

REPO_SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def cache(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the tiny run's ONNX export (made through the PyTorch path)."""
    d = tmp_path_factory.mktemp("cache")
    p = load_predictor(tiny_run, backend="onnx", cache=d)
    assert p.runner.path.parent == export_dir(d) and p.bundle.state_dict is not None  # exported now
    return d


def _images(xray_dir: Path, fullres_dir: Path) -> list[str]:
    return [str(p) for p in sorted((xray_dir / "val").rglob("*.jpeg"))] + [str(p) for p in sorted(fullres_dir.glob("*.jpeg"))]


def test_predict_with_cached_export_never_imports_torch(tiny_run: Path, cache: Path, xray_dir: Path, fullres_dir: Path) -> None:
    paths = _images(xray_dir, fullres_dir)
    code = (
        "import json, sys\n"
        "from pneumoscan.cli import main\n"
        f"rc = main(['-q', 'predict', '--checkpoint', {str(tiny_run)!r}, '--format', 'json', *{paths!r}])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'torchvision': 'torchvision' in sys.modules}), file=sys.stderr)\n"
    )
    env = {"PNEUMOSCAN_CACHE": str(cache), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_SRC), "HOME": str(cache)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    status = json.loads(p.stderr.strip().splitlines()[-1])
    assert status == {"rc": 0, "torch": False, "torchvision": False}, p.stderr
    got = [json.loads(ln) for ln in p.stdout.splitlines()]
    ref = list(load_predictor(tiny_run, backend="torch").predict_paths(paths))
    assert [g["path"] for g in got] == paths
    assert np.max(np.abs(np.array([g["probability"] for g in got]) - np.array([r.probability for r in ref]))) < 1e-4
    assert [g["label"] for g in got] == [r.label for r in ref]
    assert {g["weights"] for g in got} == {sha256_file(tiny_run / "best.pt")[:12]}


def test_cached_predictor_loads_torch_model_only_for_gradcam(tiny_run: Path, cache: Path, fullres_dir: Path) -> None:
    p = load_predictor(tiny_run, backend="onnx", cache=cache)
    assert p.backend == "onnx" and p.bundle.state_dict is None  # the fast path: described by the export's metadata
    assert p.bundle.sha256 == sha256_file(tiny_run / "best.pt") and p.bundle.path == tiny_run / "best.pt"
    assert p.torch_model.available and not p.torch_model.loaded  # nothing loaded yet
    img = read_image(next(fullres_dir.glob("*.jpeg")))
    cam = p.explain(img)
    assert p.torch_model.loaded
    ref = load_predictor(tiny_run, backend="torch").explain(img)
    assert cam.shape == img.shape and np.allclose(cam, ref, atol=1e-5)


def test_cache_entries_must_match_the_checkpoint(tiny_run: Path, cache: Path, tmp_path: Path) -> None:
    sha = bundle_ref(tiny_run).sha256
    assert sha == sha256_file(tiny_run / "best.pt") == bundle_ref(tiny_run / "best.pt").sha256
    # another checkpoint (a copy with one byte of difference) finds no export
    other = tmp_path / "other.pt"
    shutil.copyfile(tiny_run / "best.pt", other)
    with other.open("ab") as fh:
        fh.write(b"\0")
    assert open_cached_export(other, cache=cache) is None
    # a file named like the export but not carrying the checkpoint's hash is ignored
    fake = tmp_path / "fake"
    target = export_dir(fake) / f"x-{bundle_ref(other).sha256[:16]}.onnx"
    target.parent.mkdir(parents=True)
    shutil.copyfile(next(export_dir(cache).glob("*.onnx")), target)
    (target.parent / f"y-{bundle_ref(other).sha256[:16]}.onnx").write_bytes(b"garbage")
    assert open_cached_export(other, cache=fake) is None
    # with no cache the regular path exports once and the next load is the fast one
    assert open_cached_export(tiny_run, cache=tmp_path / "empty") is None
    assert isinstance(load_predictor(tiny_run, backend="onnx", cache=tmp_path / "empty").runner, OnnxRunner)
    assert open_cached_export(tiny_run, cache=tmp_path / "empty") is not None


def test_lanes_give_the_same_logits(cache: Path, xray_dir: Path) -> None:
    f = next(export_dir(cache).glob("*.onnx"))
    imgs = [read_image(p) for p in sorted(xray_dir.rglob("*.jpeg"))[:11]]
    one = load_predictor(onnx=f, threads=1, batch_size=11)
    four = load_predictor(onnx=f, threads=4, lanes=4, batch_size=11)
    assert one.runner.lanes == 1 and four.runner.lanes == 4
    assert np.allclose(one.probabilities(imgs), four.probabilities(imgs), atol=1e-6)
    assert plan_threads(2) == (2, 1) and plan_threads(16) == (4, 4) and plan_threads(8, 1) == (1, 8) and plan_threads(1, 3) == (1, 1)


def _torch_resize(a: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0].clamp(0, 1).numpy()


def test_numpy_preprocessing_matches_torch(xray_dir: Path, fullres_dir: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [read_image(p) for p in _images(xray_dir, fullres_dir)]
    arrays += [rng.random((37, 53), dtype=np.float32), rng.random((300, 500), dtype=np.float32), np.full((5, 5), 0.3, np.float32)]
    for size in (128, 224):
        got = preprocess_arrays(arrays, size)
        ref = preprocess_batch(arrays, size).numpy()
        assert got.shape == ref.shape == (len(arrays), 1, size, size) and got.dtype == np.float32
        assert np.max(np.abs(got - ref)) < 2e-5
    u8 = (rng.random((64, 80)) * 255).astype(np.uint8)
    assert np.max(np.abs(preprocess_arrays([u8], 32) - preprocess_batch([torch.from_numpy(u8)], 32).numpy())) < 2e-5
    bad = np.array([[np.nan, np.inf], [-np.inf, 2.0]], dtype=np.float32)
    assert np.array_equal(preprocess_arrays([bad], 2)[0, 0], np.array([[0, 1], [0, 1]], dtype=np.float32))


def test_tta_views_match_torch(xray_dir: Path) -> None:
    batch = preprocess_arrays([read_image(p) for p in sorted(xray_dir.rglob("*.jpeg"))[:3]], 64)
    views = make_views(batch, "crops")
    assert views.shape == (12, 1, 64, 64)
    t = torch.from_numpy(batch)
    c = max(1, round(64 * 0.9))
    o = (64 - c) // 2
    crop = F.interpolate(t[..., o:o + c, o:o + c], size=(64, 64), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    ref = torch.cat([t, t.flip(-1), crop, crop.flip(-1)]).numpy()
    assert np.max(np.abs(views - ref)) < 2e-5
    assert np.array_equal(make_views(batch, "flip")[3:], batch[..., ::-1])


def test_import_pneumoscan_is_lazy() -> None:
    code = (
        "import sys, pneumoscan, pneumoscan.data, pneumoscan.inference, pneumoscan.cli\n"
        "pneumoscan.cli.build_parser()\n"
        "before = 'torch' in sys.modules\n"
        "m = pneumoscan.create_model('seed_cnn')\n"
        "print(before, 'torch' in sys.modules, type(m).__name__, pneumoscan.data.Preprocessing.__name__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO_SRC), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    before, after, name, pre = p.stdout.split()
    assert (before, after, pre) == ("False", "True", "Preprocessing") and name
    with pytest.raises(AttributeError):
        import pneumoscan

        pneumoscan.no_such_name  # noqa: B018


def test_service_on_the_onnx_backend_still_explains(tiny_run: Path, cache: Path, xray_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pneumoscan.serving.app import create_app

    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(cache))
    pred = load_predictor(tiny_run, backend="auto")
    assert pred.backend == "onnx"
    path = sorted((xray_dir / "val").glob("*/*.jpeg"))[0]
    ref = load_predictor(tiny_run, backend="torch").predict_image(path)
    with TestClient(create_app(load_predictor(tiny_run, backend="torch")), base_url="http://127.0.0.1") as c:
        info_torch = c.get("/v1/model").json()
    with TestClient(create_app(pred), base_url="http://127.0.0.1") as c:
        info = c.get("/v1/model").json()
        r = c.post("/v1/predict?heatmap=true", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert info["capabilities"]["heatmap"] is True
    # the model description does not depend on the backend (name, hashes, operating point, card)
    for key in ("name", "weight_id", "sha256", "model_name", "input_size", "operating_point", "val_metrics", "class_names", "model_card"):
        assert info.get(key) == info_torch.get(key), key
    assert info["sha256"] == sha256_file(tiny_run / "best.pt") and info["model_card"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["probability"] - ref.probability) < 1e-4 and body["label"] == ref.label
    assert body["heatmap"]["method"] == "grad-cam"


def test_serve_cli_backend_flag() -> None:
    from pneumoscan.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).backend == "auto"
    assert parser.parse_args(["serve", "--backend", "onnx"]).backend == "onnx"


@pytest.mark.parametrize("argv, started", [
    (["-q", "predict", "x.png"], True),
    (["predict", "--decode-timeout", "0", "x.png"], False),
    (["predict", "--decode-timeout=0", "x.png"], False),
    (["predict", "--help"], False),
    (["models"], False),
])
def test_predict_starts_the_decoders_forkserver_before_the_parser(argv: list[str], started: bool) -> None:
    """``pneumoscan predict`` starts the decoding workers' forkserver first thing (its imports run
    beside the command's own), and nothing else does; the server preloads the reader and the guard
    without this process importing NumPy for it."""
    code = (
        "import sys, multiprocessing.forkserver as fs\n"
        "from pneumoscan.cli import _early_start\n"
        f"_early_start({argv!r})\n"
        "print(fs._forkserver._forkserver_pid is not None, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out[0] == str(started)
    assert out[1] == "False"  # the early start itself imports no NumPy
