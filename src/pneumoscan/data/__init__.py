"""Data: image and DICOM reading, datasets, patient-grouped splits, transforms.

Names are imported on first use (PEP 562): the reader and the preprocessing need no PyTorch,
the datasets and training transforms do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_LAZY = {
    "Sample": ".datasets", "XrayDataset": ".datasets", "load_samples": ".datasets", "read_manifest": ".datasets",
    "scan_folder": ".datasets", "write_manifest": ".datasets",
    "read_image": ".io", "read_image_with_meta": ".io", "decode_isolated": ".isolated", "sniff_format": ".formats",
    "parse_patient_id": ".patients", "grouped_stratified_split": ".splits",
    "Preprocessing": ".preprocessing",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .datasets import Sample, XrayDataset, load_samples, read_manifest, scan_folder, write_manifest
    from .formats import sniff_format
    from .io import read_image, read_image_with_meta
    from .isolated import decode_isolated
    from .patients import parse_patient_id
    from .preprocessing import Preprocessing
    from .splits import grouped_stratified_split


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
