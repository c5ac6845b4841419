"""Results a PACS can file: a DICOM Secondary Capture of the heat-map figure, in the source study.

For each DICOM input, ``pneumoscan predict --output-dicom DIR`` writes one RGB Secondary
Capture image (SOP Class 1.2.840.10008.5.1.4.1.1.7): the figure of
:func:`pneumoscan.explain.figure.heatmap_figure` with the result burnt in, filed in the source's
study (same StudyInstanceUID, the patient and study attributes copied from the source as
filing requires) under a new series ("pneumoscan heatmap", Modality OT, one new series per
study and run), with a new SOPInstanceUID and the result in ImageComments. The source image is
referenced in SourceImageSequence. Files are written atomically and never over an existing file.
"""
from __future__ import annotations

import datetime as _dt
import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from ..utils.io import atomic_write_bytes
from ..utils.version import __version__

log = logging.getLogger(__name__)

#: Secondary Capture Image Storage.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_DESCRIPTION = "pneumoscan heatmap"
#: The series number of pneumoscan's series (kept away from the modality's usual 1..999).
SERIES_NUMBER = 9700

#: Patient and study attributes copied from the source (Type 2 ones are written empty when absent).
_PATIENT_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "BurnedInAnnotation",
)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _valid_uid(value: Any) -> str | None:
    s = str(value or "").strip()
    return s if len(s) <= 64 and _UID.match(s) else None


class SecondaryCaptureWriter:
    """Writes Secondary Captures into one folder; images of the same study share one new series.

    Args:
        out_dir: destination folder (created).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._series: dict[str, tuple[str, int]] = {}  # study UID -> (series UID, last instance number)
        self._used: set[str] = set()
        self.files: list[Path] = []  # written so far

    def dataset(self, source: str | Path, rgb: np.ndarray, comments: str) -> Any:
        """The Secondary Capture data set of ``rgb`` derived from the DICOM file ``source``.

        Args:
            source: the DICOM input the figure explains (its header is read again, pixels skipped).
            rgb: ``(H, W, 3)`` uint8 image to store.
            comments: the result in words (ImageComments).

        Raises:
            ImageReadError: the source header cannot be read.
        """
        import pydicom
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        try:
            src = pydicom.dcmread(str(source), stop_before_pixels=True, force=True)
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on hostile input
            raise ImageReadError(str(source), f"cannot read the DICOM header again ({e.__class__.__name__})") from e
        ds = Dataset()
        for kw in _PATIENT_STUDY:
            try:
                if kw in src:
                    ds[kw] = src[kw]
            except Exception:  # noqa: BLE001 - a malformed value is left out, not fatal
                log.debug("%s: %s not copied", source, kw)
        for kw in _TYPE2:
            if kw not in ds:
                setattr(ds, kw, "")
        study = _valid_uid(ds.get("StudyInstanceUID"))
        if study is None:
            study = generate_uid()
            log.warning("%s has no valid StudyInstanceUID: the secondary capture starts a new study", source)
        ds.StudyInstanceUID = study
        series, number = self._series.get(study, (generate_uid(), 0))
        self._series[study] = (series, number + 1)
        now = _dt.datetime.now()
        ds.SOPClassUID = SECONDARY_CAPTURE
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = SERIES_NUMBER
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.Manufacturer = "pneumoscan"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = number + 1
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = "Grad-CAM heat map of the pneumonia classifier, with the result burnt in"
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
        ds.PatientOrientation = ""
        ds.ImageComments = comments
        src_class, src_inst = _valid_uid(src.get("SOPClassUID")), _valid_uid(src.get("SOPInstanceUID"))
        if src_class and src_inst:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src_class, src_inst
            ds.SourceImageSequence = [ref]
        ds.set_pixel_data(np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB", bits_stored=8)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        return ds

    def write(self, source: str | Path, rgb: np.ndarray, comments: str) -> Path:
        """Write the Secondary Capture of ``source`` as ``<stem>.sc.dcm`` (``<stem>-2.sc.dcm``, ...
        when taken) atomically, never over an existing file.

        Args:
            source: the DICOM input the figure explains.
            rgb: ``(H, W, 3)`` uint8 image to store.
            comments: the result in words (ImageComments).

        Returns:
            The file written.

        Raises:
            ImageReadError: the source header cannot be read.
            OSError: the file cannot be written.
        """
        ds = self.dataset(source, rgb, comments)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        stem = Path(str(source)).stem or "image"
        k = 1
        while True:
            target = self.out_dir / (f"{stem}.sc.dcm" if k == 1 else f"{stem}-{k}.sc.dcm")
            if str(target) not in self._used and not target.exists():
                break
            k += 1
        self._used.add(str(target))
        atomic_write_bytes(target, buf.getvalue())
        self.files.append(target)
        return target
