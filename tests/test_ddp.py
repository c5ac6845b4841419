"""DistributedDataParallel on CPU (gloo): two real processes train on the fixture images.

Checks: both ranks end with identical weights (each rank dumps the sha256 of its own state
dict), the checkpoint written by rank 0 is exactly those weights and loads into a
single-process model, the log states the world size, ``--resume`` works under torchrun and a
DDP run can be continued by a single process.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from pneumoscan.config import TrainConfig
from pneumoscan.models.bundle import load_bundle
from pneumoscan.training.distributed import state_sha256

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: dict, out: str, result_dir: str) -> None:
    """One DDP rank (spawned): train through ``fit`` and dump this rank's weight hash."""
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
    })
    torch.set_num_threads(1)
    if rank == 0:  # as the CLI does: rank 0 logs at INFO (train.log), the others warnings only
        logging.getLogger("pneumoscan").setLevel(logging.INFO)
    from pneumoscan.training import fit

    summary = fit(TrainConfig.from_dict(cfg), out)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "state_sha256": summary["state_sha256"], "rank_state_sha256": summary["rank_state_sha256"],
        "ranks_in_sync": summary["ranks_in_sync"], "world_size": summary["world_size"], "epochs_run": summary["epochs_run"],
    }))


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _set_epochs(run: Path, epochs: int) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["epochs"] = epochs
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, xray_dir: Path) -> tuple[Path, list[dict]]:
    """One epoch of seed_cnn on the fixtures with 2 spawned gloo ranks."""
    base = tmp_path_factory.mktemp("ddp")
    out, results = base / "run", base / "results"
    results.mkdir()
    cfg = TrainConfig().override({
        "data.root": str(xray_dir), "model.name": "seed_cnn", "epochs": 1, "batch_size": 4, "seed": 0,
        "progress": False, "device": "cpu", "precision": "fp32",
    }).to_dict()
    mp.spawn(_rank_main, args=(2, _free_port(), cfg, str(out), str(results)), nprocs=2, join=True)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


def test_ranks_end_with_identical_weights(ddp_run: tuple[Path, list[dict]]) -> None:
    out, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"], "DDP ranks diverged"
    assert all(r["ranks_in_sync"] for r in ranks)
    assert ranks[0]["rank_state_sha256"] == [ranks[0]["state_sha256"]] * 2
    # rank 0's checkpoint holds exactly the weights every rank ended with
    assert state_sha256(load_bundle(out / "last.pt").build_model()) == ranks[0]["state_sha256"]


def test_ddp_run_logs_world_size_and_shards_data(ddp_run: tuple[Path, list[dict]]) -> None:
    out, _ = ddp_run
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "world size 2" in log
    assert "final weights identical on all 2 ranks" in log
    rows = _history(out)
    assert len(rows) == 1 and rows[0]["world_size"] == "2"
    # every rank trains its own shard: all ranks' images are counted in the epoch
    n_train = sum(1 for _ in open(out / "split_train.csv", encoding="utf-8")) - 1
    per_rank = -(-n_train // 2)
    steps = per_rank // 4
    img_s, wall = float(rows[0]["train_images_per_s"]), float(rows[0]["epoch_time"])
    assert round(img_s * wall) == steps * 4 * 2
    # checkpoints are written by rank 0 only, and only the expected files exist
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]


def test_ddp_checkpoint_loads_single_process(ddp_run: tuple[Path, list[dict]], xray_dir: Path) -> None:
    out, _ = ddp_run
    best = load_bundle(out)
    model = best.build_model()
    assert not any(k.startswith("module.") for k in best.state_dict), "DDP wrapper leaked into the checkpoint"
    from pneumoscan.inference import load_predictor

    pred = load_predictor(best, backend="torch", guard=False)
    images = sorted((xray_dir / "val").rglob("*.jpeg"))[:3]
    probs = [p.probability for p in pred.predict_paths(images)]
    assert len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 128, 128)).shape == (2, 1)


@pytest.mark.slow
def test_resume_under_torchrun_then_single_process(ddp_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    src, _ = ddp_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _set_epochs(run, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "pneumoscan", "train", "--resume", str(run),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr and "from epoch 1" in p.stderr
    rows = _history(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["world_size"] for r in rows] == ["2", "2"]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert log.count("final weights identical on all 2 ranks") == 2  # first run + resumed run
    assert load_bundle(run / "last.pt").training["epoch"] == 2

    # the DDP run continues in a single process
    _set_epochs(run, 3)
    from pneumoscan.training import fit

    summary = fit(None, run, resume=True)  # type: ignore[arg-type]
    assert summary["world_size"] == 1 and summary["epochs_run"] == 3
    rows = _history(run)
    assert [r["world_size"] for r in rows] == ["2", "2", "1"]
    last = load_bundle(run / "last.pt")
    assert last.training["epoch"] == 3 and state_sha256(last.build_model()) == summary["state_sha256"]
