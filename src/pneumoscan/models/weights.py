"""Pretrained weights through torchvision's weights API, with an offline path.

``"imagenet"`` asks torchvision for the weights; torchvision reads
``$TORCH_HOME/hub/checkpoints/<file>`` when it is there and downloads otherwise. Without
internet and without that file, :class:`WeightsError` explains how to provide it. A local
path is loaded with ``weights_only=True`` and, when its name carries torchvision's hash
prefix (``mobilenet_v2-b0353104.pth``), verified against it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..utils.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.(?:pth|pt)$")


def torchvision_weights(arch: str) -> Any:
    """torchvision's ImageNet-1k V1 weights enum member for ``arch``."""
    from torchvision.models import get_model_weights

    return get_model_weights(arch).IMAGENET1K_V1


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def verify_file(path: str | Path, sha256: str | None = None) -> str:
    """Check a weights file's sha256 against ``sha256`` (full or prefix) or against the hash
    prefix in its torchvision-style name. Returns the full hex digest.

    Raises:
        WeightsError: mismatch or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    expected = _check_hex(sha256) if sha256 is not None else None
    if expected is None:
        m = _HASH_IN_NAME.search(path.name)
        expected = m.group(1) if m else None
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weights file ({e.strerror or e})") from e
    if expected and not digest.startswith(expected):
        raise WeightsError(f"{path}: sha256 {digest[:12]}… does not match the expected {expected[:12]}…")
    return digest


def _check_hex(sha256: str) -> str:
    """A user-given sha256 (full or a prefix of at least 8 hex digits), lower-cased."""
    h = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", h):
        raise WeightsError(f"--sha256 must be 8 to 64 hexadecimal digits, got {sha256!r}")
    return h


def load_state_dict_file(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict (or a checkpoint holding ``state_dict``/``model``) safely."""
    verify_file(path, sha256)
    return _load_weights_only(path, path)


def _load_weights_only(path: str | Path, shown: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a state dict; errors name ``shown``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors vary
        raise WeightsError(f"{shown}: not a safe weights-only PyTorch file ({e.__class__.__name__})") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{shown}: does not hold a state dict")
    return obj


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of a torchvision architecture via the standard weights API.

    Raises:
        WeightsError: no internet and no cached file, with instructions.
    """
    w = torchvision_weights(arch)
    fname = os.path.basename(w.url)
    cached = hub_checkpoint_dir() / fname
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, RuntimeError(hash)...
        raise WeightsError(
            f"ImageNet weights for {arch} are not available offline ({e.__class__.__name__}). "
            f"Download {w.url} on a connected machine, then run 'pneumoscan weights import {fname}' "
            f"(or copy it to {cached}), or pass weights=PATH."
        ) from e


def import_weights(path: str | Path, sha256: str | None = None, dest_dir: str | Path | None = None) -> Path:
    """Verify a weights file and place it in the torch hub cache for offline use.

    Args:
        path: the downloaded file (torchvision's name keeps the hash prefix it is checked against).
        sha256: expected digest (full or prefix) when the name carries none.
        dest_dir: target folder (default: the hub checkpoint cache).

    Returns:
        The path of the imported file.
    """
    path = Path(path)
    if sha256 is None and not _HASH_IN_NAME.search(path.name):
        known = {os.path.basename(torchvision_weights(a).url): a for a in _KNOWN_ARCHES}
        raise WeightsError(
            f"{path.name}: no hash in the file name and no --sha256 given; expected one of torchvision's names "
            f"({', '.join(sorted(known))}) or --sha256 HEX"
        )
    digest = verify_file(path, sha256)
    dest = Path(dest_dir) if dest_dir else hub_checkpoint_dir()
    target = dest / path.name
    try:
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
            # the copy is what gets used: verify it, and that it is a weights-only state dict
            if sha256_file(tmp) != digest:
                raise WeightsError(f"{path}: the file changed while it was being imported")
            _load_weights_only(tmp, path)
    except OSError as e:
        raise WeightsError(f"cannot import {path.name} into {dest} ({e.strerror or e})") from e
    log.info("imported %s (sha256 %s) into %s", path.name, digest[:12], dest)
    return target


_KNOWN_ARCHES = ("resnet18", "resnet50", "densenet121", "mobilenet_v2", "efficientnet_b0", "vgg16")
