"""Ensembles (``pneumoscan ensemble``): the mean of the members' logits through every backend,
one bundle that round-trips and validates, Grad-CAM as the mean of the members' maps (PyTorch
and, for pooled linear heads, NumPy from one ONNX graph), out-of-fold calibration from a
cross-validation's ``cv/oof.csv``, and the commands that take the bundle."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from pneumoscan.core.calibration import fit_operating_point
from pneumoscan.data.io import read_image
from pneumoscan.errors import CheckpointError, ConfigError, DataError, ModelError
from pneumoscan.explain import GradCAM
from pneumoscan.inference import load_predictor
from pneumoscan.models import registry
from pneumoscan.models.bundle import ModelBundle, load_bundle, save_bundle
from pneumoscan.models.ensemble import ENSEMBLE_ARCH, EnsembleNet
from pneumoscan.models.factory import create_model
from pneumoscan.models.validation import validate_bundle
from pneumoscan.workflows.ensemble import make_ensemble

pytest.importorskip("onnxruntime")


def _perturbed_copy(run: Path, dest: Path, seed: int) -> Path:
    """A copy of a run whose head weights are changed (another model of the same recipe)."""
    shutil.copytree(run, dest)
    b = load_bundle(dest / "best.pt")
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if k.startswith("head.") and v.is_floating_point() else v)
          for k, v in b.state_dict.items()}
    save_bundle(b.replace(state_dict=sd), dest / "best.pt")
    return dest


@pytest.fixture(scope="module")
def members(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two seed_cnn runs: the session's tiny run and a perturbed copy of it."""
    root = tmp_path_factory.mktemp("members")
    return [tiny_run, _perturbed_copy(tiny_run, root / "other", seed=1)]


