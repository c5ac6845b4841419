"""Leakage-free validation: a stratified, patient-grouped split of train."""
from __future__ import annotations

import random
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
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_patient[s.patient].append(i)
    patients_by_class: dict[int, list[str]] = defaultdict(list)
    for pid, idx in by_patient.items():
        labels = [samples[i].label for i in idx]
        patients_by_class[max(set(labels), key=labels.count)].append(pid)
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
