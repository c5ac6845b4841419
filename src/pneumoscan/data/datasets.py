"""Datasets: the folder layout ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*`` and CSV
manifests (``path,label[,patient_id]``). Labels are NORMAL=0, PNEUMONIA=1 everywhere."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.imaging import fit_within, resize_float, to_uint8
from ..core.labels import CLASS_NAMES
from ..errors import DataError
from ..utils.io import atomic_write_text
from .io import IMAGE_SUFFIXES, read_image
from .patients import parse_patient_id

log = logging.getLogger(__name__)

_LABELS = {"normal": 0, "0": 0, "pneumonia": 1, "1": 1}
#: The columns of a manifest (``path`` and ``label`` required).
MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: file path (absolute or relative to the working directory).
        label: 0 = NORMAL, 1 = PNEUMONIA.
        patient: patient id (never split across train and validation).
    """

    path: str
    label: int
    patient: str


def parse_label(value: str | int, where: str = "") -> int:
    """``NORMAL``/``PNEUMONIA`` (any case) or ``0``/``1`` to 0/1."""
    key = str(value).strip().lower()
    if key not in _LABELS:
        raise DataError(f"{where}unknown label '{value}' (expected NORMAL/PNEUMONIA or 0/1)")
    return _LABELS[key]


def scan_folder(root: str | Path, split: str | None = None) -> list[Sample]:
    """List the images of ``root/split/{NORMAL,PNEUMONIA}`` (class folders in any case).

    Args:
        root: dataset root.
        split: ``"train"``, ``"val"``, ``"test"``; ``None`` means ``root`` itself holds the
            class folders.
    """
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        raise DataError(f"dataset folder not found: {base}")
    samples: list[Sample] = []
    found = False
    for cls_dir in sorted(base.iterdir()):
        if not cls_dir.is_dir() or cls_dir.name.upper() not in CLASS_NAMES:
            continue
        found = True
        label = CLASS_NAMES.index(cls_dir.name.upper())
        for f in sorted(cls_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                samples.append(Sample(str(f), label, parse_patient_id(f)))
    if not found:
        raise DataError(f"{base}: no NORMAL/ or PNEUMONIA/ class folder")
    if not samples:
        raise DataError(f"{base}: class folders hold no images")
    return samples


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """A manifest column mapping: ``"path=filename,label=target"`` → ``{"path": "filename",
    "label": "target"}`` (names compared case-insensitively).

    Args:
        spec: ``NAME=COLUMN`` pairs separated by commas (``NAME`` one of
            :data:`MANIFEST_COLUMNS`), a mapping, or ``None``/``""`` for none.

    Raises:
        DataError: malformed pair or unknown name.
    """
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, Mapping) else (item.partition("=")[::2] for item in str(spec).split(",") if item.strip())
    out: dict[str, str] = {}
    for name, column in pairs:
        name, column = str(name).strip().lower(), str(column).strip().lower()
        if name not in MANIFEST_COLUMNS or not column:
            raise DataError(f"bad column mapping '{name}={column}': expected NAME=COLUMN pairs with NAME one of {', '.join(MANIFEST_COLUMNS)} "
                            "(e.g. path=filename,label=target)")
        out[name] = column
    return out


def read_manifest(path: str | Path, split: str | None = None, columns: str | Mapping[str, str] | None = None) -> list[Sample]:
    """Read a CSV manifest with columns ``path,label[,patient_id][,split]``.

    Relative paths are resolved against the manifest's folder. With ``split`` given and a
    ``split`` column present, only those rows are kept.

    Args:
        path: the CSV file.
        split: keep the rows of this split (when the manifest has a ``split`` column).
        columns: the manifest's own names of the columns, e.g. ``{"path": "filename",
            "label": "target"}`` or ``"path=filename,label=target"`` (see :func:`parse_columns`).
    """
    path = Path(path)
    mapping = parse_columns(columns)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read manifest ({e.__class__.__name__})") from e
    reader = csv.DictReader(io.StringIO(text))
    cols = {c.strip().lower() for c in (reader.fieldnames or [])}
    rename = {mapping.get(name, name): name for name in MANIFEST_COLUMNS}  # the file's name -> ours
    missing = [mapping.get(name, name) for name in ("path", "label") if mapping.get(name, name) not in cols]
    if missing:
        raise DataError(f"{path}: manifest needs {' and '.join(repr(c) for c in missing)} column(s) (has: {', '.join(sorted(cols)) or 'none'}); "
                        "name yours with --columns path=COLUMN,label=COLUMN")
    samples = []
    seen_splits: set[str] = set()
    for i, row in enumerate(reader, start=2):
        row = {rename.get(k.strip().lower(), f"_{k}"): (v or "").strip() for k, v in row.items() if k}
        seen_splits.add(row.get("split", ""))
        if split and row.get("split") and row["split"] != split:
            continue
        p = Path(row["path"])
        if not p.is_absolute():
            p = path.parent / p
        label = parse_label(row["label"], f"{path}:{i}: ")
        patient = row.get("patient_id") or parse_patient_id(p)
        samples.append(Sample(str(p), label, patient))
    if not samples:
        others = sorted(s for s in seen_splits if s)
        raise DataError(f"{path}: manifest has no rows" + (f" for split '{split}'" if split else "")
                        + (f" (splits in it: {', '.join(others)})" if split and others else ""))
    return samples


