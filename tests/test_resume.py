"""Nothing lost: a training process killed with SIGKILL in the middle of epoch 2 resumes with
``pneumoscan train --resume RUN`` from its last completed epoch, with the same configuration,
and ends exactly where an uninterrupted run ends (same number of epochs, same metrics)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumoscan.models.bundle import load_bundle

EPOCHS = 3
TIMING = ("epoch_time", "data_time", "compute_time", "eval_time", "train_images_per_s")


def _train_cmd(xray_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "pneumoscan", "train", "--data", str(xray_dir), "--model", "seed_cnn",
        "--epochs", str(EPOCHS), "--batch-size", "4", "--input-size", "256", "--seed", "0", "--deterministic", "--no-progress",
        "--out", str(out),
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def metric_rows(run: Path) -> list[dict[str, str]]:
    """history.csv without the wall-clock columns."""
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(xray_dir: Path, tmp_path: Path, cli) -> None:
    # the interrupted run
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(xray_dir, run), env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 480
        while not ((run / "last.pt").is_file() and (run / "history.csv").is_file()):
            assert proc.poll() is None, f"training ended early: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.05)
        time.sleep(0.2)  # inside epoch 2 (256-px inputs in batches of 4: an epoch takes seconds)
        assert proc.poll() is None, "the run must still be training epoch 2 when it is killed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    last = load_bundle(run / "last.pt")
    assert last.training["epoch"] == 1, "SIGKILL must have hit epoch 2, after epoch 1's checkpoint"
    assert len(metric_rows(run)) == 1
    config_before = (run / "config.yaml").read_bytes()

    # starting again over it needs --resume (or --overwrite): no run is clobbered by accident
    again = cli(*_train_cmd(xray_dir, run)[3:])
    assert again.code == 1 and len(again.err_lines) == 1 and "--resume" in again.err

    resumed = subprocess.run([sys.executable, "-m", "pneumoscan", "train", "--resume", str(run), "--no-progress"],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "from epoch 1" in resumed.stderr
    assert (run / "config.yaml").read_bytes() == config_before  # same configuration
    rows = metric_rows(run)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, EPOCHS + 1)]
    best = load_bundle(run)
    assert best.threshold_method is not None and best.val_metrics
    assert load_bundle(run / "last.pt").training["epoch"] == EPOCHS

    # the same run without interruption: identical epochs (loss, accuracy, AUC, learning rate)
    ref = tmp_path / "uninterrupted"
    full = subprocess.run(_train_cmd(xray_dir, ref), env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert rows == metric_rows(ref)

    # resuming a finished run trains nothing more
    done = subprocess.run([sys.executable, "-m", "pneumoscan", "train", "--resume", str(run), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and metric_rows(run) == rows
