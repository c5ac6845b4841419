"""Rebuild the sample chest X-rays bundled in ``src/pneumoscan/assets/samples/``.

Four original Kermany JPEGs (two NORMAL, two PNEUMONIA, copied unchanged) and two DICOM files
made from two more (downscaled so they stay small): one 12-bit MONOCHROME2 with a rescale and
a window, one 8-bit MONOCHROME1 (inverted grey scale), both Modality DX, body part CHEST.
``pneumoscan predict --samples`` predicts them. Run from the repository root::

    python scripts/make_samples.py --data ../shared/data
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

log = logging.getLogger("make_samples")

OUT = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "assets" / "samples"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

#: Copied as they are (path relative to the data root).
JPEGS = (
    "chest_xray_fullres/val/NORMAL/NORMAL2-IM-1438-0001.jpeg",
    "chest_xray_fullres/val/NORMAL/NORMAL2-IM-1437-0001.jpeg",
    "chest_xray_fullres/train/PNEUMONIA/person1003_virus_1685.jpeg",
    "chest_xray_fullres/val/PNEUMONIA/person1951_bacteria_4882.jpeg",
)
#: (source, output name, max side, variant)
DICOMS = (
    ("chest_xray_fullres/val/NORMAL/NORMAL2-IM-1436-0001.jpeg", "NORMAL2-IM-1436-0001.dcm", 448, "mono2_12bit"),
    ("chest_xray_fullres/val/PNEUMONIA/person1947_bacteria_4876.jpeg", "person1947_bacteria_4876.dcm", 512, "mono1_8bit"),
)


def write_dicom(src: Path, dest: Path, max_side: int, variant: str) -> None:
    """Write a DX DICOM file of a Kermany JPEG.

    Args:
        src: the JPEG.
        dest: the ``.dcm`` to write.
        max_side: longest side after downscaling.
        variant: ``mono2_12bit`` (12 bits stored in 16, rescale intercept -1024, window over
            the full range) or ``mono1_8bit`` (8-bit, inverted: high values are dark).
    """
    im = Image.open(src).convert("L")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    grey = np.asarray(im, dtype=np.float64) / 255.0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[dest.name, "pneumoscan-sample"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[dest.name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[dest.name, "series"])
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.PatientID = "KERMANY-" + src.stem
    ds.PatientName = "Sample^Kermany"
    ds.ImageComments = f"Made by pneumoscan from {src.name} (Kermany et al. 2018, doi:10.17632/rscbjbr9sj.2, CC BY 4.0)"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    if variant == "mono2_12bit":
        raw = np.rint(grey * 4095).astype(np.uint16)
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 1023.5, 4096
    elif variant == "mono1_8bit":
        raw = np.rint((1.0 - grey) * 255).astype(np.uint8)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        raise ValueError(f"unknown variant {variant}")
    ds.PixelData = raw.tobytes()
    ds.save_as(dest, enforce_file_format=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="data root holding chest_xray_fullres/")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for rel in JPEGS:
        shutil.copyfile(data / rel, out / Path(rel).name)
        log.info("copied %s", Path(rel).name)
    for rel, name, side, variant in DICOMS:
        write_dicom(data / rel, out / name, side, variant)
        log.info("wrote %s (%s, %d bytes)", name, variant, (out / name).stat().st_size)


if __name__ == "__main__":
    main()
