"""Patient-grouped k-fold cross-validation (``pneumoscan train --folds K``), shifted validation
in every run's history, the robustness augmentations and EMA weights."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest
import torch

from pneumoscan.config import AugmentConfig, TrainConfig
from pneumoscan.data.datasets import Sample, load_samples, read_manifest
from pneumoscan.data.splits import fold_source, grouped_stratified_kfold, parse_fold_source
from pneumoscan.errors import ConfigError, DataError
from pneumoscan.models.bundle import load_bundle

if TYPE_CHECKING:
    from conftest import CliResult

TINY = ["--model", "seed_cnn", "--epochs", "1", "--batch-size", "8", "--input-size", "64", "--no-progress", "--seed", "0"]
SHIFT_COLUMNS = ("val_shift_auc", "val_shift_loss", "val_shift_dprob")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the k-fold splitter
def _cohort(n_patients: int = 300, seed: int = 0) -> list[Sample]:
    """Patients with 1-5 images, about a quarter NORMAL, a few with images of both classes."""
    rng = random.Random(seed)
    out = []
    for p in range(n_patients):
        label = int(rng.random() > 0.27)
        for j in range(rng.randint(1, 5)):
            flip = rng.random() < 0.03
            out.append(Sample(f"/data/p{p}_{j}.jpeg", 1 - label if flip else label, f"p{p}"))
    return out


@pytest.mark.parametrize("k", [2, 5, 10])
def test_kfold_keeps_patients_whole_covers_every_image_once_and_stratifies(k: int) -> None:
    samples = _cohort()
    folds = grouped_stratified_kfold(samples, k, seed=3)
    assert len(folds) == k
    flat = [s for f in folds for s in f]
    assert sorted(flat, key=lambda s: s.path) == sorted(samples, key=lambda s: s.path)  # every image exactly once
    owner: dict[str, int] = {}
    for i, f in enumerate(folds):
        for s in f:
            assert owner.setdefault(s.patient, i) == i, f"patient {s.patient} is in folds {owner[s.patient]} and {i}"
    share = sum(s.label for s in samples) / len(samples)
    for f in folds:
        assert abs(sum(s.label for s in f) / len(f) - share) < 0.02
        assert abs(len(f) - len(samples) / k) <= 0.1 * len(samples) / k + 5
        assert [s for s in samples if s in set(f)] == f  # input order within a fold


def test_kfold_is_deterministic_and_seeded() -> None:
    samples = _cohort()
    a = grouped_stratified_kfold(samples, 5, seed=1)
    assert grouped_stratified_kfold(samples, 5, seed=1) == a
    assert grouped_stratified_kfold(list(samples), 5, seed=2) != a


def test_kfold_refuses_too_few_folds_or_patients() -> None:
    samples = _cohort(40)
    with pytest.raises(DataError, match="at least 2 folds"):
        grouped_stratified_kfold(samples, 1)
    with pytest.raises(DataError, match="patient"):
        grouped_stratified_kfold(samples, 39)


def test_fold_source_round_trip() -> None:
    assert parse_fold_source(fold_source(2, 5)) == (2, 5)
    assert parse_fold_source("grouped") is None and parse_fold_source("/a/b.csv") is None
    for bad in ("fold:0/5", "fold:6/5", "fold:1/1", "fold:x"):
        with pytest.raises(DataError, match="fold:I/K"):
            parse_fold_source(bad)


# ----------------------------------------------------------------------------- augmentations
ROBUSTNESS = {"gamma": 0.5, "equalize": 1.0, "autocontrast": 1.0, "blur": 1.0, "sharpen": 1.0, "noise": 0.05, "letterbox": 1.0, "jpeg": 1.0}


def _xray_like(h: int = 70, w: int = 90) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(30, 220, w).expand(h, w)
    return (ramp + torch.randn(h, w, generator=g) * 10).clamp(0, 255).to(torch.uint8).unsqueeze(0)


def test_robustness_augmentations_are_off_by_default() -> None:
    from pneumoscan.data.transforms import robustness_ops

    assert robustness_ops(AugmentConfig()) == []


@pytest.mark.parametrize("field", sorted(ROBUSTNESS))
def test_each_robustness_augmentation_keeps_uint8_shape(field: str) -> None:
    from pneumoscan.data.transforms import robustness_ops

    ops = robustness_ops(AugmentConfig(**{field: ROBUSTNESS[field]}))
    assert len(ops) == 1
    x = _xray_like()
    torch.manual_seed(0)
    outs = [ops[0](x) for _ in range(4)]
    for y in outs:
        assert y.dtype == torch.uint8 and y.shape == x.shape
    assert x.equal(_xray_like()), "the input must not be changed in place"
    assert any(not y.equal(x) for y in outs), f"{field} never changed the image"


def test_all_augmentations_together_give_the_model_input() -> None:
    from pneumoscan.data.transforms import build_train_transform

    t = build_train_transform(64, AugmentConfig(**ROBUSTNESS))
    for _ in range(3):
        y = t(_xray_like())
        assert y.dtype == torch.float32 and y.shape == (1, 64, 64) and 0.0 <= float(y.min()) <= float(y.max()) <= 1.0


def test_letterbox_adds_black_bars_and_keeps_the_size() -> None:
    from pneumoscan.data.transforms import letterbox

    x = torch.full((1, 60, 60), 200, dtype=torch.uint8)
    y = letterbox(x, 4 / 3, "width")
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert int(y[0, :, 0].max()) < 20 and int(y[0, :, -1].max()) < 20 and int(y[0, 30, 30]) == 200
    z = letterbox(x, 4 / 3, "height", offset=0.0)
    assert int(z[0, -1, :].max()) < 20 and int(z[0, 0, 30]) == 200


def test_shift_perturbations_keep_uint8_shape() -> None:
    from pneumoscan.training.shifted_val import SHIFTS

    x = _xray_like(64, 64)
    g = torch.Generator().manual_seed(0)
    for name, fn in SHIFTS.items():
        y = fn(x, g)
        assert y.dtype == torch.uint8 and y.shape == x.shape, name
        assert not y.equal(x), f"{name} did nothing"


@pytest.mark.parametrize("key, value", [("augment.jpeg", 1.5), ("augment.jpeg_quality", "[90, 30]"), ("ema_decay", 1.0),
                                        ("shift_val_images", -1), ("augment.noise", 1.0)])
def test_bad_robustness_settings_are_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError):
        TrainConfig().override({key: value}).validate()


# ----------------------------------------------------------------------------- pneumoscan train --folds
@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory, xray_dir: Path) -> Path:
    """``pneumoscan train --folds 2`` on the fixture images, once for this module."""
    from conftest import run_cli_in_process

    out = tmp_path_factory.mktemp("cv") / "cv"
    assert run_cli_in_process(["train", "--folds", "2", "--data", str(xray_dir), *TINY, "--out", str(out)]) == 0
    return out


def test_folds_flag_defaults_to_five() -> None:
    from pneumoscan.cli import build_parser

    assert build_parser().parse_args(["train", "--folds"]).folds == 5
    assert build_parser().parse_args(["train", "--folds", "3"]).folds == 3
    assert build_parser().parse_args(["train"]).folds is None


def test_cv_writes_fold_runs_and_out_of_fold_predictions(cv_run: Path, xray_dir: Path) -> None:
    for k in (1, 2):
        run = cv_run / f"fold-{k}"
        for name in ("best.pt", "last.pt", "history.csv", "config.yaml", "split_val.csv", "MODEL_CARD.md"):
            assert (run / name).is_file(), f"{run / name}"
        assert TrainConfig.from_yaml(run / "config.yaml").data.val_source == f"fold:{k}/2"
        train = {s.patient for s in read_manifest(run / "split_train.csv")}
        assert not train & {s.patient for s in read_manifest(run / "split_val.csv")}
    oof = _rows(cv_run / "cv" / "oof.csv")
    assert list(oof[0]) == ["path", "patient", "label", "fold", "logit", "probability"]
    everything = sorted(str(Path(s.path).resolve()) for s in load_samples(xray_dir, "train"))
    assert sorted(r["path"] for r in oof) == everything  # every training image exactly once
    for k in (1, 2):
        held = {s.path for s in read_manifest(cv_run / f"fold-{k}" / "split_val.csv")}
        assert {r["path"] for r in oof if r["fold"] == str(k)} == held
        best = load_bundle(cv_run / f"fold-{k}")
        mine = [r for r in oof if r["fold"] == str(k)]
        for r, z in zip(mine, best.provenance["val_logits"]):
            assert float(r["logit"]) == pytest.approx(z, rel=1e-4, abs=1e-6)
            assert float(r["probability"]) == pytest.approx(1 / (1 + math.exp(-z / best.temperature)), rel=1e-4, abs=1e-6)
    assert {r["label"] for r in oof} == {"0", "1"}


def test_cv_summary_has_mean_sd_and_a_pooled_operating_point(cv_run: Path) -> None:
    s = json.loads((cv_run / "cv" / "cv_summary.json").read_text(encoding="utf-8"))
    assert s["folds"] == 2 and s["n_images"] == 32 and len(s["per_fold"]) == 2
    aucs = [r["roc_auc"] for r in s["per_fold"]]
    assert s["mean_sd"]["roc_auc"]["mean"] == pytest.approx(sum(aucs) / 2)
    assert s["mean_sd"]["roc_auc"]["sd"] == pytest.approx(abs(aucs[0] - aucs[1]) / math.sqrt(2))
    for m in ("sensitivity", "specificity", "accuracy"):
        assert {"mean", "sd"} <= set(s["mean_sd"]["at_common_threshold"][m]) and {"mean", "sd"} <= set(s["mean_sd"]["at_fold_threshold"][m])
    op = s["oof"]["operating_point"]
    assert op["method"] == "youden" and 0.0 < op["threshold"] < 1.0 and 0.0 <= op["sensitivity"] <= 1.0
    assert 0.0 <= s["oof"]["roc_auc"] <= 1.0
    assert "mean ± sd" in (cv_run / "cv" / "cv_summary.md").read_text(encoding="utf-8")
    assert (cv_run / "cv" / "cv_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shifted_validation_is_in_every_runs_history(cv_run: Path) -> None:
    rows = _rows(cv_run / "fold-1" / "history.csv")
    for col in SHIFT_COLUMNS:
        assert math.isfinite(float(rows[0][col])), (col, rows[0][col])
    assert 0.0 <= float(rows[0]["val_shift_auc"]) <= 1.0 and float(rows[0]["val_shift_dprob"]) >= 0.0
    detail = load_bundle(cv_run / "fold-1" / "last.pt").provenance["history"][0]["val_shift"]
    assert set(detail) >= {"gamma_0.7", "gamma_1.4", "jpeg_q30", "rotate_10", "letterbox_4:3", "blur", "noise_0.04", "contrast_0.6"}


def test_cv_resume_skips_finished_folds(cv_run: Path, tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult]) -> None:
    out = Path(shutil.copytree(cv_run, tmp_path / "cv"))
    fold1 = _sha(out / "fold-1" / "best.pt")
    (out / "cv" / "fold-2.json").unlink()  # fold 2 as if interrupted after its last epoch
    r = cli("train", "--resume", out)
    assert r.code == 0, r.err
    assert "fold 1/2: finished, skipped" in r.err and "fold 2/2: resuming" in r.err
    assert _sha(out / "fold-1" / "best.pt") == fold1
    assert (out / "cv" / "fold-2.json").is_file()
    assert len(_rows(out / "cv" / "oof.csv")) == 32
    # the same command again resumes (nothing left to train); other settings are refused
    again = cli("train", "--folds", "2", "--data", xray_dir, *TINY, "--out", out)
    assert again.code == 0 and "fold 2/2: finished, skipped" in again.err
    other = cli("train", "--folds", "3", "--data", xray_dir, *TINY, "--out", out)
    assert other.code == 1 and other.err_lines == [f"error: {out} holds a cross-validation run with other settings; "
                                                   f"use --resume {out} to continue it or --overwrite to start again"]


def test_folds_below_two_is_one_error_line(tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult]) -> None:
    r = cli("train", "--folds", "1", "--data", xray_dir, *TINY, "--out", tmp_path / "cv")
    assert r.code == 1 and r.err_lines == ["error: --folds must be >= 2, got 1"]


# ----------------------------------------------------------------------------- EMA weights
def test_ema_weights_are_validated_checkpointed_and_resumed(tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult]) -> None:
    run = tmp_path / "ema"
    r = cli("train", "--data", xray_dir, *TINY, "--out", run, "--set", "ema_decay=0.9", "--set", "shift_val_images=0")
    assert r.code == 0, r.err
    last = load_bundle(run / "last.pt")
    steps = last.training["ema_steps"]
    assert steps >= 2 and set(last.training["raw_state_dict"]) == set(last.state_dict)
    assert any(not torch.equal(last.state_dict[k], v) for k, v in last.training["raw_state_dict"].items() if v.is_floating_point())
    assert all(not r_[c] for r_ in _rows(run / "history.csv") for c in SHIFT_COLUMNS)  # shifted validation off
    cfg = TrainConfig.from_yaml(run / "config.yaml").override({"epochs": 2})
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    assert cli("train", "--resume", run).code == 0
    assert load_bundle(run / "last.pt").training["ema_steps"] == 2 * steps


# ----------------------------------------------------------------------------- pneumoscan train --folds K --refit
def test_refit_trains_on_every_image_and_calibrates_on_out_of_fold_logits(
    cv_run: Path, tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult],
) -> None:
    import numpy as np

    from pneumoscan.core.calibration import fit_operating_point
    from pneumoscan.workflows.cv_summary import read_oof

    out = Path(shutil.copytree(cv_run, tmp_path / "cv"))
    folds = {k: _sha(out / f"fold-{k}" / "best.pt") for k in (1, 2)}
    r = cli("train", "--folds", "2", "--data", xray_dir, *TINY, "--out", out, "--refit")
    assert r.code == 0, r.err
    assert "fold 1/2: finished, skipped" in r.err and "final model" in r.err
    assert {k: _sha(out / f"fold-{k}" / "best.pt") for k in (1, 2)} == folds  # the folds are not retrained
    final = out / "final"
    train = read_manifest(final / "split_train.csv")
    everything = sorted(str(Path(s.path).resolve()) for s in load_samples(xray_dir, "train"))
    assert sorted(s.path for s in train) == everything  # every training image, none held out
    cfg = TrainConfig.from_yaml(final / "config.yaml")
    assert cfg.data.val_source == "official" and cfg.min_epoch_for_best == cfg.epochs == 1
    b = load_bundle(final / "best.pt")
    table = read_oof(out / "cv" / "oof.csv")
    op = fit_operating_point(table.logits, table.labels, "youden", 0.95)
    assert b.threshold == pytest.approx(op.threshold) and b.temperature == pytest.approx(op.temperature)
    assert np.allclose(b.provenance["val_logits"], table.logits) and b.provenance["val_logits_source"] == "cv-oof"
    cal = b.provenance["calibration"]
    assert cal["source"] == "cv-oof" and cal["n"] == 32 and cal["sha256"] == _sha(out / "cv" / "oof.csv")
    assert b.provenance["cv"]["folds"] == 2 and len(b.provenance["cv"]["per_fold"]) == 2
    card = (final / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "## Cross-validation" in card and "mean ± sd" in card and "out-of-fold" in card
    assert str(tmp_path) not in card
    assert json.loads((out / "cv" / "final.json").read_text(encoding="utf-8"))["sha256"] == _sha(final / "best.pt")
    # its distribution-shift detector: the threshold percentile comes from a fold's held-out images
    from pneumoscan.workflows.shift_fit import fit_refit_detector

    det = fit_refit_detector(b, out, fold=1, batch_size=8)
    assert det.stats["n_train"] == 32 and det.stats["rule"].startswith("train-p") and np.isfinite(det.threshold)
    assert det.stats["val_flag_rate"] <= 0.0625 + 1e-9 and det.stats["n_val"] == 16  # 1 of 16 held-out images at most
    assert "fold 1" in det.stats["note"]
    # the same command again trains nothing
    again = cli("train", "--folds", "2", "--data", xray_dir, *TINY, "--out", out, "--refit")
    assert again.code == 0 and "final model: finished, skipped" in again.err
    assert json.loads((out / "cv" / "final.json").read_text(encoding="utf-8"))["sha256"] == _sha(final / "best.pt")


def test_refit_without_folds_is_one_error_line(tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult]) -> None:
    r = cli("train", "--data", xray_dir, *TINY, "--out", tmp_path / "run", "--refit")
    assert r.code == 1 and r.err_lines == ["error: --refit needs --folds K (it refits a cross-validated recipe on every image)"]