def write_manifest(samples: Sequence[Sample], path: str | Path, split: str | None = None) -> None:
    """Write samples as a CSV manifest (atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "patient_id"] + (["split"] if split else []))
    for s in samples:
        w.writerow([s.path, CLASS_NAMES[s.label], s.patient] + ([split] if split else []))
    atomic_write_text(path, buf.getvalue())


def load_samples(data: str | Path, split: str | None = "train", columns: str | Mapping[str, str] | None = None) -> list[Sample]:
    """Samples of a folder dataset split or of a CSV manifest.

    A folder that directly holds NORMAL/PNEUMONIA is used as is when ``split`` is absent.

    Args:
        data: dataset folder or CSV manifest.
        split: split folder, or value of the manifest's ``split`` column.
        columns: a manifest's own column names (see :func:`read_manifest`).
    """
    data = Path(data)
    if data.suffix.lower() == ".csv":
        return read_manifest(data, split, columns)
    if columns:
        log.warning("a column mapping applies to CSV manifests only: ignored for the folder %s", data)
    if split and (data / split).is_dir():
        return scan_folder(data, split)
    if any((data / c).is_dir() for c in CLASS_NAMES) or any((data / c.lower()).is_dir() for c in CLASS_NAMES):
        return scan_folder(data, None)
    if not data.exists():
        raise DataError(f"dataset not found: {data}")
    splits = _split_folders(data)
    if split and splits:
        raise DataError(f"{data}: no '{split}' split folder (splits here: {', '.join(splits)})")
    raise DataError(f"{data}: no '{split}' split folder and no NORMAL/PNEUMONIA class folders")


def _split_folders(root: Path) -> list[str]:
    """The sub-folders of ``root`` that hold a NORMAL or PNEUMONIA class folder, sorted."""
    try:
        return sorted(d.name for d in root.iterdir() if d.is_dir() and any(c.is_dir() and c.name.upper() in CLASS_NAMES for c in d.iterdir()))
    except OSError:
        return []


def class_counts(samples: Sequence[Sample]) -> list[int]:
    """Images per class, ``[n_normal, n_pneumonia]``."""
    c = [0, 0]
    for s in samples:
        c[s.label] += 1
    return c


class XrayDataset(Dataset):
    """Images as uint8 ``(1, H, W)`` tensors through a transform, with an in-memory cache of
    decoded images so that epochs after the first do no decoding.

    Args:
        samples: the images.
        transform: callable on a uint8 ``(1, H, W)`` tensor returning a float tensor.
        cache: keep decoded images in memory.
        max_side: decode/resize so that the longer side is at most this many pixels
            (keeps the cache small for full-resolution data).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = True,
        max_side: int | None = 512,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.cache = cache
        self.max_side = max_side
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> np.ndarray:
        """The decoded (cached) uint8 greyscale image of ``index``."""
        if index in self._cache:
            return self._cache[index]
        s = self.samples[index]
        img = read_image(s.path, max_side=self.max_side)
        if self.max_side and max(img.shape) > self.max_side:
            img = resize_float(img, *fit_within(*img.shape, self.max_side))
        arr = to_uint8(img)
        if self.cache:
            self._cache[index] = arr
        return arr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = self.load_uint8(index)
        x = torch.from_numpy(arr).unsqueeze(0)  # shares the cache's memory: transforms never write in place
        if self.transform is not None:
            x = self.transform(x)
        return x, self.samples[index].label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]
