"""Value checks of a trained-model bundle: the numbers that would flip or freeze every answer
if they were wrong (temperature, threshold, class names, preprocessing)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ..core.labels import CLASS_NAMES
from ..data.preprocessing import Preprocessing
from ..errors import CheckpointError

#: Input sides a bundle may declare.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 2048


def validate_bundle(b: Any, source: str = "checkpoint") -> None:
    """Refuse values of a :class:`~pneumoscan.models.bundle.ModelBundle` that would flip or
    freeze every answer.

    Checks: a registered-looking architecture name, a finite positive temperature, a finite
    threshold strictly between 0 and 1, the class names ``("NORMAL", "PNEUMONIA")`` in that
    order, and sane preprocessing (input side, channels, finite mean, positive std).

    Raises:
        CheckpointError: one line naming the file and the bad value.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: refused: {what}")

    if not (isinstance(b.temperature, float) and math.isfinite(b.temperature) and b.temperature > 0):
        raise bad(f"temperature must be a finite number > 0 (got {b.temperature!r})")
    if not (isinstance(b.threshold, float) and math.isfinite(b.threshold) and 0.0 < b.threshold < 1.0):
        raise bad(f"threshold must lie strictly between 0 and 1 (got {b.threshold!r})")
    if tuple(b.class_names) != CLASS_NAMES:
        raise bad(f"class names must be {list(CLASS_NAMES)} in that order (got {list(b.class_names)!r:.80})")
    p = b.preprocessing
    if not MIN_INPUT_SIZE <= p.input_size <= MAX_INPUT_SIZE:
        raise bad(f"input size must be {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} pixels (got {p.input_size})")
    if p.in_channels not in (1, 3) or len(p.mean) != p.in_channels or len(p.std) != p.in_channels:
        raise bad(f"preprocessing needs 1 or 3 channels with one mean and std each (got {p.in_channels}, {len(p.mean)}, {len(p.std)})")
    if not all(math.isfinite(m) and -10 <= m <= 10 for m in p.mean) or not all(math.isfinite(s) and 1e-3 <= s <= 10 for s in p.std):
        raise bad(f"preprocessing mean/std out of range (mean {list(p.mean)}, std {list(p.std)})")
    if p.resize != "stretch":
        raise bad(f"unknown resize rule {p.resize!r:.40}")


def as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {type(v).__name__}")
    return float(v)


def parse_preprocessing(d: Any, source: str) -> Preprocessing:
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{source}: malformed preprocessing (not a dict)")
    try:
        p = Preprocessing.from_dict(dict(d))
        return dataclasses.replace(
            p, input_size=int(as_float(p.input_size)), in_channels=int(as_float(p.in_channels)),
            mean=tuple(as_float(m) for m in p.mean), std=tuple(as_float(s) for s in p.std), resize=str(p.resize),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: malformed preprocessing ({e})") from e


def jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
