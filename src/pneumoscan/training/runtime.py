"""Runtime choices of a training run: the device, the autocast precision, the memory format,
the seeds, and the autocast context itself."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting.

    Args:
        name: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ConfigError: CUDA requested but not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AMX or AVX-512 BF16)."""
    cpu = getattr(torch, "cpu", None)
    for fn in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        f = getattr(cpu, fn, None)
        if f is not None:
            try:
                if f():
                    return True
            except Exception:  # noqa: BLE001 - private probes; any failure means "no"
                pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a ``precision`` setting on ``device`` (``None`` = fp32).

    Args:
        precision: ``auto`` (bf16/fp16 on CUDA, bf16 on CPUs that have it, else fp32),
            ``fp32``, ``bf16`` or ``fp16``.
        device: the training device.

    Raises:
        ConfigError: fp16 on a CPU, or an unknown setting.
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise ConfigError("fp16 autocast is for GPUs; use bf16 on CPUs")
        return torch.float16
    raise ConfigError(f"unknown precision '{precision}'")


def resolve_channels_last(setting: str, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether to train/evaluate in ``channels_last`` memory format.

    ``auto`` is on for CUDA and for CPUs with oneDNN (its convolutions run on NHWC without
    reordering: measured 1.5-1.6x faster for fp32 and bf16 alike, see docs/benchmarks.md).

    Args:
        setting: ``"auto"``, ``"on"`` or ``"off"``.
        device: the training device.
        amp_dtype: the autocast dtype (unused by ``auto`` since channels_last helps fp32 too).
    """
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch; optionally force deterministic kernels.

    Args:
        seed: the run's seed.
        deterministic: use deterministic algorithms (and cuDNN settings) from now on.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """The autocast context for ``dtype`` on ``device`` (a disabled one for fp32).

    Args:
        device: where the forward pass runs.
        dtype: autocast dtype from :func:`resolve_precision` (``None`` = fp32).
    """
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)
