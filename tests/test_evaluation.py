"""Metrics, bootstrap intervals, calibration, DeLong's test and evaluation plots (no model
needed: fixed and seeded synthetic scores)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from pneumoscan.errors import CheckpointError, ConfigError, DataError
from pneumoscan.core import metrics as M
from pneumoscan.core.calibration import (
    calibration_summary, fit_operating_point, fit_temperature, logit, reliability_curve, sigmoid,
)
from pneumoscan.data.preprocessing import Preprocessing
from pneumoscan.evaluation.recalibrate import recalibrate_bundle
from pneumoscan.models.bundle import ModelBundle


def _scores(n: int = 300, seed: int = 0, ties: bool = True, shift: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores where positives score higher on average (rounded → many ties)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(np.int64)
    z = rng.normal(0, 1, n) + shift * y
    p = sigmoid(z)
    return y, (np.round(p, 2) if ties else p)


# --------------------------------------------------------------------------- point estimates vs scikit-learn
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.63, 0.9])
def test_threshold_metrics_match_sklearn(threshold: float) -> None:
    y, p = _scores()
    pred = (p >= threshold).astype(int)
    got = M.threshold_metrics(y, p, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert M.confusion_counts(y, p, threshold) == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=np.nan))
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert got["sensitivity"] == got["recall"]
    assert got["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert got["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0, zero_division=np.nan))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred))


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_metrics_match_sklearn(ties: bool, seed: int) -> None:
    y, p = _scores(seed=seed, ties=ties)
    assert M.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.pr_auc(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert M.brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)


def test_roc_auc_of_logits_equals_auc_of_probabilities() -> None:
    y, p = _scores(ties=False)
    assert M.roc_auc(y, logit(p)) == pytest.approx(M.roc_auc(y, p))


def test_ece_matches_its_definition() -> None:
    y, p = _scores(n=500, seed=3, ties=False)
    n_bins = 10
    ece = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        m = (p >= lo) & ((p < hi) if k < n_bins - 1 else (p <= hi))
        if m.any():
            ece += m.sum() / p.size * abs(y[m].mean() - p[m].mean())
    assert M.expected_calibration_error(y, p, n_bins) == pytest.approx(ece, abs=1e-12)
    rc = reliability_curve(p, y, n_bins)
    assert rc["count"].sum() == p.size
    # a forecaster that says 0.3 where 30% are positive is perfectly calibrated
    y2 = np.array([1] * 3 + [0] * 7)
    assert M.expected_calibration_error(y2, np.full(10, 0.3)) == pytest.approx(0.0, abs=1e-12)
    assert M.expected_calibration_error(y2, np.full(10, 0.9)) == pytest.approx(0.6)


def test_undefined_metrics_are_nan_not_zero() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    m = M.threshold_metrics(y, p, 0.9)  # nothing predicted positive
    assert math.isnan(m["precision"]) and m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    assert math.isnan(M.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


@pytest.mark.parametrize("labels, scores", [([0, 1], [0.5]), ([0, 1], [0.5, float("nan")]), ([], []), ([0, 2], [0.1, 0.2])])
def test_bad_inputs_raise_data_error(labels: list, scores: list) -> None:
    with pytest.raises(DataError):
        M.roc_auc(labels, scores)


# --------------------------------------------------------------------------- bootstrap
def test_stratified_resamples_keep_class_sizes() -> None:
    y = np.array([0] * 7 + [1] * 13)
    W = M.stratified_bootstrap_weights(y, 50, np.random.default_rng(0))
    assert W.shape == (50, 20)
    assert np.all(W[:, y == 0].sum(1) == 7) and np.all(W[:, y == 1].sum(1) == 13)
    assert np.unique(W, axis=0).shape[0] > 45  # resamples differ


def test_bootstrap_is_deterministic_by_seed_and_contains_the_point_estimate() -> None:
    y, p = _scores(n=400, seed=5)
    thr = {"at_operating_threshold": 0.55, "at_0.5": 0.5}
    a = M.bootstrap_metrics(y, p, thr, n_resamples=1000, seed=7)
    b = M.bootstrap_metrics(y, p, thr, n_resamples=1000, seed=7)
    c = M.bootstrap_metrics(y, p, thr, n_resamples=1000, seed=8)
    assert a == b
    assert a["at_operating_threshold"]["roc_auc"]["ci95"] != c["at_operating_threshold"]["roc_auc"]["ci95"]
    for section in a.values():
        assert section["n"] == 400 and sum(section["n_per_class"].values()) == 400
        for k in M.METRIC_KEYS:
            v, (lo, hi) = section[k]["value"], section[k]["ci95"]
            assert lo <= v <= hi, (k, lo, v, hi)
            assert hi - lo > 0, k
        cm = section["confusion_matrix"]
        assert sum(map(sum, cm["value"])) == 400
        for row, cis in zip(cm["value"], cm["ci95"]):
            for v, (lo, hi) in zip(row, cis):
                assert lo <= v <= hi
    # threshold-free metrics use the same resamples at both thresholds
    assert a["at_0.5"]["roc_auc"] == a["at_operating_threshold"]["roc_auc"]


def test_bootstrap_auc_interval_agrees_with_delong_standard_error() -> None:
    y, p = _scores(n=600, seed=11, ties=False)
    r = M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=2000, seed=0)["t"]["roc_auc"]
    aucs, v10, v01 = M.delong_components(y, p[None, :])
    se = math.sqrt(np.var(v10, ddof=1) / v10.shape[1] + np.var(v01, ddof=1) / v01.shape[1])
    width = r["ci95"][1] - r["ci95"][0]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.2)


# --------------------------------------------------------------------------- DeLong
def _naive_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """O(m n) DeLong from the definition of the structural components."""
    def comps(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(1), psi.mean(0), psi.mean()

    va10, va01, auc_a = comps(a)
    vb10, vb01, auc_b = comps(b)
    m, n = va10.size, va01.size
    s10 = np.cov(np.stack([va10, vb10]))
    s01 = np.cov(np.stack([va01, vb01]))
    cov = s10 / m + s01 / n
    return auc_a, auc_b, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]


def test_delong_matches_the_definition() -> None:
    y, a = _scores(n=250, seed=21)
    _, b = _scores(n=250, seed=22)
    b = np.round(0.5 * a + 0.5 * b, 2)
    r = M.delong_test(y, a, b)
    auc_a, auc_b, var = _naive_delong(y, a, b)
    assert r["auc_a"] == pytest.approx(auc_a) and r["auc_b"] == pytest.approx(auc_b)
    assert r["auc_a"] == pytest.approx(skm.roc_auc_score(y, a))
    assert r["se"] == pytest.approx(math.sqrt(var))
    assert r["p_value"] == pytest.approx(math.erfc(abs(r["z"]) / math.sqrt(2)))


def test_delong_identical_models_give_p_one() -> None:
    y, p = _scores(seed=4)
    r = M.delong_test(y, p, p.copy())
    assert r["diff"] == 0.0 and r["p_value"] == 1.0
    assert M.paired_bootstrap_auc(y, p, p.copy(), n_resamples=1000)["p_value"] == 1.0


def test_delong_clearly_different_models_give_a_small_p_that_the_bootstrap_confirms() -> None:
    rng = np.random.default_rng(9)
    y, good = _scores(n=600, seed=9, ties=False, shift=2.0)
    weak = np.clip(good + rng.normal(0, 0.35, good.size), 0, 1)
    d = M.delong_test(y, good, weak)
    bs = M.paired_bootstrap_auc(y, good, weak, n_resamples=2000, seed=1)
    assert d["auc_a"] > d["auc_b"] + 0.05
    assert d["p_value"] < 1e-3
    assert bs["p_value"] < 0.01
    assert bs["diff"] == pytest.approx(d["diff"])
    assert bs["se"] == pytest.approx(d["se"], rel=0.25)  # two estimates of the same standard error
    assert d["ci95"][0] > 0 and bs["ci95"][0] > 0


def test_delong_p_is_not_small_for_similar_models() -> None:
    rng = np.random.default_rng(3)
    y, base = _scores(n=300, seed=3, ties=False)
    a = base + rng.normal(0, 0.05, base.size)
    b = base + rng.normal(0, 0.05, base.size)
    assert M.delong_test(y, a, b)["p_value"] > 0.05


# --------------------------------------------------------------------------- calibration
def _overconfident(n: int = 3000, seed: int = 0, factor: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), logits reported as factor * z (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(np.int64)
    return factor * z, y


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t == pytest.approx(4.0, rel=0.15)
    s = calibration_summary(logits, y, t)
    assert s["ece_after"] < 0.5 * s["ece_before"]
    assert s["nll_after"] < s["nll_before"]
    assert s["brier_after"] < s["brier_before"]
    assert M.roc_auc(y, sigmoid(logits / t)) == pytest.approx(M.roc_auc(y, sigmoid(logits)))  # ranking unchanged


def test_fitted_temperature_is_the_likelihood_optimum() -> None:
    logits, y = _overconfident(n=1500, seed=5, factor=2.5)
    t = fit_temperature(logits, y)

    def nll(temp: float) -> float:
        q = np.clip(sigmoid(logits / temp), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    grid = np.exp(np.linspace(np.log(t) - 0.05, np.log(t) + 0.05, 201))
    assert nll(t) <= min(nll(g) for g in grid) + 1e-12
    assert fit_temperature(-logits, y) == 1.0  # anti-correlated: no temperature helps
    assert fit_temperature(np.array([-3.0, 3.0]), np.array([0, 1])) == 1.0  # separable: T -> 0 is refused


def _bundle(logits: np.ndarray, y: np.ndarray) -> ModelBundle:
    return ModelBundle(arch="seed_cnn", preprocessing=Preprocessing(input_size=64, in_channels=1, mean=(0.5,), std=(0.25,)),
                       threshold=0.5, temperature=1.0, threshold_method="youden", sha256="ab" * 32, path=Path("/x/best.pt"),
                       provenance={"val_logits": logits.tolist(), "val_labels": y.tolist()})


def test_recalibrate_reaches_the_target_sensitivity_without_touching_the_input() -> None:
    logits, y = _overconfident(n=800, seed=2)
    b = _bundle(logits, y)
    new = recalibrate_bundle(b, "sensitivity", 0.95)
    assert b.threshold == 0.5 and b.temperature == 1.0 and "calibration" not in b.provenance  # input unchanged
    assert new.path is None and new.sha256 == "" and new.name == b.name  # not the input's file any more
    assert new.threshold_method == "sensitivity" and new.provenance["calibration"]["target_sensitivity"] == 0.95
    probs = sigmoid(np.asarray(new.provenance["val_logits"]) / new.temperature)
    assert M.threshold_metrics(y, probs, new.threshold)["sensitivity"] >= 0.95
    assert new.val_metrics["sensitivity"] >= 0.95
    assert new.temperature == pytest.approx(4.0, rel=0.2)
    youden = recalibrate_bundle(b, "youden")
    assert youden.threshold > new.threshold  # a sensitivity target moves the threshold down
    assert youden.provenance["calibration"]["target_sensitivity"] is None
    kept = recalibrate_bundle(b, "f1", refit_temperature=False)
    assert kept.temperature == 1.0
    op = fit_operating_point(logits, y, "f1", temperature=1.0)
    assert (kept.threshold, kept.val_metrics) == (op.threshold, op.val_metrics)


def test_recalibrate_errors() -> None:
    logits, y = _overconfident(n=50)
    with pytest.raises(CheckpointError):
        recalibrate_bundle(_bundle(np.zeros(0), np.zeros(0, np.int64)), "youden")
    with pytest.raises(CheckpointError):
        recalibrate_bundle(_bundle(logits, np.zeros_like(y)), "youden")  # a single class
    with pytest.raises(ConfigError):
        recalibrate_bundle(_bundle(logits, y), "median")
    with pytest.raises(ConfigError):
        recalibrate_bundle(_bundle(logits, y), "sensitivity", 1.5)


# --------------------------------------------------------------------------- plots
def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        a = np.asarray(im.convert("L"), dtype=np.float32)
    assert a.std() > 5  # something was drawn


def test_evaluation_plots_write_pngs(tmp_path: Path) -> None:
    from pneumoscan.evaluation import plots

    y, p = _scores(n=200, seed=1)
    plots.plot_confusion_matrix([[50, 10], [5, 135]], tmp_path / "cm.png", 0.43)
    plots.plot_roc([("a", y, p), ("b", y, np.sqrt(p))], tmp_path / "roc.png", [("op", 0.2, 0.9)])
    plots.plot_precision_recall([("a", y, p)], tmp_path / "pr.png", [("op", 0.9, 0.8)])
    plots.plot_reliability([("raw", y, p), ("cal", y, np.sqrt(p))], tmp_path / "rel.png")
    img = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    plots.plot_error_grid([(img, "fp 0.99")], [], tmp_path / "err.png", per_row=3)
    plots.plot_metric_bars([("a", 0.9, 0.85, 0.95), ("b", 0.8, None, None)], tmp_path / "bars.png", "ROC-AUC")
    for f in ("cm", "roc", "pr", "rel", "err", "bars"):
        _assert_png(tmp_path / f"{f}.png")
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_format_value() -> None:
    assert M.format_value({"value": 0.91234, "ci95": [0.88, 0.94]}) == "0.912 [0.880, 0.940]"
    assert M.format_value({"value": None, "ci95": [None, None]}) == "n/a"
