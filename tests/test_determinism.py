"""Same seed, same data, deterministic mode on the CPU → identical runs: history.csv equal
(apart from wall-clock columns) and identical weights; a different seed gives a different run
(so the comparison can fail)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TIMING = ("epoch_time", "data_time", "compute_time", "eval_time", "train_images_per_s")

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from pneumoscan.config import TrainConfig
    from pneumoscan.models.bundle import load_bundle
    from pneumoscan.training import fit

    data, out = sys.argv[1], sys.argv[2]
    result = {}
    for name, seed, epochs in (("a", 0, 2), ("b", 0, 2), ("c", 1, 1)):
        cfg = TrainConfig().override({
            "data.root": data, "model.name": "seed_cnn", "epochs": epochs, "batch_size": 8, "seed": seed,
            "deterministic": True, "device": "cpu", "progress": False,
        })
        fit(cfg, f"{out}/{name}")
        sd = load_bundle(f"{out}/{name}/last.pt").state_dict
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode()); h.update(sd[k].float().numpy().tobytes())
        result[name] = h.hexdigest()
    print(json.dumps(result))
""")


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_same_seed_same_history_and_weights(xray_dir: Path, tmp_path: Path) -> None:
    # a fresh interpreter: deterministic mode is process-wide state
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(xray_dir), str(tmp_path)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stderr[-3000:]
    weights = json.loads(p.stdout.strip().splitlines()[-1])
    a, b, c = (_metrics(tmp_path / n) for n in "abc")
    assert len(a) == 2 and {"train_loss", "val_loss", "val_auc", "lr"} <= set(a[0])
    assert a == b
    assert weights["a"] == weights["b"]
    assert (tmp_path / "a" / "split_val.csv").read_text() == (tmp_path / "b" / "split_val.csv").read_text()
    # another training seed (the split has its own, data.split_seed) changes epoch 1 already
    assert a[0] != c[0]
