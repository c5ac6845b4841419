"""Confidence intervals that stay honest at small sample sizes.

The figures pneumoscan reports are mostly binomial proportions of confusion-matrix counts
(accuracy, sensitivity/recall, specificity, precision/PPV, NPV). A percentile bootstrap of a
proportion collapses to ``[x, x]`` whenever ``x`` is 0 or 1 (8 correct out of 8: every resample
is 8 out of 8), and undercovers badly with a few dozen images. They get a **Wilson score
interval** instead, computed from the counts.

Why Wilson rather than Clopper-Pearson: Clopper-Pearson guarantees at least the nominal
coverage, and so is conservative (often ~98-99 % actual coverage for a nominal 95 % at small
``n``) and wider than needed; Wilson's coverage is close to nominal on average across ``p``
and ``n`` (Agresti & Coull 1998; Brown, Cai & DasGupta 2001, who recommend it for small ``n``),
it is never degenerate (8/8 gives [0.676, 1]; 0/10 gives [0, 0.278]), it stays within [0, 1],
and it is closed-form, so :mod:`pneumoscan.core` stays NumPy-only (no beta quantiles).

F1 is not a proportion, but it is a monotone function of the Jaccard index
``J = tp / (tp + fp + fn)``: ``F1 = 2J / (1 + J)``. Under multinomial sampling, given
``m = tp + fp + fn``, ``tp`` is Binomial(``m``, ``J``), so a Wilson interval for ``J`` mapped
through that function is an interval for F1 (:func:`f1_interval`). The metrics module uses it
where the F1 bootstrap cannot be trusted (small classes, or an interval collapsed to a point).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import DataError
from .labels import CLASS_NAMES

#: Fewer images than this in a class and every interval is flagged as wide / approximate.
MIN_PER_CLASS = 30

#: What each ``ci_method`` of a metric entry means.
CI_METHODS: dict[str, str] = {
    "wilson": "Wilson score interval of a binomial proportion, from the counts",
    "wilson_jaccard": "Wilson score interval of the Jaccard index tp / (tp + fp + fn), mapped to F1 = 2J / (1 + J)",
    "bootstrap": "stratified percentile bootstrap (each class resampled within itself)",
}


def normal_quantile(q: float) -> float:
    """Standard-normal quantile.

    Args:
        q: probability in (0, 1).
    """
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def _z(ci: float) -> float:
    if not 0.0 < ci < 1.0:
        raise DataError(f"interval coverage must lie in (0, 1), got {ci}")
    return normal_quantile(0.5 + ci / 2)


def wilson_interval(successes: int, n: int, ci: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    Args:
        successes: number of successes, ``0 <= successes <= n``.
        n: number of trials; ``(None, None)`` when 0 (the proportion is undefined).
        ci: interval coverage.

    Returns:
        ``(lower, upper)``, exactly 0 (1) at the lower (upper) end when ``successes`` is 0 (``n``).
    """
    if n < 0 or not 0 <= successes <= n:
        raise DataError(f"invalid binomial count {successes} out of {n}")
    if n == 0:
        return None, None
    z = _z(ci)
    z2 = z * z
    centre = (successes + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(successes * (n - successes) / n + z2 / 4)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def f1_interval(tp: int, fp: int, fn: int, ci: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Interval for F1 from the Wilson interval of the Jaccard index ``tp / (tp + fp + fn)``,
    mapped through ``F1 = 2J / (1 + J)`` (monotone, so the coverage carries over).

    Args:
        tp: true positives.
        fp: false positives.
        fn: false negatives.
        ci: interval coverage.

    Returns:
        ``(lower, upper)``, or ``(None, None)`` when ``tp + fp + fn`` is 0 (F1 undefined).
    """
    lo, hi = wilson_interval(tp, tp + fp + fn, ci)
    if lo is None or hi is None:
        return None, None
    return 2 * lo / (1 + lo), 2 * hi / (1 + hi)


def count_interval(count: int, size: int, ci: float = 0.95) -> list[int | None]:
    """Interval of a count out of a group of fixed size (a confusion-matrix cell within its true
    class): ``size`` times the Wilson interval of ``count / size``, widened to whole images.

    Args:
        count: the cell's count.
        size: the group's size.
        ci: interval coverage.
    """
    lo, hi = wilson_interval(count, size, ci)
    if lo is None or hi is None:
        return [None, None]
    return [math.floor(lo * size + 1e-9), math.ceil(hi * size - 1e-9)]


def as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labels as a flat int64 array, checked to be 0 (NORMAL) or 1 (PNEUMONIA).

    Args:
        labels: 0/1 labels.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if not np.isin(y, (0, 1)).all():
        raise DataError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return y


def class_counts(labels: Sequence[int] | np.ndarray) -> dict[str, int]:
    """``{"NORMAL": n0, "PNEUMONIA": n1}``.

    Args:
        labels: 0/1 labels.
    """
    y = as_labels(labels)
    return {CLASS_NAMES[c]: int((y == c).sum()) for c in (0, 1)}


def small_class_warnings(labels: Sequence[int] | np.ndarray, min_per_class: int = MIN_PER_CLASS) -> list[str]:
    """One warning per class with fewer than ``min_per_class`` images, e.g. ``"only 8 NORMAL
    images: intervals are wide ..."`` (empty when every class is large enough).

    Args:
        labels: 0/1 labels of the evaluated images.
        min_per_class: smallest class size not flagged.
    """
    out = []
    for name, k in class_counts(labels).items():
        if k == 0:
            out.append(f"no {name} images: metrics that need both classes are undefined")
        elif k < min_per_class:
            out.append(f"only {k} {name} image{'s' if k != 1 else ''}: intervals are wide and approximate "
                       f"(fewer than {min_per_class} per class); treat the figures as indicative only")
    return out
