"""Datasets: the folder layout ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*`` and CSV
manifests (``path,label[,patient_id]``). Labels are NORMAL=0, PNEUMONIA=1 everywhere."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..utils.io import atomic_write_text
from .io import IMAGE_SUFFIXES, read_image, to_uint8
from .patients import parse_patient_id

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
_LABELS = {"normal": 0, "0": 0, "pneumonia": 1, "1": 1}


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


def read_manifest(path: str | Path, split: str | None = None) -> list[Sample]:
    """Read a CSV manifest with columns ``path,label[,patient_id][,split]``.

    Relative paths are resolved against the manifest's folder. With ``split`` given and a
    ``split`` column present, only those rows are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read manifest ({e.__class__.__name__})") from e
    reader = csv.DictReader(io.StringIO(text))
    cols = {c.strip().lower() for c in (reader.fieldnames or [])}
    if not {"path", "label"} <= cols:
        raise DataError(f"{path}: manifest needs 'path' and 'label' columns (has: {', '.join(sorted(cols)) or 'none'})")
    samples = []
    for i, row in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        if split and row.get("split") and row["split"] != split:
            continue
        p = Path(row["path"])
        if not p.is_absolute():
            p = path.parent / p
        label = parse_label(row["label"], f"{path}:{i}: ")
        patient = row.get("patient_id") or parse_patient_id(p)
        samples.append(Sample(str(p), label, patient))
    if not samples:
        raise DataError(f"{path}: manifest has no rows" + (f" for split '{split}'" if split else ""))
    return samples


def write_manifest(samples: Sequence[Sample], path: str | Path, split: str | None = None) -> None:
    """Write samples as a CSV manifest (atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "patient_id"] + (["split"] if split else []))
    for s in samples:
        w.writerow([s.path, CLASS_NAMES[s.label], s.patient] + ([split] if split else []))
    atomic_write_text(path, buf.getvalue())


def load_samples(data: str | Path, split: str | None = "train") -> list[Sample]:
    """Samples of a folder dataset split or of a CSV manifest.

    A folder that directly holds NORMAL/PNEUMONIA is used as is when ``split`` is absent.
    """
    data = Path(data)
    if data.suffix.lower() == ".csv":
        return read_manifest(data, split)
    if split and (data / split).is_dir():
        return scan_folder(data, split)
    if any((data / c).is_dir() for c in CLASS_NAMES) or any((data / c.lower()).is_dir() for c in CLASS_NAMES):
        return scan_folder(data, None)
    if not data.exists():
        raise DataError(f"dataset not found: {data}")
    raise DataError(f"{data}: no '{split}' split folder and no NORMAL/PNEUMONIA class folders")


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
        arr = to_uint8(read_image(s.path, max_side=self.max_side))
        if self.max_side and max(arr.shape) > self.max_side:
            h, w = arr.shape
            scale = self.max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            arr = np.array(Image.fromarray(arr).resize(size, Image.BILINEAR))  # a writable copy
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
