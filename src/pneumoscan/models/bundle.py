"""The trained-model bundle: one record holding everything a trained network needs to answer.

A :class:`ModelBundle` is to pneumoscan what timm's ``PretrainedCfg`` plus torchvision's
``Weights`` are to them, but for a *trained* model: the architecture name and arguments, the
state dict, the preprocessing, the class names, the operating threshold and how it was chosen,
the temperature, the validation metrics, provenance (training config, data description,
split, history, validation logits) and the file's sha256.

This module is the only place that saves, loads, hashes and validates bundles. Every caller
(training, predict, evaluate, serve, export, calibrate, benchmarks, the shipped default model)
goes through :func:`load_bundle` / :func:`save_bundle` / :func:`bundle_ref`.

On disk a bundle is a plain dict of tensors and built-in types, loaded with
``torch.load(..., weights_only=True)``; the file is read once, hashed from the same bytes and
never re-read. Files of the first checkpoint format (``pneumoscan-checkpoint/1``: one flat
dict) load too. Nothing here imports PyTorch at module level: :func:`bundle_ref` resolves and
hashes a file without it (the ONNX fast path), and a bundle built from ONNX metadata
(:meth:`ModelBundle.from_info`) has no state dict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pickle
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..core.labels import CLASS_NAMES
from ..data.preprocessing import Preprocessing
from ..errors import CheckpointError
from ..utils.io import atomic_write_bytes, sha256_file
from .validation import as_float, jsonable, parse_preprocessing, validate_bundle

if TYPE_CHECKING:
    from torch import nn

#: Format written by :func:`save_bundle`.
BUNDLE_FORMAT = "pneumoscan-bundle/2"
#: The first checkpoint format (a flat dict), still read.
LEGACY_FORMAT = "pneumoscan-checkpoint/1"
#: Shipped default model: folder inside the package and its manifest.
DEFAULT_DIR = "assets/default"
DEFAULT_MANIFEST = "default.json"
#: Keys of a run's resumable training state (kept out of a deployable bundle).
TRAINING_KEYS = ("optimizer", "scheduler", "torch_rng", "loader_rng", "epoch", "best_loss", "best_epoch", "bad_epochs", "stopped")
#: Keys of the first format that became provenance.
_LEGACY_PROVENANCE = ("config", "history", "val_logits", "val_labels", "val_logits_source", "trainable_parameters", "calibration")


@dataclass
class ModelBundle:
    """A trained model with everything needed to run, calibrate and describe it.

    Attributes:
        arch: registry name of the architecture (``mobilenet_v2``, ``seed_cnn``, ...).
        preprocessing: how raw pixels become the network's input.
        state_dict: the weights (tensors); ``None`` for a bundle described by ONNX metadata.
        arch_kwargs: builder arguments (``input_size``, ``dropout``, ...).
        class_names: names by label index; always ``("NORMAL", "PNEUMONIA")``.
        threshold: operating threshold on calibrated probabilities, in (0, 1).
        threshold_method: how the threshold was chosen (``sensitivity``, ``youden``, ...).
        temperature: temperature scaling, ``probability = sigmoid(logit / temperature)``.
        name: the weights' name shown with every prediction (``arch-res224-dataset``).
        val_metrics: validation metrics at the threshold.
        provenance: where it came from: ``config`` (the resolved training config), ``data``
            (description), ``history``, ``val_logits``/``val_labels``, ``calibration``,
            ``seen_images`` (digests of its training and calibration images:
            :mod:`pneumoscan.models.seen`), ...
        training: resumable training state (optimizer, scheduler, RNG, epoch counters); only
            in a run's ``last.pt``.
        sha256: hash of the file it was loaded from or saved to (``""`` when in memory only).
        path: that file.
        format: bundle format version.
    """

    arch: str
    preprocessing: Preprocessing
    state_dict: dict[str, Any] | None = field(default=None, repr=False)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = CLASS_NAMES
    threshold: float = 0.5
    threshold_method: str | None = None
    temperature: float = 1.0
    name: str = ""
    val_metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)
    training: dict[str, Any] = field(default_factory=dict, repr=False)
    sha256: str = ""
    path: Path | None = None
    format: str = BUNDLE_FORMAT

    def __post_init__(self) -> None:
        if not self.name:
            self.name = default_weight_name(self.arch, self.preprocessing.input_size, self.path)

    # ------------------------------------------------------------------ derived values
    @property
    def weights_id(self) -> str:
        """Short id of the weights: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def logit_threshold(self) -> float:
        """The raw logit at which the label turns to the positive class."""
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return self.temperature * math.log(t / (1 - t))

    def label_of(self, probability: float) -> str:
        """The class name of a calibrated probability at the operating threshold."""
        return self.class_names[int(probability >= self.threshold)]

    def replace(self, **changes: Any) -> "ModelBundle":
        """A copy with some fields changed (``sha256``/``path`` are cleared unless given:
        the copy is not the file any more)."""
        changes.setdefault("sha256", "")
        changes.setdefault("path", None)
        return dataclasses.replace(self, **changes)

    def deployable(self) -> "ModelBundle":
        """This bundle without its resumable training state."""
        return dataclasses.replace(self, training={})

    # ------------------------------------------------------------------ conversion
    def info(self) -> dict[str, Any]:
        """Everything but the weights, the training history and config and the training state,
        as JSON-able values: what ONNX metadata, ``/v1/model`` and model cards carry (the
        validation logits and the distribution-shift detector included: an ONNX runner needs
        them for the operating curve and the shift check)."""
        prov = {k: v for k, v in self.provenance.items() if k not in ("history", "config")}
        return {
            "format": self.format, "name": self.name, "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs),
            "sha256": self.sha256, "preprocessing": self.preprocessing.to_dict(), "class_names": list(self.class_names),
            "threshold": float(self.threshold), "threshold_method": self.threshold_method,
            "temperature": float(self.temperature), "val_metrics": jsonable(self.val_metrics), "provenance": jsonable(prov),
        }

    @classmethod
    def from_info(cls, info: Mapping[str, Any], *, source: str = "metadata") -> "ModelBundle":
        """A bundle without weights from :meth:`info` output (e.g. an ONNX file's metadata).

        Raises:
            CheckpointError: missing or invalid values.
        """
        try:
            b = cls(
                arch=str(info["arch"]), preprocessing=parse_preprocessing(info["preprocessing"], source),
                arch_kwargs=dict(info.get("arch_kwargs") or {}), class_names=tuple(info.get("class_names") or CLASS_NAMES),
                threshold=as_float(info.get("threshold", 0.5)), threshold_method=info.get("threshold_method"),
                temperature=as_float(info.get("temperature", 1.0)), name=str(info.get("name") or ""),
                val_metrics=dict(info.get("val_metrics") or {}), provenance=dict(info.get("provenance") or {}),
                sha256=str(info.get("sha256") or ""), format=str(info.get("format") or BUNDLE_FORMAT),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: malformed model description ({e})") from e
        validate_bundle(b, source)
        return b

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (plain dict of tensors and built-ins)."""
        d: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs), "state_dict": self.state_dict,
            "preprocessing": self.preprocessing.to_dict(), "class_names": list(self.class_names),
            "threshold": float(self.threshold), "threshold_method": self.threshold_method, "temperature": float(self.temperature),
            "name": self.name, "val_metrics": dict(self.val_metrics), "provenance": dict(self.provenance),
        }
        if self.training:
            d["training"] = dict(self.training)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, path: Path | None = None, sha256: str = "", source: str | None = None) -> "ModelBundle":
        """Rebuild from :meth:`to_dict` output or a first-format checkpoint dict.

        Raises:
            CheckpointError: not a pneumoscan bundle, or values that fail :func:`validate_bundle`.
        """
        src = source or str(path or "checkpoint")
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{src}: not a pneumoscan checkpoint")
        if d.get("format") == BUNDLE_FORMAT:
            arch, kwargs, name = d.get("arch"), d.get("arch_kwargs"), d.get("name")
            provenance, training = d.get("provenance") or {}, d.get("training") or {}
        elif "model_name" in d and d.get("format", LEGACY_FORMAT) == LEGACY_FORMAT:
            arch, kwargs, name = d.get("model_name"), d.get("model_kwargs"), d.get("weight_name")
            provenance = {k: d[k] for k in _LEGACY_PROVENANCE if k in d}
            training = {k: d[k] for k in TRAINING_KEYS if k in d}
        else:
            raise CheckpointError(f"{src}: not a pneumoscan checkpoint (no model architecture and weights)")
        sd = d.get("state_dict")
        if not isinstance(arch, str) or not arch or not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
            raise CheckpointError(f"{src}: malformed pneumoscan checkpoint (architecture must be a name, state_dict a dict of tensors)")
        for key, value in (("arch_kwargs", kwargs), ("preprocessing", d.get("preprocessing")), ("provenance", provenance), ("training", training)):
            if value is not None and not isinstance(value, Mapping):
                raise CheckpointError(f"{src}: malformed pneumoscan checkpoint ('{key}' must be a dict)")
        if d.get("preprocessing") is None:
            raise CheckpointError(f"{src}: malformed pneumoscan checkpoint (no preprocessing)")
        try:
            b = cls(
                arch=arch, preprocessing=parse_preprocessing(d["preprocessing"], src), state_dict=dict(sd), arch_kwargs=dict(kwargs or {}),
                class_names=tuple(d.get("class_names") or CLASS_NAMES),
                threshold=as_float(d["threshold"] if d.get("threshold") is not None else 0.5),
                threshold_method=d.get("threshold_method"),
                temperature=as_float(d["temperature"] if d.get("temperature") is not None else 1.0),
                name=str(name or ""), val_metrics=dict(d.get("val_metrics") or {}), provenance=dict(provenance),
                training=dict(training), sha256=sha256, path=path, format=str(d.get("format") or LEGACY_FORMAT),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{src}: malformed pneumoscan checkpoint ({e})") from e
        validate_bundle(b, src)
        return b

    # ------------------------------------------------------------------ the network
    def build_model(self) -> "nn.Module":
        """The network with these weights (eval mode, fp32, on the CPU).

        Raises:
            CheckpointError: no weights, or weights/arguments that do not fit the architecture.
        """
        import torch

        from .factory import create_model

        if self.state_dict is None:
            raise CheckpointError(f"{self.name}: this model description carries no PyTorch weights")
        if not all(isinstance(v, torch.Tensor) for v in self.state_dict.values()):
            raise CheckpointError(f"{self.name}: malformed state_dict (values must be tensors)")
        try:
            model = create_model(self.arch, weights=None, **self.arch_kwargs)
        except TypeError as e:  # arch_kwargs the builder does not take
            raise CheckpointError(f"checkpoint model arguments do not fit model '{self.arch}' ({e})") from e
        sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in self.state_dict.items()}
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint weights do not fit model '{self.arch}' ({str(e).splitlines()[0]})") from e
        return model.eval()


def default_weight_name(arch: str, input_size: int, path: Path | None) -> str:
    """``arch-res<size>-<run folder>``, the naming of pneumoscan weights."""
    return f"{arch}-res{input_size}-{Path(path).parent.name if path else 'checkpoint'}"


# ----------------------------------------------------------------------------- files
@dataclass(frozen=True)
class BundleRef:
    """A bundle file, resolved and hashed (once) but not loaded.

    Attributes:
        path: the ``.pt`` file.
        sha256: its hash.
        is_default: it is the shipped default model (verified against its manifest).
    """

    path: Path
    sha256: str
    is_default: bool = False


def default_model_dir() -> Path:
    """Folder of the shipped default model inside the installed package."""
    return Path(str(resources.files("pneumoscan").joinpath(DEFAULT_DIR)))


def default_manifest(folder: str | Path | None = None) -> dict[str, Any]:
    """The shipped default model's manifest (``name``, ``file``, ``sha256``, and ``onnx_file``,
    ``onnx_sha256`` for its ONNX export, ...).

    Args:
        folder: where it lies (default :func:`default_model_dir`).
    """
    f = Path(folder or default_model_dir()) / DEFAULT_MANIFEST
    if not f.is_file():
        raise CheckpointError(f"the default model is not installed ({f} missing); pass --checkpoint")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the default model's manifest {f} is unreadable ({e})") from e


def default_onnx() -> BundleRef | None:
    """The shipped default model's ONNX export, verified against its manifest's
    ``onnx_sha256`` (its ``.pt`` file is not read: a loader of the ``.pt`` checks that); ``None``
    when the manifest lists no export. The ONNX runtime's own path: no PyTorch.

    Raises:
        CheckpointError: the listed file is missing or fails its checksum.
    """
    man = default_manifest()
    if not man.get("onnx_file"):
        return None
    path = default_model_dir() / str(man["onnx_file"])
    if not path.is_file():
        raise CheckpointError(f"default model file missing: {path}")
    digest = sha256_file(path)
    if digest != man.get("onnx_sha256"):
        raise CheckpointError(f"default model {path.name} failed its checksum (sha256 {digest[:12]}…, expected {str(man.get('onnx_sha256'))[:12]}…)")
    return BundleRef(path, digest, True)


def record_default_onnx(onnx_file: str | Path) -> None:
    """List an ONNX export in the manifest beside it (``onnx_file``, ``onnx_sha256``).

    Args:
        onnx_file: the export, in the default model's folder.
    """
    from ..utils.io import atomic_write_text

    f = Path(onnx_file)
    man = default_manifest(f.parent)
    man.update(onnx_file=f.name, onnx_sha256=sha256_file(f))
    atomic_write_text(f.parent / DEFAULT_MANIFEST, json.dumps(man, indent=2) + "\n")


def bundle_ref(checkpoint: str | Path | None) -> BundleRef:
    """Resolve a checkpoint argument to a hashed file, without loading it or importing PyTorch.

    Args:
        checkpoint: a bundle file, a run directory (its ``best.pt``), or ``None`` for the shipped
            default model (whose hash must match its manifest).

    Raises:
        CheckpointError: missing file, or the default model fails its checksum.
    """
    if checkpoint is None:
        man = default_manifest()
        path = default_model_dir() / str(man["file"])
        if not path.is_file():
            raise CheckpointError(f"default model file missing: {path}")
        digest = sha256_file(path)
        if digest != man["sha256"]:
            raise CheckpointError(f"default model {path.name} failed its checksum (sha256 {digest[:12]}…, expected {str(man['sha256'])[:12]}…)")
        return BundleRef(path, digest, True)
    p = Path(checkpoint)
    if p.is_dir():
        p = p / "best.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return BundleRef(p, sha256_file(p))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from e


def load_bundle(checkpoint: str | Path | BundleRef | None = None) -> ModelBundle:
    """Load, hash and validate a bundle (safely: ``weights_only=True``).

    Args:
        checkpoint: a file, a run directory, a :class:`BundleRef` (its hash is re-checked on the
            bytes read), or ``None`` for the shipped default model.

    Raises:
        CheckpointError: missing, unsafe, corrupt, malformed or invalid bundle.
    """
    ref = checkpoint if isinstance(checkpoint, BundleRef) else None
    if ref is None:
        if checkpoint is None:
            ref = bundle_ref(None)
        else:
            p = Path(checkpoint)
            p = p / "best.pt" if p.is_dir() else p
            if not p.is_file():
                raise CheckpointError(f"checkpoint not found: {p}")
            ref = BundleRef(p, "")
    try:
        data = ref.path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{ref.path}: cannot read ({e.strerror or e})") from e
    except MemoryError as e:
        raise CheckpointError(f"{ref.path}: not a readable PyTorch checkpoint (too large for memory)") from e
    digest = hashlib.sha256(data).hexdigest()
    if ref.sha256 and digest != ref.sha256:
        raise CheckpointError(f"{ref.path} changed while it was being loaded (sha256 {digest[:12]}…, expected {ref.sha256[:12]}…)")
    d = _torch_load(data, ref.path)
    b = ModelBundle.from_dict(d, path=ref.path, sha256=digest)
    if ref.is_default:
        b.name = str(default_manifest().get("name") or b.name)
    return b


def _torch_load(data: bytes, path: Path) -> Any:
    import torch

    if data[:2] != b"PK" and not data[:1] == b"\x80":
        kind = _looks_like(data)
        hint = " (give it with --onnx)" if kind == "an ONNX model" else ""
        raise CheckpointError(f"{path} is {kind}, not a pneumoscan checkpoint{hint}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load (not a weights-only checkpoint; it may contain code)") from e
    except MemoryError as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (too large for memory)") from e
    except Exception as e:  # noqa: BLE001 - corrupt archives raise RuntimeError, EOFError, zipfile errors, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e.__class__.__name__})") from e


def _looks_like(data: bytes) -> str:
    head = data[:512]
    if not head:
        return "an empty file"
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG")) or head[128:132] == b"DICM":
        return "an image"
    if head.startswith(b"\x08") or b"onnx" in head[:64].lower() or b"pytorch" in head[:64].lower():
        return "an ONNX model"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "another kind of file"


def save_bundle(bundle: ModelBundle, path: str | Path) -> str:
    """Write a bundle atomically (temporary file + rename) and return the file's sha256;
    ``bundle.sha256`` and ``bundle.path`` are set to the new file.

    Raises:
        CheckpointError: the file could not be written (an older file at ``path`` is kept).
    """
    import torch

    buf = io.BytesIO()
    torch.save(bundle.to_dict(), buf)
    data = buf.getvalue()
    p = Path(path)
    try:
        atomic_write_bytes(p, data)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {p} ({e.strerror or e}); the previous file is unchanged") from e
    bundle.sha256, bundle.path = hashlib.sha256(data).hexdigest(), p
    return bundle.sha256


def save_default(bundle: ModelBundle, dest_dir: str | Path, name: str, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a bundle as a shippable default model (what builds ``assets/default``): fp16
    weights, no training state, named ``name``, plus the manifest with its sha256.

    Args:
        bundle: the trained model.
        dest_dir: destination folder (created if needed).
        name: the weights' name (and file stem).
        extra: more manifest entries (recipe, data, model card file, ...).

    Returns:
        The written ``<name>.pt``.
    """
    import torch

    from ..utils.io import atomic_write_text

    sd = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in (bundle.state_dict or {}).items()}
    b = bundle.deployable().replace(state_dict=sd, name=name)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    f = dest / f"{name}.pt"
    manifest = {
        "name": name, "file": f.name, "sha256": save_bundle(b, f), "model_name": b.arch,
        "threshold": b.threshold, "temperature": b.temperature, "threshold_method": b.threshold_method,
        "val_metrics": jsonable(b.val_metrics), "preprocessing": b.preprocessing.to_dict(),
        "data_license": "Kermany et al. 2018, doi:10.17632/rscbjbr9sj.2, CC BY 4.0",
        **(extra or {}),
    }
    atomic_write_text(dest / DEFAULT_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return f
