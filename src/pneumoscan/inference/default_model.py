"""The shipped default model (``pneumoscan/assets/default``): a checkpoint stored in fp16
plus a JSON manifest with its name and sha256, verified at every load."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..utils.io import sha256_file

DEFAULT_DIR = "assets/default"
MANIFEST = "default.json"


def default_model_dir() -> Path:
    """Folder of the shipped default model inside the installed package."""
    return Path(str(resources.files("pneumoscan").joinpath(DEFAULT_DIR)))


def default_manifest() -> dict[str, Any]:
    """The manifest (``name``, ``file``, ``sha256``, ``license``, ...) of the default model."""
    f = default_model_dir() / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"the default model is not installed ({f} missing); pass --checkpoint")
    return json.loads(f.read_text(encoding="utf-8"))


def default_checkpoint_path() -> Path:
    """Path of the default model's checkpoint file, after verifying its sha256."""
    man = default_manifest()
    path = default_model_dir() / man["file"]
    if not path.is_file():
        raise CheckpointError(f"default model file missing: {path}")
    digest = sha256_file(path)
    if digest != man["sha256"]:
        raise CheckpointError(f"default model {path.name} failed its checksum (sha256 {digest[:12]}…, expected {man['sha256'][:12]}…)")
    return path


def load_default_checkpoint() -> dict[str, Any]:
    """The default model's checkpoint dict (checksum verified, loaded with weights_only)."""
    from ..training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(default_checkpoint_path())
    man = default_manifest()
    ckpt.setdefault("weight_name", man["name"])
    ckpt["sha256"] = man["sha256"]
    return ckpt


def export_default(ckpt: dict[str, Any], dest_dir: str | Path, name: str, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint as a shippable default model: fp16 weights, no optimizer state,
    plus the JSON manifest with its sha256 (used to build ``assets/default``)."""
    from ..training.checkpoint import save_checkpoint
    from ..utils.io import atomic_write_text

    keep = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "torch_rng", "_path")}
    import torch

    keep["state_dict"] = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in ckpt["state_dict"].items()}
    keep["weight_name"] = name
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    f = dest / f"{name}.pt"
    save_checkpoint(keep, f)
    manifest = {
        "name": name, "file": f.name, "sha256": sha256_file(f), "model_name": ckpt["model_name"],
        "threshold": ckpt.get("threshold"), "temperature": ckpt.get("temperature"),
        "threshold_method": ckpt.get("threshold_method"), "val_metrics": ckpt.get("val_metrics"),
        "preprocessing": ckpt.get("preprocessing"),
        "data_license": "Kermany et al. 2018, doi:10.17632/rscbjbr9sj.2, CC BY 4.0",
        **(extra or {}),
    }
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return f
