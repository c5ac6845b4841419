"""Cached ONNX exports: what makes ``pneumoscan predict`` start in a fraction of a second.

A checkpoint used with the ``onnx`` (or ``auto``) backend is exported once into
``$PNEUMOSCAN_CACHE`` (else ``~/.cache/pneumoscan``) as ``onnx/<weights>-<sha256[:16]>.onnx``.
Later runs find that file by the checkpoint's sha256 (:func:`~pneumoscan.models.bundle.bundle_ref`
hashes the file once, without loading it) and rebuild the model description from the export's
metadata (:func:`bundle_from_metadata`), so PyTorch is never imported. A file in the cache is
used only if its ``source_sha256`` is the checkpoint's hash.

The shipped default model needs no cache: its export is shipped beside it
(``assets/default/<name>.onnx``, verified against ``onnx_sha256`` in its manifest), which is
what an install without PyTorch runs.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

from ..errors import CheckpointError
from ..models.bundle import ModelBundle, bundle_ref, default_manifest, default_model_dir, default_onnx
from .runners import BUNDLE_KEY, OnnxRunner, open_session, plan_threads

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where on-the-fly ONNX exports are kept: ``$PNEUMOSCAN_CACHE``, else
    ``$XDG_CACHE_HOME/pneumoscan``, else ``~/.cache/pneumoscan``."""
    env = os.environ.get("PNEUMOSCAN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pneumoscan"


def export_dir(cache: str | Path | None = None) -> Path:
    """The folder of cached ONNX exports (``<cache>/onnx``)."""
    return Path(cache or cache_dir()) / "onnx"


def have_onnxruntime() -> bool:
    """Whether onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def bundle_from_metadata(meta: Mapping[str, str], source: str) -> ModelBundle:
    """The model description (no weights) stored in a pneumoscan ONNX file's metadata: the
    ``pneumoscan.bundle`` entry, or for files exported before it existed, the individual keys.

    Args:
        meta: the file's ``metadata_props``.
        source: the file's name, for error messages.

    Raises:
        CheckpointError: missing or invalid values.
    """
    try:
        if BUNDLE_KEY in meta:
            info = json.loads(meta[BUNDLE_KEY])
        else:
            info = {
                "arch": meta["model_name"], "name": meta.get("weight_name") or Path(source).stem,
                "sha256": meta.get("source_sha256") or "", "preprocessing": json.loads(meta["preprocessing"]),
                "threshold": float(meta["threshold"]), "temperature": float(meta["temperature"]),
                "threshold_method": meta.get("threshold_method") or None,
                "class_names": json.loads(meta["class_names"]) if meta.get("class_names") else None,
                "val_metrics": json.loads(meta["val_metrics"]) if meta.get("val_metrics") else {},
            }
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: malformed pneumoscan ONNX metadata ({e})") from e
    if not isinstance(info, dict):
        raise CheckpointError(f"{source}: malformed pneumoscan ONNX metadata ({BUNDLE_KEY} is not an object)")
    return ModelBundle.from_info(info, source=source)


def _export_of(path: Path, sha: str, threads: int | None, lanes: int | None) -> OnnxRunner | None:
    """A runner on ``path`` if it is a pneumoscan export of the checkpoint whose file hashes to
    ``sha``; ``None`` when it is not (another checkpoint, unreadable, not a pneumoscan file)."""
    n, intra = plan_threads(threads, lanes)
    try:
        runner = OnnxRunner(open_session(path, intra), path, lanes=n)
    except CheckpointError as e:
        log.debug("ignoring %s (%s)", path, e)
        return None
    return runner if runner.metadata.get("source_sha256") == sha else None


def open_cached_export(
    checkpoint: str | Path | None, *, cache: str | Path | None = None, threads: int | None = None, lanes: int | None = None
) -> tuple[ModelBundle, OnnxRunner] | None:
    """The cached export of a checkpoint file and the model description from its metadata, or
    ``None`` when there is none yet (or onnxruntime is missing). Imports no PyTorch.

    The description's ``path`` and ``sha256`` are the checkpoint file's, so Grad-CAM can load
    the PyTorch model from it later (checked against the same hash).

    Args:
        checkpoint: ``.pt`` file, run directory, or ``None`` for the default model.
        cache: cache folder (default :func:`cache_dir`).
        threads, lanes: onnxruntime threads (see :func:`~pneumoscan.inference.runners.plan_threads`).

    Raises:
        CheckpointError: missing checkpoint file, or the default model fails its checksum.
    """
    if not have_onnxruntime():
        return None
    if checkpoint is None:
        shipped = open_shipped_default(threads=threads, lanes=lanes)
        if shipped is not None:
            return shipped
    ref = bundle_ref(checkpoint)
    for f in sorted(export_dir(cache).glob(f"*-{ref.sha256[:16]}.onnx")):
        runner = _export_of(f, ref.sha256, threads, lanes)
        if runner is None:
            continue
        bundle = bundle_from_metadata(runner.metadata, str(f))
        bundle.path, bundle.sha256 = ref.path, ref.sha256
        log.debug("using cached ONNX export %s", f)
        return bundle, runner
    return None


def open_shipped_default(*, threads: int | None = None, lanes: int | None = None) -> tuple[ModelBundle, OnnxRunner] | None:
    """The shipped default model's own ONNX export and its description, or ``None`` when the
    installed manifest lists none. Hashes the ONNX file (not the ``.pt``), imports no PyTorch.

    The description's ``path`` and ``sha256`` are the ``.pt`` file's (as its manifest says), so
    answers name the same weights as the PyTorch backend and Grad-CAM through PyTorch, where
    needed, loads that file (checked against the same hash).

    Raises:
        CheckpointError: the export is missing, fails its checksum, or does not belong to the
            shipped ``.pt`` file.
    """
    ref = default_onnx()
    if ref is None:
        return None
    runner = OnnxRunner.open(ref.path, threads=threads, lanes=lanes)
    man = default_manifest()
    if runner.metadata.get("source_sha256") != man["sha256"]:
        raise CheckpointError(f"{ref.path.name} was not exported from the shipped {man['file']} (source_sha256 differs)")
    bundle = bundle_from_metadata(runner.metadata, str(ref.path))
    bundle.path, bundle.sha256 = default_model_dir() / str(man["file"]), str(man["sha256"])
    bundle.name = str(man.get("name") or bundle.name)
    log.debug("using the shipped ONNX export %s", ref.path)
    return bundle, runner


def cached_export_runner(
    bundle: ModelBundle, *, cache: str | Path | None = None, threads: int | None = None, lanes: int | None = None
) -> OnnxRunner:
    """A runner on the cached export of a loaded bundle, exporting it first if needed.

    Args:
        bundle: a bundle with weights.
        cache: cache folder (default :func:`cache_dir`).
        threads, lanes: onnxruntime threads.

    Raises:
        ConfigError: onnx/onnxruntime missing.
        ModelError: the export failed.
    """
    from .onnx_export import export_onnx

    sha = bundle.sha256 or "unhashed"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in bundle.name)[:80]
    target = export_dir(cache) / f"{safe}-{sha[:16]}.onnx"
    runner = _export_of(target, sha, threads, lanes) if bundle.sha256 and target.is_file() else None
    if runner is None:
        log.info("exporting %s to ONNX (%s)", bundle.name, target)
        export_onnx(bundle, target)
        runner = OnnxRunner.open(target, threads=threads, lanes=lanes)
    else:
        log.debug("using cached ONNX export %s", target)
    return runner
