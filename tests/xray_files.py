"""Helpers shared by the service and browser tests: real fixture X-rays turned into other formats."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def xray_dicom(path: Path, monochrome1: bool = True) -> bytes:
    """A real chest X-ray (a fixture JPEG) as a DX DICOM file, in memory: 16-bit, by default
    MONOCHROME1 (inverted storage the reader must undo)."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 16  # 12-bit range
    stored = (4095 - grey) if monochrome1 else grey
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(stored.astype("<u2")).tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
