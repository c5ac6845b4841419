"""End-to-end training through ``pneumoscan train`` on the committed fixture images: the run
directory, resume, freeze/unfreeze, SGD + weighted sampler + cosine warm-up, and bad input."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest
import torch
import yaml

from pneumoscan.config import TrainConfig
from pneumoscan.core.labels import CLASS_NAMES
from pneumoscan.data.datasets import load_samples, read_manifest
from pneumoscan.models.bundle import load_bundle
from pneumoscan.training.engine import HISTORY_FIELDS

if TYPE_CHECKING:
    from conftest import CliResult

RUN_FILES = ("config.yaml", "history.csv", "best.pt", "last.pt", "curves.png", "split_train.csv", "split_val.csv", "train.log")
PROVENANCE_KEYS = {
    "config", "data", "split_files", "history", "val_logits", "val_labels", "trainable_parameters", "epoch", "best_epoch", "best_loss",
}
TRAINING_KEYS = {"optimizer", "scheduler", "torch_rng", "loader_rng", "epoch", "best_loss", "best_epoch", "bad_epochs", "stopped"}  # what --resume needs
FAST = ["--batch-size", "8", "--no-progress", "--seed", "0"]


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ----------------------------------------------------------------------------- the run directory
def test_run_directory_has_every_artifact(tiny_run: Path) -> None:
    for name in RUN_FILES:
        assert (tiny_run / name).is_file() and (tiny_run / name).stat().st_size > 0, name
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tiny_run.glob(".*.tmp")), "atomic writes left temporary files"


def test_config_yaml_is_the_resolved_config_and_loads_back(tiny_run: Path, xray_dir: Path) -> None:
    cfg = TrainConfig.from_yaml(tiny_run / "config.yaml")
    cfg.validate()
    assert cfg.model.name == "seed_cnn" and cfg.epochs == 2 and cfg.batch_size == 8 and cfg.progress is False
    assert Path(cfg.data.root) == xray_dir
    assert cfg.to_dict() == yaml.safe_load((tiny_run / "config.yaml").read_text(encoding="utf-8"))
    assert load_bundle(tiny_run / "best.pt").provenance["config"] == cfg.to_dict()


def test_history_has_one_row_per_epoch(tiny_run: Path) -> None:
    rows = _history(tiny_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == HISTORY_FIELDS
    for r in rows:
        for k in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "epoch_time", "train_images_per_s"):
            assert math.isfinite(float(r[k])), (k, r[k])
        assert 0.0 <= float(r["val_acc"]) <= 1.0 and float(r["train_images_per_s"]) > 0
        assert int(r["world_size"]) == 1


def test_checkpoints_hold_model_optimizer_and_operating_point(tiny_run: Path) -> None:
    best = load_bundle(tiny_run / "best.pt")
    last = load_bundle(tiny_run / "last.pt")
    assert PROVENANCE_KEYS <= set(best.provenance) and PROVENANCE_KEYS <= set(last.provenance)
    assert set(last.training) == TRAINING_KEYS
    assert not best.training, "best.pt is for inference: no optimizer state"
    assert last.training["optimizer"]["state"] and last.training["optimizer"]["param_groups"]
    assert last.training["scheduler"] is not None  # plateau scheduler state
    assert last.training["epoch"] == 2 and len(last.provenance["history"]) == 2
    prov = best.provenance
    assert prov["best_epoch"] in (1, 2) and prov["epoch"] == prov["best_epoch"]
    assert prov["best_loss"] == pytest.approx(min(float(r["val_loss"]) for r in _history(tiny_run)), rel=1e-4)
    assert best.class_names == CLASS_NAMES
    assert best.arch == "seed_cnn" and best.arch_kwargs["input_size"] == 128
    assert best.name == f"seed_cnn-res128-{tiny_run.name}"
    assert best.preprocessing.input_size == 128 and best.preprocessing.in_channels == 1
    assert prov["trainable_parameters"] == 2_524_033
    n_val = len(read_manifest(tiny_run / "split_val.csv"))
    assert prov["data"]["n_val"] == n_val and prov["data"]["n_train"] == len(read_manifest(tiny_run / "split_train.csv"))
    assert prov["split_files"] == {"train": "split_train.csv", "val": "split_val.csv"}
    assert 0.0 < best.threshold < 1.0 and best.temperature > 0
    assert best.threshold_method == "youden"
    vm = best.val_metrics
    assert vm["n"] == n_val == len(prov["val_labels"]) == len(prov["val_logits"])
    assert 0.0 <= vm["accuracy"] <= 1.0 and vm["threshold"] == best.threshold
    model = best.build_model()
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32


def test_splits_are_patient_grouped_and_cover_train(tiny_run: Path, xray_dir: Path) -> None:
    train = read_manifest(tiny_run / "split_train.csv")
    val = read_manifest(tiny_run / "split_val.csv")
    assert not {s.patient for s in train} & {s.patient for s in val}
    everything = {str(Path(s.path).resolve()) for s in load_samples(xray_dir, "train")}
    paths = [str(Path(s.path).resolve()) for s in train + val]
    assert len(paths) == len(set(paths)) and set(paths) == everything
    assert {s.label for s in val} == {0, 1} and {s.label for s in train} == {0, 1}


def test_checkpoint_reproduces_validation_logits(tiny_run: Path) -> None:
    """best.pt's model scores the validation split as recorded at training time."""
    from pneumoscan.data.datasets import XrayDataset
    from pneumoscan.data.transforms import build_eval_transform
    from pneumoscan.training.loop import predict_logits
    from pneumoscan.training.runtime import resolve_channels_last, resolve_precision

    best = load_bundle(tiny_run / "best.pt")
    model = best.build_model()
    val = read_manifest(tiny_run / "split_val.csv")
    size = best.preprocessing.input_size
    ds = XrayDataset(val, build_eval_transform(size), True, max(size * 2, 256))
    cpu = torch.device("cpu")
    amp = resolve_precision("auto", cpu)  # as during training (bf16 autocast where the CPU has it)
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    logits, labels = predict_logits(model, loader, cpu, amp, resolve_channels_last("auto", cpu, amp))
    assert labels.tolist() == best.provenance["val_labels"]
    stored = torch.tensor(best.provenance["val_logits"], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(logits, dtype=torch.float64), stored, rtol=1e-3, atol=1e-3)


