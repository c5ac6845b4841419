"""Confidence intervals at small n (issue 15): Wilson score intervals for the proportions, an F1
interval that never collapses, ``n`` and ``ci_method`` on every metric entry, small-class warnings."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pneumoscan.core import metrics as M
from pneumoscan.core.intervals import CI_METHODS, count_interval, f1_interval, small_class_warnings, wilson_interval
from pneumoscan.errors import DataError

PROPORTIONS = ("accuracy", "precision", "recall", "sensitivity", "specificity", "npv")


def _perfect_val_set() -> tuple[np.ndarray, np.ndarray]:
    """The 16-image val split: 8 NORMAL, 8 PNEUMONIA, perfectly separated scores."""
    y = np.array([0] * 8 + [1] * 8)
    p = np.r_[np.linspace(0.02, 0.3, 8), np.linspace(0.7, 0.98, 8)]
    return y, p


# --------------------------------------------------------------------------- Wilson
@pytest.mark.parametrize(("x", "n", "lo", "hi"), [
    (8, 8, 0.6756, 1.0),
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    # Newcombe (1998), Stat Med 17:857-872, Table I, method 3 (score interval without correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_textbook_values(x: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(x, n, 0.95)
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


def test_wilson_is_exact_at_the_boundaries_and_symmetric() -> None:
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(3, 10)
    lo2, hi2 = wilson_interval(7, 10)
    assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
    assert wilson_interval(0, 0) == (None, None)


def test_wilson_never_collapses_and_contains_the_estimate() -> None:
    for n in (1, 2, 5, 8, 16, 50):
        for x in range(n + 1):
            lo, hi = wilson_interval(x, n)
            assert 0.0 <= lo <= x / n <= hi <= 1.0
            assert hi - lo > 0.05, (x, n)


def test_wilson_coverage_is_close_to_nominal() -> None:
    """Exact binomial coverage, averaged over p: near 95 % (not conservative like Clopper-Pearson)."""
    for n in (8, 16, 30):
        cis = [wilson_interval(x, n) for x in range(n + 1)]
        cov = [sum(math.comb(n, x) * p**x * (1 - p) ** (n - x) for x, (lo, hi) in enumerate(cis) if lo <= p <= hi)
               for p in np.linspace(0.02, 0.98, 49)]
        assert 0.94 <= float(np.mean(cov)) <= 0.97, n


def test_wilson_width_follows_coverage_and_rejects_bad_input() -> None:
    w90, w99 = wilson_interval(5, 10, 0.90), wilson_interval(5, 10, 0.99)
    assert w99[1] - w99[0] > w90[1] - w90[0]
    for bad in ((11, 10), (-1, 10), (1, -1)):
        with pytest.raises(DataError):
            wilson_interval(*bad)
    with pytest.raises(DataError):
        wilson_interval(5, 10, 1.5)


def test_f1_interval_maps_the_jaccard_wilson_interval() -> None:
    lo, hi = f1_interval(8, 0, 0)
    j = wilson_interval(8, 8)[0]
    assert lo == pytest.approx(2 * j / (1 + j)) and hi == 1.0
    tp, fp, fn = 30, 6, 9
    lo, hi = f1_interval(tp, fp, fn)
    assert lo < 2 * tp / (2 * tp + fp + fn) < hi
    assert f1_interval(0, 0, 0) == (None, None)


def test_count_interval_scales_the_row_share() -> None:
    assert count_interval(8, 8) == [5, 8]  # 8 * [0.676, 1]
    assert count_interval(0, 8) == [0, 3]
    assert count_interval(0, 0) == [None, None]


# --------------------------------------------------------------------------- bootstrap_metrics at small n
def test_the_16_image_val_set_no_longer_reports_one_one_intervals() -> None:
    y, p = _perfect_val_set()
    res = M.bootstrap_metrics(y, p, {"at_operating_threshold": 0.5, "at_0.5": 0.5}, n_resamples=1000, seed=0)
    for sec in res.values():
        for k in PROPORTIONS:
            e = sec[k]
            assert e["value"] == 1.0 and e["ci_method"] == "wilson"
            assert e["ci95"][1] == 1.0 and e["ci95"][0] < 0.85, (k, e)
        assert sec["sensitivity"]["ci95"][0] == pytest.approx(0.6756, abs=1e-4)
        assert sec["specificity"]["ci95"][0] == pytest.approx(0.6756, abs=1e-4)
        assert sec["accuracy"]["ci95"][0] == pytest.approx(wilson_interval(16, 16)[0])
        f1 = sec["f1"]
        assert f1["value"] == 1.0 and f1["ci_method"] == "wilson_jaccard" and f1["ci95"][0] < 0.9
        assert sec["confusion_matrix"]["ci95"] == [[[5, 8], [0, 3]], [[0, 3], [5, 8]]]
        assert M.format_value(sec["sensitivity"]) == "1.000 [0.676, 1.000] (n=8)"


def test_every_entry_reports_its_denominator_and_method() -> None:
    y = np.array([0] * 10 + [1] * 6)
    p = np.array([0.1] * 7 + [0.9] * 3 + [0.2] * 2 + [0.8] * 4)  # tn 7, fp 3, fn 2, tp 4
    sec = M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=200, seed=0)["t"]
    expected_n = {"accuracy": 16, "sensitivity": 6, "recall": 6, "specificity": 10, "precision": 7, "npv": 9, "f1": 9,
                  "roc_auc": 16, "pr_auc": 16, "brier": 16, "ece": 16}
    assert {k: sec[k]["n"] for k in M.METRIC_KEYS} == expected_n
    for k in M.METRIC_KEYS:
        assert set(sec[k]) == {"value", "ci95", "n", "ci_method"} and sec[k]["ci_method"] in CI_METHODS, k
    assert sec["precision"]["ci95"] == list(wilson_interval(4, 7))
    assert sec["npv"]["ci95"] == list(wilson_interval(7, 9))


def test_undefined_proportion_has_no_interval() -> None:
    y = np.array([0] * 5 + [1] * 5)
    p = np.full(10, 0.1)  # nothing predicted positive: precision undefined
    sec = M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=100)["t"]
    assert sec["precision"] == {"value": None, "ci95": [None, None], "n": 0, "ci_method": "wilson"}
    assert M.format_value(sec["precision"]) == "n/a"


def test_threshold_free_metrics_keep_the_stratified_bootstrap() -> None:
    rng = np.random.default_rng(3)
    y = np.array([0] * 8 + [1] * 8)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.2, y.size), 0, 1)
    a = M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=500, seed=1)["t"]
    b = M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=500, seed=2)["t"]
    for k in M.SCORE_METRICS:
        assert a[k]["ci_method"] == "bootstrap" and a[k]["n"] == 16
    assert a["roc_auc"]["ci95"] != b["roc_auc"]["ci95"]  # resampling-dependent
    assert a["sensitivity"] == b["sensitivity"]  # count-based, seed-free
    perfect = M.bootstrap_metrics(*_perfect_val_set(), {"t": 0.5}, n_resamples=200)["t"]
    assert perfect["roc_auc"]["ci_method"] == "bootstrap" and perfect["roc_auc"]["ci95"] == [1.0, 1.0]
    assert any(w.startswith("ROC-AUC: every bootstrap resample gave 1.000") for w in perfect["warnings"])


def test_f1_keeps_the_bootstrap_with_large_classes() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 200 + [1] * 200)
    p = np.clip(0.5 + 0.2 * (2 * y - 1) + rng.normal(0, 0.2, y.size), 0, 1)
    sec = M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=500, seed=0)["t"]
    assert sec["f1"]["ci_method"] == "bootstrap"
    assert sec["warnings"] == []


# --------------------------------------------------------------------------- warnings
def test_small_class_warnings_below_30_per_class_only() -> None:
    w = small_class_warnings([0] * 8 + [1] * 8)
    assert len(w) == 2 and w[0].startswith("only 8 NORMAL images: intervals are wide") and "PNEUMONIA" in w[1]
    assert small_class_warnings([0] * 30 + [1] * 40) == []
    one = small_class_warnings([0] * 29 + [1] * 300)
    assert len(one) == 1 and one[0].startswith("only 29 NORMAL images")
    assert small_class_warnings([0] * 10 + [1] * 10, min_per_class=10) == []
    assert small_class_warnings([1] * 40) == ["no NORMAL images: metrics that need both classes are undefined"]
    with pytest.raises(DataError):
        small_class_warnings([0, 2])


def test_bootstrap_metrics_carries_the_warnings_in_every_section() -> None:
    y, p = _perfect_val_set()
    res = M.bootstrap_metrics(y, p, {"a": 0.5, "b": 0.4}, n_resamples=200)
    for sec in res.values():
        assert sec["warnings"][:2] == small_class_warnings(y)
    rng = np.random.default_rng(1)
    y = np.array([0] * 40 + [1] * 40)
    p = np.clip(0.5 + 0.2 * (2 * y - 1) + rng.normal(0, 0.25, y.size), 0, 1)
    assert M.bootstrap_metrics(y, p, {"t": 0.5}, n_resamples=200)["t"]["warnings"] == []
