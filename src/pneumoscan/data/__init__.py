"""Data: image and DICOM reading, datasets, patient-grouped splits, transforms."""
from __future__ import annotations

from .datasets import Sample, XrayDataset, load_samples, read_manifest, scan_folder, write_manifest
from .io import read_image, read_image_with_meta
from .patients import parse_patient_id
from .splits import grouped_stratified_split
from .transforms import Preprocessing

__all__ = [
    "Sample", "XrayDataset", "load_samples", "read_manifest", "scan_folder", "write_manifest",
    "read_image", "read_image_with_meta", "parse_patient_id", "grouped_stratified_split",
    "Preprocessing",
]
