"""Checkpoints: plain dicts of tensors and built-in types, written atomically and loaded with
``weights_only=True`` (a pickle that would run code is refused)."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import CheckpointError
from ..utils.io import atomic_save_torch

log = logging.getLogger(__name__)

FORMAT = "pneumoscan-checkpoint/1"


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint dict atomically (temporary file + rename): after a crash or a
    full disk the previous file at ``path`` is still there, complete.

    Args:
        ckpt: plain dict of tensors and built-in types (what ``weights_only`` loading accepts).
        path: destination ``.pt`` file.

    Raises:
        CheckpointError: the file could not be written (the old one is kept).
    """
    ckpt = dict(ckpt)
    ckpt.setdefault("format", FORMAT)
    try:
        atomic_save_torch(ckpt, path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path} ({e.strerror or e}); the previous file is unchanged") from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a pneumoscan checkpoint safely.

    Args:
        path: a ``.pt`` file, or a run directory (its ``best.pt`` is used).

    Raises:
        CheckpointError: missing file, unsafe pickle, or not a pneumoscan checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "best.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{p}: refused to load (not a weights-only checkpoint; it may contain code)") from e
    except MemoryError as e:
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint (too large for memory)") from e
    except Exception as e:  # noqa: BLE001 - corrupt archives raise RuntimeError, EOFError, zipfile errors, ...
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint ({e.__class__.__name__})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_name" not in ckpt:
        raise CheckpointError(f"{p}: not a pneumoscan checkpoint (no model_name/state_dict)")
    sd = ckpt["state_dict"]
    if not isinstance(ckpt["model_name"], str) or not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(f"{p}: malformed pneumoscan checkpoint (model_name must be a string, state_dict a dict of tensors)")
    for key in ("model_kwargs", "preprocessing"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{p}: malformed pneumoscan checkpoint ('{key}' must be a dict)")
    ckpt["_path"] = str(p)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model of a checkpoint (eval mode, fp32, on the CPU)."""
    from ..models import create_model

    kwargs = dict(ckpt.get("model_kwargs") or {})
    try:
        model = create_model(ckpt["model_name"], weights=None, **kwargs)
    except TypeError as e:  # model_kwargs the builder does not take
        raise CheckpointError(f"checkpoint model arguments do not fit model '{ckpt['model_name']}' ({e})") from e
    sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit model '{ckpt['model_name']}' ({str(e).splitlines()[0]})") from e
    return model.eval()


def checkpoint_preprocessing(ckpt: dict[str, Any]) -> Preprocessing:
    """The :class:`Preprocessing` stored in a checkpoint."""
    return Preprocessing.from_dict(ckpt["preprocessing"])
