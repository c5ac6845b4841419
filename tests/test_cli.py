"""The ``pneumoscan`` command's foundation: entry point, ``models``, ``data summary``,
``weights import``, usage errors, and bad input as one line with exit 1 (never a traceback)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest
import torch

from pneumoscan import __version__
from pneumoscan.data.datasets import load_samples
from pneumoscan.models import count_parameters, create_model, list_models
from pneumoscan.utils.io import sha256_file

if TYPE_CHECKING:
    from conftest import CliResult

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def _shared_weights() -> Path | None:
    p = Path(__file__).resolve().parents[2] / "shared" / "weights" / MOBILENET_FILE
    return p if p.is_file() else None


# ----------------------------------------------------------------------------- entry point
def test_console_script_is_installed_and_reports_version() -> None:
    script = shutil.which("pneumoscan", path=str(Path(sys.executable).parent))
    assert script, "the 'pneumoscan' console script is not installed next to this Python"
    p = subprocess.run([script, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == f"pneumoscan {__version__}"


def test_bad_input_in_a_fresh_interpreter_is_one_line_without_traceback(
    tmp_path: Path, cli_subprocess: Callable[..., CliResult]
) -> None:
    r = cli_subprocess("train", "--data", tmp_path / "nowhere", "--model", "seed_cnn", "--out", tmp_path / "run", "--no-progress")
    assert r.code == 1
    assert r.err_lines == [f"error: dataset not found: {tmp_path / 'nowhere'}"]
    assert r.out == ""


def test_no_command_prints_help_and_exits_2(cli: Callable[..., CliResult]) -> None:
    r = cli()
    assert r.code == 2
    for command in ("models", "data", "train", "weights"):
        assert command in r.err
    for group in ("data", "weights"):
        r = cli(group)
        assert r.code == 2 and "usage:" in r.err


def test_help_lists_every_command_in_order_each_from_its_cli_module() -> None:
    import argparse

    from pneumoscan.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    assert list(sub.choices) == [
        "models", "data", "train", "weights", "serve", "evaluate", "calibrate", "compare", "reproduce", "benchmark",
        "predict", "export", "guard", "ensemble",
    ]

    def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        return dict(nested[0].choices) if nested else {}

    module = {"calibrate": "evaluate", "compare": "evaluate", "reproduce": "evaluate", "benchmark": "bench"}
    for name, parser in sub.choices.items():
        funcs = [p.get_default("func") for p in [parser, *actions(parser).values()] if p.get_default("func")]
        assert funcs and {f.__module__ for f in funcs} == {f"pneumoscan.cli.{module.get(name, name)}"}, name
    assert list(actions(sub.choices["benchmark"])) == ["train", "predict", "serve", "quantize", "load", "precision-parity"]


def test_argparse_usage_errors_exit_2(cli: Callable[..., CliResult]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli("train", "--optimizer", "rmsprop")
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli("no-such-command")
    assert ei.value.code == 2


def test_debug_flag_shows_the_traceback(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    r = cli("--debug", "data", "summary", tmp_path / "missing")
    assert r.code == 1
    assert "Traceback" in r.err and "DataError" in r.err


# ----------------------------------------------------------------------------- models
def test_models_table_lists_every_model_with_its_trainable_parameters(cli: Callable[..., CliResult]) -> None:
    r = cli("models")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split()[:2] == ["name", "trainable"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == set(list_models())
    assert "2,524,033" in rows["seed_cnn"] and "128x128x1 -> 1ch" in rows["seed_cnn"]
    assert "16,843,521" in rows["vgg16"] and "256x256x1 -> 3ch" in rows["vgg16"]


def test_models_json_matches_the_registry(cli: Callable[..., CliResult]) -> None:
    r = cli("models", "--json")
    assert r.code == 0
    rows = {row["name"]: row for row in json.loads(r.out)}
    assert set(rows) == set(list_models())
    assert rows["seed_cnn"]["trainable_parameters"] == 2_524_033
    assert rows["vgg16"]["trainable_parameters"] == 16_843_521
    with torch.device("meta"):
        for name in ("mobilenet_v2", "resnet50"):
            m = create_model(name)
            assert rows[name]["trainable_parameters"] == count_parameters(m)
            assert rows[name]["total_parameters"] == count_parameters(m, False)
    assert rows["seed_cnn"]["weights"] == "none" and rows["mobilenet_v2"]["weights"] == "imagenet"
    assert all(row["gradcam_layer"].startswith("backbone.") for row in rows.values())


# ----------------------------------------------------------------------------- data summary
def test_data_summary_of_the_fixtures(cli: Callable[..., CliResult], xray_dir: Path) -> None:
    r = cli("data", "summary", xray_dir, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    for split in ("train", "val"):
        samples = load_samples(xray_dir, split)
        d = s["splits"][split]
        assert d["images"] == len(samples)
        assert d["per_class"] == {"NORMAL": sum(x.label == 0 for x in samples), "PNEUMONIA": sum(x.label == 1 for x in samples)}
        assert d["patients"] == len({x.patient for x in samples})
        assert d["width"]["median"] == 224 and d["unreadable"] == 0
    assert s["duplicates"]["groups"] == 0
    text = cli("data", "summary", xray_dir)
    assert text.code == 0 and "train" in text.out and "exact duplicates" in text.out


def test_data_summary_finds_duplicates_and_shared_patients(cli: Callable[..., CliResult], xray_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    src = sorted((xray_dir / "train" / "PNEUMONIA").iterdir())[0]
    for split in ("train", "val"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
        shutil.copy(sorted((xray_dir / split / "NORMAL").iterdir())[0], root / split / "NORMAL")
    shutil.copy(src, root / "train" / "PNEUMONIA" / src.name)
    shutil.copy(src, root / "val" / "PNEUMONIA" / src.name)  # same image, same patient, both splits
    s = json.loads(cli("data", "summary", root, "--json").out)
    assert s["duplicates"]["groups"] == 1 and s["duplicates"]["cross_split_groups"] == 1
    assert s["patients_shared_between_splits"]["train/val"] == 1


@pytest.mark.parametrize("make", ["missing", "empty", "no_class_folders"])
def test_data_summary_bad_folder_is_one_error_line(make: str, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    target = tmp_path / "data"
    if make == "empty":
        (target / "train" / "NORMAL").mkdir(parents=True)
    elif make == "no_class_folders":
        (target / "train" / "cats").mkdir(parents=True)
    r = cli("data", "summary", target)
    assert r.code == 1
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("error: ") and "Traceback" not in r.err


@pytest.mark.slow
def test_data_summary_of_the_shared_dataset(cli: Callable[..., CliResult], shared_dir: Path | None) -> None:
    if shared_dir is None or not (shared_dir / "chest_xray_224").is_dir():
        pytest.skip("../shared/data/chest_xray_224 is not beside this checkout")
    s = json.loads(cli("data", "summary", shared_dir / "chest_xray_224", "--json").out)
    assert s["splits"]["train"]["per_class"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert s["splits"]["val"]["per_class"] == {"NORMAL": 8, "PNEUMONIA": 8}
    assert s["splits"]["train"]["patients"] < s["splits"]["train"]["images"]  # several images per patient


# ----------------------------------------------------------------------------- weights import
def test_weights_import_verifies_and_copies_into_the_cache(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    src = _shared_weights()
    if src is None:
        pytest.skip(f"../shared/weights/{MOBILENET_FILE} is not beside this checkout")
    dest = tmp_path / "hub" / "checkpoints"
    r = cli("weights", "import", src, "--dest", dest)
    assert r.code == 0, r.err
    target = dest / MOBILENET_FILE
    assert r.out.strip() == str(target)
    assert sha256_file(target) == MOBILENET_SHA256
    assert not [p for p in dest.iterdir() if p.name != MOBILENET_FILE], "temporary files left behind"


def test_weights_import_default_destination_is_the_torch_hub_cache(
    cli: Callable[..., CliResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored after the test
    torch.hub.set_dir(str(tmp_path / "hub"))
    f = tmp_path / "my_weights.pth"
    torch.save({"w": torch.arange(4.0)}, f)
    digest = sha256_file(f)
    r = cli("weights", "import", f, "--sha256", digest[:16])
    assert r.code == 0, r.err
    assert Path(r.out.strip()) == tmp_path / "hub" / "checkpoints" / "my_weights.pth"
    assert sha256_file(tmp_path / "hub" / "checkpoints" / "my_weights.pth") == digest


def test_weights_import_rejects_bad_files(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    tampered = tmp_path / MOBILENET_FILE  # torchvision's name, other bytes: the hash prefix cannot match
    torch.save({"w": torch.zeros(3)}, tampered)
    r = cli("weights", "import", tampered, "--dest", dest)
    assert r.code == 1 and len(r.err_lines) == 1 and "does not match" in r.err_lines[0]
    assert not (dest / MOBILENET_FILE).exists()

    anonymous = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, anonymous)
    r = cli("weights", "import", anonymous, "--dest", dest)
    assert r.code == 1 and len(r.err_lines) == 1
    assert "no hash in the file name" in r.err_lines[0] and MOBILENET_FILE in r.err_lines[0]

    r = cli("weights", "import", anonymous, "--sha256", "0" * 64, "--dest", dest)
    assert r.code == 1 and "does not match" in r.err

    r = cli("weights", "import", tmp_path / "absent-0123abcd.pth", "--dest", dest)
    assert r.code == 1 and r.err_lines == [f"error: weights file not found: {tmp_path / 'absent-0123abcd.pth'}"]