def test_weights_path_from_a_training_checkpoint(tiny_run: Path) -> None:
    from pneumoscan.models import create_model

    best = load_bundle(tiny_run / "best.pt")
    model = create_model("seed_cnn", weights=str(tiny_run / "best.pt"), **best.arch_kwargs)
    for k, v in best.state_dict.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


# ----------------------------------------------------------------------------- resume
def test_resume_of_a_finished_run_is_a_no_op(tiny_run: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    before = load_bundle(run / "last.pt")
    rows_before = _history(run)
    r = cli("train", "--resume", run)
    assert r.code == 0, r.err
    after = load_bundle(run / "last.pt")
    assert _history(run) == rows_before
    assert after.training["epoch"] == before.training["epoch"] == 2 and len(after.provenance["history"]) == 2
    for k, v in before.state_dict.items():
        torch.testing.assert_close(after.state_dict[k], v, rtol=0, atol=0)
    assert load_bundle(run / "best.pt").threshold == pytest.approx(load_bundle(tiny_run / "best.pt").threshold)


def test_resume_continues_from_last_checkpoint(tiny_run: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """A run whose config asks for more epochs than last.pt holds continues from there."""
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = TrainConfig.from_yaml(run / "config.yaml").override({"epochs": 3})
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    rows_before = _history(run)
    r = cli("train", "--resume", run)
    assert r.code == 0, r.err
    rows = _history(run)
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]
    assert rows[:2] == rows_before
    assert load_bundle(run / "last.pt").training["epoch"] == 3
    assert "resuming" in (run / "train.log").read_text(encoding="utf-8")
    assert read_manifest(run / "split_val.csv") == read_manifest(tiny_run / "split_val.csv")


def test_existing_run_is_not_overwritten_by_accident(tiny_run: Path, tmp_path: Path, cli: Callable[..., CliResult], xray_dir: Path) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--epochs", "1", "--out", run, *FAST)
    assert r.code == 1
    assert r.err_lines == [f"error: {run} already holds a run; use --resume {run} to continue it or --overwrite to start again"]


# ----------------------------------------------------------------------------- training options
def test_freeze_then_unfreeze_backbone(tmp_path: Path, cli: Callable[..., CliResult], xray_dir: Path) -> None:
    from pneumoscan.models import count_parameters, create_model

    with torch.device("meta"):
        full = count_parameters(create_model("mobilenet_v2", input_size=64))
        m = create_model("mobilenet_v2", input_size=64)
        m.set_backbone_trainable(False)
        head_only = count_parameters(m)
    assert head_only < full
    run = tmp_path / "freeze"
    r = cli(
        "train", "--data", xray_dir, "--model", "mobilenet_v2", "--input-size", "64", "--epochs", "2", "--out", run, *FAST,
        "--set", "model.freeze_backbone=true", "--set", "model.unfreeze_at_epoch=2",
    )
    assert r.code == 0, r.err
    log = (run / "train.log").read_text(encoding="utf-8")
    assert f"training mobilenet_v2 ({head_only:,} trainable parameters" in log
    assert f"epoch 2: backbone unfrozen ({full:,} trainable parameters)" in log
    last = load_bundle(run / "last.pt")
    assert last.provenance["trainable_parameters"] == head_only  # counted when training started
    # Adam keeps per-parameter step counts: the head trained in both epochs, the backbone only in epoch 2
    optim = last.training["optimizer"]
    steps = sorted({int(s["step"]) for s in optim["state"].values()})
    assert len(optim["state"]) == sum(1 for _ in create_model("mobilenet_v2", input_size=64).parameters())
    assert len(steps) == 2 and steps[1] == 2 * steps[0]


def test_sgd_weighted_sampler_and_cosine_warmup(tmp_path: Path, cli: Callable[..., CliResult], xray_dir: Path) -> None:
    run = tmp_path / "sgd"
    r = cli(
        "train", "--data", xray_dir, "--model", "seed_cnn", "--input-size", "64", "--epochs", "2", "--out", run, *FAST,
        "--optimizer", "sgd", "--lr", "0.01", "--class-balance", "sampler",
        "--set", "optim.scheduler=cosine", "--set", "optim.warmup_epochs=1",
    )
    assert r.code == 0, r.err
    last = load_bundle(run / "last.pt")
    cfg = TrainConfig.from_dict(last.provenance["config"])
    assert (cfg.optim.optimizer, cfg.class_balance, cfg.optim.scheduler) == ("sgd", "sampler", "cosine")
    group = last.training["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True
    assert all("momentum_buffer" in s for s in last.training["optimizer"]["state"].values())
    lrs = [float(x["lr"]) for x in _history(run)]
    assert lrs == pytest.approx([0.005, 0.01])  # one warm-up epoch at half the rate, then the cosine peak
    assert all(math.isfinite(float(x["train_loss"])) for x in _history(run))
    assert load_bundle(run / "best.pt").arch_kwargs["input_size"] == 64


def test_official_val_source_uses_the_val_folder(tmp_path: Path, cli: Callable[..., CliResult], xray_dir: Path) -> None:
    run = tmp_path / "official"
    r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--input-size", "64", "--epochs", "1", "--out", run,
            "--val-source", "official", "--class-balance", "none", *FAST)
    assert r.code == 0, r.err
    val = {Path(s.path).resolve() for s in read_manifest(run / "split_val.csv")}
    assert val == {Path(s.path).resolve() for s in load_samples(xray_dir, "val")}
    assert len(read_manifest(run / "split_train.csv")) == len(load_samples(xray_dir, "train"))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "{tmp}/no_such_folder"], "error: dataset not found: {tmp}/no_such_folder"),
        (["--data", "{xray}", "--model", "resnet9000"], "error: unknown model 'resnet9000'"),
        (["--data", "{xray}", "--set", "optim.lrr=0.1"], "error: unknown config key 'optim.lrr'"),
        (["--data", "{xray}", "--set", "optim.lr"], "error: --set expects key=value, got 'optim.lr'"),
        (["--data", "{xray}", "--set", "epochs=many"], "error: config key 'epochs' expects int"),
        (["--data", "{xray}", "--epochs", "0"], "error: epochs must be >= 1"),
        (["--data", "{xray}", "--device", "tpu"], "error: device must be auto, cpu, cuda or mps"),
        (["--data", "{xray}", "--preset", "nope"], "error: unknown preset 'nope'"),
        (["--data", "{xray}", "--config", "{tmp}/missing.yaml"], "error: config file not found"),
        (["--data", "{tmp}/manifest.csv"], "error: manifest not found"),
    ],
    ids=["missing-data", "unknown-model", "bad-set-key", "set-without-value", "set-wrong-type", "zero-epochs",
         "bad-device", "unknown-preset", "missing-config", "missing-manifest"],
)
def test_bad_input_is_one_error_line_and_exit_1(
    extra: list[str], message: str, tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult]
) -> None:
    fill = {"tmp": str(tmp_path), "xray": str(xray_dir)}
    # later flags win in argparse, so a case's own --model/--epochs replaces these
    r = cli("train", "--model", "seed_cnn", "--epochs", "1", "--out", tmp_path / "run", *FAST, *[a.format(**fill) for a in extra])
    assert r.code == 1
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith(message.format(**fill)), r.err
    assert "Traceback" not in r.err and r.out == ""
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_without_out_or_with_nothing_to_resume(tmp_path: Path, xray_dir: Path, cli: Callable[..., CliResult]) -> None:
    r = cli("train", "--data", xray_dir, "--model", "seed_cnn")
    assert r.code == 1 and r.err_lines == ["error: train needs --out RUN_DIR (or --resume RUN_DIR)"]
    r = cli("train", "--resume", tmp_path)
    assert r.code == 1 and len(r.err_lines) == 1 and r.err_lines[0].startswith("error: nothing to resume in")


@pytest.mark.slow
def test_train_runs_through_the_real_console_entry_point(tmp_path: Path, xray_dir: Path, cli_subprocess: Callable[..., CliResult]) -> None:
    """The same command a user types, in a fresh interpreter (bad input there: test_cli.py)."""
    run = tmp_path / "sub"
    r = cli_subprocess("train", "--data", xray_dir, "--model", "seed_cnn", "--input-size", "64", "--epochs", "1", "--out", run, *FAST)
    assert r.code == 0, r.err
    assert "done:" in r.err and "validation AUC" in r.err and "Traceback" not in r.err
    assert load_bundle(run).provenance["epoch"] == 1
