"""Leakage-free validation: a stratified, patient-grouped split of train, and patient-grouped
stratified k-fold cross-validation folds."""
from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Sequence

from ..errors import DataError
from .datasets import Sample


def grouped_stratified_split(
    samples: Sequence[Sample], val_fraction: float = 0.15, seed: int = 42
) -> tuple[list[Sample], list[Sample]]:
    """Split samples into train/validation so that no patient is in both and each class
    contributes about ``val_fraction`` of its images to validation.

    Patients are assigned whole, class by class (a patient's class is the majority label of
    their images), in a seeded random order, until the class's validation quota is met.

    Args:
        samples: all training samples.
        val_fraction: share of each class's images to hold out (0 < f < 1).
        seed: random seed; the same seed gives the same split.

    Returns:
        ``(train, val)`` lists, each in the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError("val_fraction must be between 0 and 1")
    by_patient, patients_by_class = _patients(samples)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    for label in sorted(patients_by_class):
        pids = sorted(patients_by_class[label])
        rng.shuffle(pids)
        total = sum(len(by_patient[p]) for p in pids)
        quota = val_fraction * total
        taken = 0
        for pid in pids:
            if taken >= quota:
                break
            if len(pids) > 1 and taken > 0 and taken + len(by_patient[pid]) > quota * 1.5:
                continue  # skip a large patient that would overshoot the quota
            val_idx.update(by_patient[pid])
            taken += len(by_patient[pid])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    if not train or not val:
        raise DataError(f"cannot split {len(samples)} images of {len(by_patient)} patients into train and validation")
    return train, val


def grouped_stratified_kfold(samples: Sequence[Sample], k: int = 5, seed: int = 42) -> list[list[Sample]]:
    """Split samples into ``k`` folds for cross-validation: every patient in exactly one fold,
    each class spread evenly over the folds.

    Patients are taken largest first (ties in a seeded random order) and each goes to the fold
    that holds the fewest images of its class so far (for a patient with images of both
    classes, the fewest weighted by the patient's own mix; then the fewest images overall, then
    the lowest index). The folds' class counts then differ by a few images at most.

    Args:
        samples: all training samples.
        k: number of folds (>= 2).
        seed: random seed; the same seed gives the same folds.

    Returns:
        ``k`` lists of samples (fold 1 first), each in the input order; together they hold every
        sample once.

    Raises:
        DataError: ``k < 2``, or a class with fewer than ``k`` patients (a fold would lack it).
    """
    if k < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {k}")
    by_patient, patients_by_class = _patients(samples)
    for label, pids in sorted(patients_by_class.items()):
        if len(pids) < k:
            raise DataError(f"cannot make {k} folds: class {label} has only {len(pids)} patient(s) (every fold needs both classes)")
    rng = random.Random(seed)
    pids = sorted(by_patient)
    rng.shuffle(pids)
    pids.sort(key=lambda p: -len(by_patient[p]))  # largest first; equal sizes keep the seeded order
    counts = [[0, 0] for _ in range(k)]  # images per label in each fold
    fold_of: dict[int, int] = {}
    for pid in pids:
        n = [0, 0]
        for i in by_patient[pid]:
            n[samples[i].label] += 1
        # the fold where this patient's labels are rarest (least squared excess over an even share)
        f = min(range(k), key=lambda j: (n[0] * counts[j][0] + n[1] * counts[j][1], sum(counts[j]), j))
        for c in (0, 1):
            counts[f][c] += n[c]
        fold_of.update((i, f) for i in by_patient[pid])
    return [[s for i, s in enumerate(samples) if fold_of[i] == f] for f in range(k)]


def fold_source(fold: int, k: int) -> str:
    """The ``data.val_source`` of cross-validation fold ``fold`` of ``k`` (``"fold:2/5"``).

    Args:
        fold: the validation fold, 1-based.
        k: number of folds.
    """
    return f"fold:{fold}/{k}"


def parse_fold_source(source: str) -> tuple[int, int] | None:
    """``(fold, k)`` of a ``"fold:I/K"`` validation source; ``None`` for any other source.

    Args:
        source: a ``data.val_source`` value.

    Raises:
        DataError: ``fold:`` with a malformed or out-of-range fold.
    """
    if not source.startswith("fold:"):
        return None
    m = re.fullmatch(r"fold:(\d+)/(\d+)", source.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) or int(m.group(2)) < 2:
        raise DataError(f"bad validation source '{source}': expected fold:I/K with 1 <= I <= K and K >= 2")
    return int(m.group(1)), int(m.group(2))


def _patients(samples: Sequence[Sample]) -> tuple[dict[str, list[int]], dict[int, list[str]]]:
    """Sample indices by patient, and patients by class (the majority label of their images)."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_patient[s.patient].append(i)
    patients_by_class: dict[int, list[str]] = defaultdict(list)
    for pid, idx in by_patient.items():
        labels = [samples[i].label for i in idx]
        patients_by_class[max(set(labels), key=labels.count)].append(pid)
    return by_patient, patients_by_class
