"""Patient identifiers from Kermany file names (several images per patient are common)."""
from __future__ import annotations

import re
from pathlib import Path

_PATTERNS = [
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
]


def parse_patient_id(path: str | Path) -> str:
    """Patient id carried by a Kermany file name.

    ``person1000_bacteria_2931.jpeg`` → ``person1000``; ``IM-0115-0001.jpeg`` → ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` → ``NORMAL2-IM-1427``. Other names are their own patient
    (the file stem), which is the safe choice for a grouped split.

    Args:
        path: file path or name.
    """
    stem = Path(path).name
    for pat in _PATTERNS:
        m = pat.match(stem)
        if m:
            return m.group(1)
    return Path(path).stem
