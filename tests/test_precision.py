"""Mixed precision, memory format and the engine's time accounting.

bf16 autocast must leave predictions of a trained model practically unchanged on real
images, keep fp32 master weights, and be selectable with ``--precision``; fp16 on a CPU is one
clear error; ``data_time``/``compute_time`` (history.csv) must split an epoch correctly.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml

from pneumoscan.data.datasets import XrayDataset, load_samples
from pneumoscan.data.io import read_image
from pneumoscan.data.transforms import build_eval_transform, preprocess_batch
from pneumoscan.errors import ConfigError
from pneumoscan.inference.runners import TorchRunner
from pneumoscan.models.bundle import load_bundle
from pneumoscan.training.loop import train_one_epoch
from pneumoscan.training.runtime import cpu_supports_bf16, resolve_channels_last, resolve_precision

CPU = torch.device("cpu")


def test_resolve_precision_on_cpu() -> None:
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("auto", CPU) is (torch.bfloat16 if cpu_supports_bf16() else None)
    with pytest.raises(ConfigError, match="bf16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError):
        resolve_precision("int8", CPU)


def test_resolve_channels_last() -> None:
    assert resolve_channels_last("on", CPU, None) is True
    assert resolve_channels_last("off", CPU, torch.bfloat16) is False
    # oneDNN convolutions prefer NHWC in fp32 as well as in bf16
    assert resolve_channels_last("auto", CPU, None) is torch.backends.mkldnn.is_available()
    assert resolve_channels_last("auto", CPU, torch.bfloat16) is torch.backends.mkldnn.is_available()


def _fixture_batch(xray_dir: Path, size: int) -> torch.Tensor:
    files = sorted(xray_dir.rglob("*.jpeg"))
    return preprocess_batch([read_image(f, max_side=size) for f in files], size)


def test_bf16_channels_last_matches_fp32_on_real_images(tiny_run: Path, xray_dir: Path) -> None:
    bundle = load_bundle(tiny_run)
    model = bundle.build_model()
    x = _fixture_batch(xray_dir, bundle.preprocessing.input_size)
    with torch.inference_mode():
        ref = model(x).view(-1)
        fast = torch.from_numpy(TorchRunner(bundle.build_model(), bf16=True).forward(x.numpy()))
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert torch.isfinite(fast).all()
    assert float((torch.sigmoid(fast) - torch.sigmoid(ref)).abs().max()) < 0.01
    if float(ref.std()) > 1e-3:  # a trained model separates the images: bf16 keeps their order
        assert np.corrcoef(ref.numpy(), fast.numpy())[0, 1] > 0.99


def test_bf16_training_keeps_fp32_master_weights(xray_dir: Path) -> None:
    from pneumoscan.models import create_model

    torch.manual_seed(0)
    model = create_model("seed_cnn", input_size=64).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = XrayDataset(load_samples(xray_dir, "train"), build_eval_transform(64), cache=True, max_side=128)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    st = train_one_epoch(model, loader, opt, CPU, amp_dtype=torch.bfloat16, channels_last=True, max_steps=2)
    assert st.images == 16 and np.isfinite(st.loss)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "an optimiser step under bf16 autocast changed no weight"


class _SlowLoader:
    """Real fixture batches, each delivered after ``delay`` seconds (a slow input pipeline)."""

    def __init__(self, loader: torch.utils.data.DataLoader, delay: float) -> None:
        self.loader, self.delay = loader, delay

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_data_and_compute_time_split_the_epoch(xray_dir: Path) -> None:
    from pneumoscan.models import create_model

    torch.manual_seed(0)
    model = create_model("seed_cnn", input_size=64)
    ds = XrayDataset(load_samples(xray_dir, "train"), build_eval_transform(64), cache=True, max_side=128)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    delay, steps = 0.15, 3
    st = train_one_epoch(model, _SlowLoader(loader, delay), torch.optim.SGD(model.parameters(), lr=0.01), CPU, max_steps=steps)
    assert st.images == 8 * steps
    assert st.data_time >= delay * steps  # the waiting is charged to data, not compute
    assert st.compute_time > 0
    assert st.data_time + st.compute_time <= st.wall_time + 1e-6
    assert st.data_time + st.compute_time >= 0.9 * st.wall_time  # nothing big goes unaccounted


def test_cli_precision_flag_selects_autocast(cli, xray_dir: Path, tmp_path: Path) -> None:
    for prec, shown in (("fp32", "precision fp32"), ("bf16", "precision bfloat16")):
        out = tmp_path / prec
        r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--epochs", "1", "--batch-size", "8",
                "--precision", prec, "--no-progress", "--out", out)
        assert r.code == 0, r.err
        assert shown in r.err
        assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == prec
        assert shown in (out / "train.log").read_text()


def test_cli_fp16_on_cpu_is_one_clear_error(cli, xray_dir: Path, tmp_path: Path) -> None:
    r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--epochs", "1", "--precision", "fp16",
            "--device", "cpu", "--no-progress", "--out", tmp_path / "run")
    assert r.code == 1
    assert len(r.err_lines) == 1 and "bf16" in r.err_lines[0] and "Traceback" not in r.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 autocast + GradScaler path)")
def test_cuda_fp16_amp_trains(cli, xray_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--epochs", "1", "--batch-size", "8",
            "--precision", "fp16", "--device", "cuda", "--no-progress", "--out", out)
    assert r.code == 0, r.err
    assert "precision float16" in r.err
    assert load_bundle(out).state_dict