@pytest.fixture(scope="module")
def ensemble(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_ensemble(members, tmp_path_factory.mktemp("ens") / "ens.pt", calibrate="member")["path"])


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the module (the ensemble is exported once)."""
    return tmp_path_factory.mktemp("onnx_cache")


def _images(xray_dir: Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((xray_dir / "val").rglob("*.jpeg"))]


def test_logits_are_the_mean_of_the_members_on_torch_and_onnx(ensemble: Path, members: list[Path], xray_dir: Path,
                                                               onnx_cache: Path) -> None:
    imgs = _images(xray_dir)
    singles = [load_predictor(m, backend="torch", guard=False) for m in members]
    batch = singles[0].preprocess(imgs)
    expected = np.mean([p.logits(batch) for p in singles], axis=0)
    for backend in ("torch", "onnx"):
        p = load_predictor(ensemble, backend=backend, guard=False, cache=onnx_cache)
        assert p.backend == backend and p.bundle.arch == ENSEMBLE_ARCH
        np.testing.assert_allclose(p.logits(p.preprocess(imgs)), expected, rtol=0, atol=1e-5, err_msg=backend)
    onnx_files = list(onnx_cache.rglob("*.onnx"))
    assert len(onnx_files) == 1  # one graph for the whole ensemble
    # kept member 0's calibration (no data to fit it on), and said so in the provenance
    b, m0 = load_bundle(ensemble), load_bundle(members[0])
    assert (b.temperature, b.threshold, b.threshold_method) == (m0.temperature, m0.threshold, m0.threshold_method)
    assert b.provenance["calibration"]["source"] == "member-0"


def test_bundle_round_trips_and_validates(ensemble: Path, members: list[Path], tmp_path: Path) -> None:
    b = load_bundle(ensemble)
    validate_bundle(b, str(ensemble))
    assert b.arch_kwargs == {"members": [{"arch": "seed_cnn", "arch_kwargs": {"input_size": 128}}] * 2}
    assert all(k.startswith(("members.0.", "members.1.")) for k in b.state_dict)
    subs = [load_bundle(m) for m in members]
    assert [m["sha256"] for m in b.provenance["ensemble"]["members"]] == [s.sha256 for s in subs]
    assert b.input_size == 128 and b.preprocessing == subs[0].preprocessing
    copy = tmp_path / "copy.pt"
    save_bundle(b.replace(), copy)
    again = load_bundle(copy)
    assert again.info() | {"sha256": ""} == b.info() | {"sha256": ""}
    assert all(torch.equal(again.state_dict[k], v) for k, v in b.state_dict.items())
    assert ModelBundle.from_info(json.loads(json.dumps(b.info()))).arch_kwargs == b.arch_kwargs  # the ONNX metadata form
    net = again.build_model()
    assert isinstance(net, EnsembleNet) and net.gradcam_layers == ("members.0.backbone.4.2", "members.1.backbone.4.2")
    with pytest.raises(ModelError, match="only members"):
        create_model(ENSEMBLE_ARCH, weights="imagenet", members=b.arch_kwargs["members"])
    with pytest.raises(ModelError, match="itself an ensemble"):
        create_model(ENSEMBLE_ARCH, members=[{"arch": ENSEMBLE_ARCH, "arch_kwargs": {}}])


def test_gradcam_is_the_mean_of_the_members_maps(ensemble: Path, members: list[Path], xray_dir: Path) -> None:
    net = load_bundle(ensemble).build_model()
    subs = [load_bundle(m).build_model() for m in members]
    x = torch.from_numpy(load_predictor(ensemble, backend="torch", guard=False).preprocess(_images(xray_dir)[:3]))
    for target in ("pneumonia", "normal"):
        got = GradCAM(net, target=target)(x)
        maps = [GradCAM(m, target=target)(x) for m in subs]
        assert float((maps[0] - maps[1]).abs().max()) > 0.05  # the members disagree: the mean is not either map
        assert float((got - torch.stack(maps).mean(dim=0)).abs().max()) < 1e-5, target
    # through the predictor (explaining the ensemble's predicted class), at the image's resolution
    p = load_predictor(ensemble, backend="torch", guard=False)
    img = _images(xray_dir)[0]
    cam = p.explain(img)
    assert cam.shape == img.shape and 0.0 <= cam.min() and cam.max() <= 1.0
    assert p.heatmap_layer() == "members.0.backbone.4.2,members.1.backbone.4.2"
    one = p.explain(img, layer="members.1.backbone.4.2")  # one member's layer alone
    assert one.shape == img.shape and not np.allclose(one, cam)


def _gap_net(weights: str | None = None, input_size: int = 32, **_: object) -> nn.Module:
    """A tiny network with a pooled linear head (its maps need no PyTorch)."""
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1))
    return registry.XrayClassifier(registry.InputAdapter((0.5,), (0.25,)), backbone, head)


def test_numpy_maps_of_an_ensemble_export_equal_pytorch_gradcam(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 xray_dir: Path) -> None:
    spec = registry.ModelSpec("gap_test", _gap_net, 32, 1, (0.5,), (0.25,), "backbone.2")
    monkeypatch.setitem(registry._REGISTRY, "gap_test", spec)  # noqa: SLF001 - a test-only architecture
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("gap_test")
        b = ModelBundle(arch="gap_test", preprocessing=spec.preprocessing(), state_dict=m.state_dict(), arch_kwargs={"input_size": 32})
        save_bundle(b, tmp_path / f"m{seed}.pt")
        runs.append(tmp_path / f"m{seed}.pt")
    ens = Path(make_ensemble(runs, tmp_path / "gap_ens", calibrate="member", card=False)["path"])
    assert ens == tmp_path / "gap_ens" / "best.pt"
    from pneumoscan.inference.onnx_export import export_onnx, read_onnx_metadata

    onnx_file = export_onnx(ens, tmp_path / "gap_ens.onnx")
    heads = json.loads(read_onnx_metadata(onnx_file)["pneumoscan.cam"])
    assert [h["layer"] for h in heads] == ["members.0.backbone.2", "members.1.backbone.2"]
    onnx_p = load_predictor(onnx=onnx_file, guard=False)
    torch_p = load_predictor(ens, backend="torch", guard=False)
    assert onnx_p.runner.feature_names == ["features_0", "features_1"] and onnx_p.runner.linear_head is None
    assert onnx_p.heatmap_layer() == torch_p.heatmap_layer() == "members.0.backbone.2,members.1.backbone.2"
    imgs = _images(xray_dir)[:3]
    for target in ("predicted", "pneumonia"):
        a = onnx_p.explain_arrays(imgs, target=target)
        b = torch_p.explain_arrays(imgs, target=target)
        assert max(float(np.abs(u - v).max()) for u, v in zip(a, b)) < 1e-4, target
    assert not onnx_p.torch_model.loaded  # the maps came from onnxruntime's feature outputs


def _fake_cv(members: list[Path], root: Path) -> Path:
    """A cross-validation directory whose folds are the members, with the ``cv/oof.csv`` the CV
    summary writes (each fold's stored validation logits)."""
    rows = []
    for k, m in enumerate(members, start=1):
        shutil.copytree(m, root / f"fold-{k}")
        b = load_bundle(root / f"fold-{k}" / "best.pt")
        for i, (z, y) in enumerate(zip(b.provenance["val_logits"], b.provenance["val_labels"])):
            rows.append([f"img{k}-{i}.jpeg", f"p{k}-{i}", y, k, f"{z:.6g}", "0.5"])
    (root / "cv").mkdir()
    with open(root / "cv" / "oof.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "patient", "label", "fold", "logit", "probability"])
        w.writerows(rows)
    return root


def test_oof_calibration_uses_the_cross_validation(members: list[Path], tmp_path: Path) -> None:
    cv = _fake_cv(members, tmp_path / "cv_run")
    r = make_ensemble([cv], tmp_path / "ens.pt", method="sensitivity", target=0.9)  # the CV directory: all its folds
    cal = r["calibration"]
    assert cal["source"] == "cv-oof" and cal["folds"] == [1, 2] and "out-of-fold" in cal["note"]
    with open(cv / "cv" / "oof.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    op = fit_operating_point([float(x["logit"]) for x in rows], [int(x["label"]) for x in rows], "sensitivity", 0.9)
    b = load_bundle(r["path"])
    assert cal["n"] == len(rows) == len(b.provenance["val_logits"])
    assert b.temperature == pytest.approx(op.temperature) and b.threshold == pytest.approx(op.threshold)
    assert b.threshold_method == "sensitivity" and b.provenance["val_logits_source"] == "cv-oof"
    card = Path(r["model_card"]).read_text(encoding="utf-8")
    assert "ensemble" in card and "out-of-fold" in card
    # an oof.csv that is not the folds' (a fold retrained since) is refused
    (cv / "cv" / "oof.csv").write_text("path,patient,label,fold,logit,probability\na,b,1,1,9.5,0.9\nc,d,0,2,-9.5,0.1\n", encoding="utf-8")
    with pytest.raises(DataError, match="fold-1"):
        make_ensemble([cv / "fold-1", cv / "fold-2"], tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="oof"):
        make_ensemble(members, tmp_path / "no.pt", calibrate="oof")
    (cv / "fold-3").mkdir()  # an unfinished fold
    with pytest.raises(CheckpointError, match="fold-3 has no best.pt"):
        make_ensemble([cv], tmp_path / "unfinished.pt")


def test_cli_ensemble_then_predict_evaluate_export(cli: Callable, members: list[Path], xray_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    ens = tmp_path / "ens.pt"
    res = cli("ensemble", *members, "--out", ens, "--calibrate", xray_dir / "val", "--method", "youden")
    assert res.code == 0, res.err
    assert "calibrated on 8 images" in res.out and ens.is_file() and (tmp_path / "ens.MODEL_CARD.md").is_file()
    assert load_bundle(ens).provenance["calibration"]["source"] == "folder"
    res = cli("predict", "--checkpoint", ens, "--backend", "torch", "--format", "json", "--no-guard", xray_dir / "val")
    assert res.code == 0, res.err
    answers = [json.loads(ln) for ln in res.out.splitlines()]
    assert len(answers) == 8 and all(a["model"].startswith("ensemble2-seed_cnn-res128") for a in answers)
    res = cli("evaluate", "--data", xray_dir, "--split", "val", "--checkpoint", ens, "--out", tmp_path / "report",
              "--bootstrap", "100", "--no-summary", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["at_operating_threshold"]["n"] == 8
    res = cli("export", "--checkpoint", ens, "--out", tmp_path / "ens.onnx", "--exporter", "legacy")  # (the faster exporter)
    assert res.code == 0 and (tmp_path / "ens.onnx").is_file(), res.err
    onnx_p = load_predictor(onnx=tmp_path / "ens.onnx", guard=False)
    torch_p = load_predictor(ens, backend="torch", guard=False)
    imgs = _images(xray_dir)
    np.testing.assert_allclose(onnx_p.logits(onnx_p.preprocess(imgs)), torch_p.logits(torch_p.preprocess(imgs)), atol=1e-5)


def test_serve_answers_with_the_ensemble(ensemble: Path, xray_dir: Path, onnx_cache: Path) -> None:
    from fastapi.testclient import TestClient

    from pneumoscan.serving import create_app

    p = load_predictor(ensemble, guard=False, cache=onnx_cache)  # the default backend: its cached ONNX export
    assert p.backend == "onnx"
    path = sorted((xray_dir / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    with TestClient(create_app(p), base_url="http://127.0.0.1") as c:
        assert c.get("/v1/model").json()["model_name"] == ENSEMBLE_ARCH
        body = c.post("/v1/predict?heatmap=true", files={"file": (path.name, path.read_bytes(), "image/jpeg")}).json()
    assert body["probability"] == pytest.approx(p.predict_image(path).probability, abs=1e-6)
    assert body["heatmap"] is not None


def test_members_of_different_input_sizes_are_refused_in_one_line(cli: Callable, members: list[Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = create_model("seed_cnn", input_size=64)
    b = ModelBundle(arch="seed_cnn", preprocessing=registry._REGISTRY["seed_cnn"].preprocessing(64),  # noqa: SLF001
                    state_dict=small.state_dict(), arch_kwargs={"input_size": 64})
    save_bundle(b, tmp_path / "small.pt")
    res = cli("ensemble", members[0], tmp_path / "small.pt", "--out", tmp_path / "mixed.pt")
    assert res.code == 1 and len(res.err_lines) == 1, res.err
    assert "input size" in res.err and "128 px" in res.err and "64 px" in res.err
    assert not (tmp_path / "mixed.pt").exists()
    res = cli("ensemble", members[0], "--out", tmp_path / "one.pt")
    assert res.code == 1 and "at least two" in res.err
