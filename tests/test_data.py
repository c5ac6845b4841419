"""Datasets of the foundation: folder layout and CSV manifests (NORMAL=0, PNEUMONIA=1),
Kermany patient ids, the stratified patient-grouped split, and ``pneumoscan data summary``."""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pneumoscan.data.datasets import CLASS_NAMES, Sample, load_samples, read_manifest, scan_folder, write_manifest
from pneumoscan.data.patients import parse_patient_id
from pneumoscan.data.splits import grouped_stratified_split
from pneumoscan.errors import DataError

REAL_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"


# --------------------------------------------------------------------------- folders
def test_scan_folder_labels_and_patients(xray_dir: Path) -> None:
    train = scan_folder(xray_dir, "train")
    assert CLASS_NAMES == ("NORMAL", "PNEUMONIA")
    assert Counter(s.label for s in train) == {0: 16, 1: 16}
    for s in train:
        assert Path(s.path).parent.name == CLASS_NAMES[s.label]
        assert s.patient == parse_patient_id(s.path)
    by_name = {Path(s.path).name: s for s in train}
    assert by_name["person1068_virus_1771.jpeg"].patient == by_name["person1068_bacteria_3002.jpeg"].patient == "person1068"
    assert by_name["IM-0511-0001-0002.jpeg"].patient == "IM-0511"
    val = load_samples(xray_dir, "val")
    assert len(val) == 8 and Counter(s.label for s in val) == {0: 4, 1: 4}


def test_folder_variants_and_junk_files(tmp_path: Path, xray_dir: Path) -> None:
    src = sorted((xray_dir / "train" / "NORMAL").iterdir())[0]
    (tmp_path / "normal").mkdir()  # class folders in any case
    (tmp_path / "Pneumonia" / "sub").mkdir(parents=True)
    shutil.copy(src, tmp_path / "normal" / "IM-0001-0001.jpeg")
    shutil.copy(src, tmp_path / "Pneumonia" / "sub" / "person1_virus_1.JPG")  # nested, upper-case suffix
    (tmp_path / "normal" / "notes.txt").write_text("x")
    (tmp_path / "normal" / ".hidden.jpeg").write_bytes(src.read_bytes())
    (tmp_path / "other").mkdir()
    samples = load_samples(tmp_path, "train")  # no train/ folder: the class folders are used as is
    assert sorted((Path(s.path).name, s.label) for s in samples) == [("IM-0001-0001.jpeg", 0), ("person1_virus_1.JPG", 1)]
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "absent", "train")
    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="class folder"):
        scan_folder(tmp_path / "other")


# --------------------------------------------------------------------------- manifests
def test_manifest_relative_paths_labels_and_patient_column(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    m = tmp_path / "set.csv"
    m.write_text(
        "\ufeffpath,label,patient_id,split\n"  # Excel's BOM
        "imgs/a.jpeg,NORMAL,P1,train\n"
        "imgs/b.jpeg,pneumonia,P1,train\n"
        "/abs/c.jpeg,1,,val\n"
        "imgs/person12_bacteria_3.jpeg,0,,train\n",
        encoding="utf-8",
    )
    s = read_manifest(m)
    assert [x.label for x in s] == [0, 1, 1, 0]
    assert s[0].path == str(tmp_path / "imgs" / "a.jpeg") and s[2].path == "/abs/c.jpeg"
    assert [x.patient for x in s] == ["P1", "P1", "c", "person12"]
    assert [Path(x.path).name for x in read_manifest(m, "val")] == ["c.jpeg"]
    assert len(load_samples(m, "train")) == 3


def test_manifest_round_trip(tmp_path: Path) -> None:
    samples = [Sample(str(tmp_path / f"x{i}.png"), i % 2, f"p{i // 2}") for i in range(6)]
    write_manifest(samples, tmp_path / "m.csv", "val")
    assert read_manifest(tmp_path / "m.csv") == samples
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "path,label,patient_id,split"


@pytest.mark.parametrize(
    "text,match",
    [
        ("path,label\na.png,COVID\n", r"m\.csv:2: unknown label 'COVID'"),
        ("file,class\na.png,NORMAL\n", "needs 'path' and 'label'"),
        ("path,label\n", "no rows"),
    ],
)
def test_bad_manifests(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        read_manifest(tmp_path / "m.csv")


# --------------------------------------------------------------------------- patient ids
@pytest.mark.parametrize(
    "name,patient",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1_virus_6.jpeg", "person1"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("PERSON3_Bacteria_12.jpeg", "PERSON3"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "NORMAL2-IM-0587"),
        ("/data/train/NORMAL/IM-0007-0001.jpeg", "IM-0007"),
        ("scan_2024_05.png", "scan_2024_05"),
        ("case.dcm", "case"),
    ],
)
def test_parse_patient_id(name: str, patient: str) -> None:
    assert parse_patient_id(name) == patient


def test_im_and_normal2_prefixes_are_different_patients() -> None:
    assert parse_patient_id("IM-0115-0001.jpeg") != parse_patient_id("NORMAL2-IM-0115-0001.jpeg")


@pytest.mark.skipif(not (REAL_TRAIN / "train").is_dir(), reason="shared Kermany data not present")
def test_every_real_kermany_name_carries_a_patient() -> None:
    samples = load_samples(REAL_TRAIN, "train")
    assert len(samples) == 5216
    unparsed = [s.path for s in samples if s.patient == Path(s.path).stem]
    assert unparsed == []


# --------------------------------------------------------------------------- split
def _check_split(samples: list[Sample], train: list[Sample], val: list[Sample], fraction: float, tol: float) -> None:
    assert sorted(train + val, key=lambda s: s.path) == sorted(samples, key=lambda s: s.path)
    assert not ({s.patient for s in train} & {s.patient for s in val}), "a patient crosses the split"
    for label in (0, 1):
        n = sum(s.label == label for s in samples)
        v = sum(s.label == label for s in val)
        assert abs(v / n - fraction) <= tol, f"class {label}: {v}/{n} in validation"
    share_all = sum(s.label for s in samples) / len(samples)
    share_val = sum(s.label for s in val) / len(val)
    assert abs(share_val - share_all) <= tol


def test_grouped_split_on_fixtures(xray_dir: Path) -> None:
    samples = load_samples(xray_dir, "train")
    train, val = grouped_stratified_split(samples, 0.25, seed=3)
    _check_split(samples, train, val, 0.25, tol=0.15)  # 16 images per class: coarse
    assert grouped_stratified_split(samples, 0.25, seed=3) == (train, val)
    assert any(grouped_stratified_split(samples, 0.25, seed=s)[1] != val for s in range(4, 10))
    # input order is kept within each side
    assert [s.path for s in train] == [s.path for s in samples if s in train]


@pytest.mark.skipif(not (REAL_TRAIN / "train").is_dir(), reason="shared Kermany data not present")
def test_grouped_split_on_real_kermany_list() -> None:
    samples = load_samples(REAL_TRAIN, "train")
    train, val = grouped_stratified_split(samples, 0.15, seed=42)
    _check_split(samples, train, val, 0.15, tol=0.01)
    assert grouped_stratified_split(samples, 0.15, seed=42) == (train, val)
    other = grouped_stratified_split(samples, 0.15, seed=7)[1]
    assert {s.path for s in other} != {s.path for s in val}
    _check_split(samples, *grouped_stratified_split(samples, 0.15, seed=7), 0.15, tol=0.01)


def test_split_errors() -> None:
    samples = [Sample(f"{i}.png", i % 2, "same-patient") for i in range(10)]
    with pytest.raises(DataError, match="cannot split"):
        grouped_stratified_split(samples, 0.2)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError):
            grouped_stratified_split(samples, bad)


# --------------------------------------------------------------------------- summary
def test_data_summary_counts_and_duplicates(xray_dir: Path, tmp_path: Path, cli) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(xray_dir, ds)
    src = ds / "train" / "NORMAL" / "IM-0117-0001.jpeg"
    shutil.copy(src, ds / "train" / "NORMAL" / "IM-9999-0001.jpeg")  # same bytes, new name
    shutil.copy(src, ds / "val" / "NORMAL" / "IM-9998-0001.jpeg")  # and across splits
    r = cli("data", "summary", ds, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    tr, va = s["splits"]["train"], s["splits"]["val"]
    assert tr["images"] == 33 and tr["per_class"] == {"NORMAL": 17, "PNEUMONIA": 16}
    assert va["images"] == 9 and va["per_class"] == {"NORMAL": 5, "PNEUMONIA": 4}
    assert tr["patients"] == len({parse_patient_id(p) for p in (ds / "train").rglob("*.jpeg")})
    assert tr["width"] == {"min": 224, "median": 224.0, "max": 224} and tr["unreadable"] == 0
    assert s["duplicates"]["groups"] == 1 and s["duplicates"]["images"] == 3
    assert s["duplicates"]["cross_split_groups"] == 1
    assert sorted(Path(p).name for p in s["duplicates"]["examples"][0]) == ["IM-0117-0001.jpeg", "IM-9998-0001.jpeg", "IM-9999-0001.jpeg"]
    assert s["patients_shared_between_splits"] == {"train/val": 0}
    r = cli("data", "summary", ds)
    assert r.code == 0
    assert "exact duplicates (sha256): 1 groups, 3 images, 1 groups across splits" in r.out
    assert re.search(r"^train\s+33\s+17\s+16\s+48\.5%", r.out, re.M), r.out


def test_data_summary_bad_input_is_one_line(tmp_path: Path, cli) -> None:
    r = cli("data", "summary", tmp_path / "nothing")
    assert r.code == 1 and len(r.err_lines) == 1 and "not found" in r.err_lines[0]
