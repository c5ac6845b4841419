"""Run configuration as dataclasses: loadable from YAML, overridable from the CLI
(``--set section.key=value``) and saved with every run as ``config.yaml``."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    """Where the images are and how validation is carved out.

    Attributes:
        root: dataset folder (``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}``) or CSV manifest.
        train_split: split folder used for training.
        val_source: ``"grouped"`` (patient-grouped split of train, default), ``"official"``
            (the folder's ``val`` split), a path to a CSV manifest, or ``"fold:I/K"`` (fold I
            of a patient-grouped K-fold split of train, as ``train --folds K`` sets it).
        val_fraction: share of train patients held out for validation.
        split_seed: seed of the grouped split.
        cache: keep decoded uint8 images in memory (no JPEG decoding after epoch 1).
        num_workers: DataLoader workers (0 = main process).
        limit: use at most this many training images (smoke tests), 0 = all.
        columns: a CSV manifest's own column names, ``"path=filename,label=target"`` (empty:
            the manifest uses ``path``, ``label``, ``patient_id``, ``split``).
        card: a data card file (YAML, or Markdown with front matter: name, source, licence,
            citation, population) for the model card; empty: the data folder's data card or
            README (:func:`~pneumoscan.evaluation.data_card.load_data_card`).
    """

    root: str = ""
    train_split: str = "train"
    val_source: str = "grouped"
    val_fraction: float = 0.15
    split_seed: int = 42
    cache: bool = True
    num_workers: int = 0
    limit: int = 0
    columns: str = ""
    card: str = ""


@dataclass
class AugmentConfig:
    """The study's augmentation, on uint8 tensors.

    Attributes:
        enabled: apply augmentation at all.
        crop_scale: (min, max) area fraction of the random resized crop.
        crop_ratio: (min, max) aspect ratio of the random resized crop.
        hflip: probability of a horizontal flip.
        rotation: maximum rotation in degrees.
        brightness: brightness jitter strength.
        contrast: contrast jitter strength.
        gamma: gamma drawn log-uniformly in [1/(1+g), 1+g] for every image (0 = off).
        equalize: probability of histogram equalisation (0 = off).
        autocontrast: probability of autocontrast (stretching to the full grey range).
        blur: probability of a Gaussian blur (sigma 0.3-1.5 pixels at the input size).
        sharpen: probability of sharpening (factor 2).
        noise: largest standard deviation of added Gaussian noise, fraction of the range (0 = off).
        letterbox: probability of padding with black bars to an aspect up to 4:3, then resizing back.
        jpeg: probability of JPEG re-compression at a quality in ``jpeg_quality``.
        jpeg_quality: (min, max) JPEG quality of the re-compression.
    """

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.85, 1.18)
    hflip: float = 0.5
    rotation: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: float = 0.0
    equalize: float = 0.0
    autocontrast: float = 0.0
    blur: float = 0.0
    sharpen: float = 0.0
    noise: float = 0.0
    letterbox: float = 0.0
    jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 90)


@dataclass
class ModelConfig:
    """Which network and how it is initialised.

    Attributes:
        name: a registered model (``pneumoscan models``).
        weights: ``None``, ``"imagenet"`` or a path to a state-dict file.
        input_size: override the model's default input size (pixels, square).
        freeze_backbone: train only the classifier head.
        unfreeze_at_epoch: unfreeze the backbone from this epoch on (0 = never).
        dropout: head dropout where the model has one.
    """

    name: str = "seed_cnn"
    weights: str | None = None
    input_size: int | None = None
    freeze_backbone: bool = False
    unfreeze_at_epoch: int = 0
    dropout: float | None = None


@dataclass
class OptimConfig:
    """Optimiser and schedule.

    Attributes:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum).
        lr: learning rate.
        weight_decay: L2 / decoupled weight decay.
        momentum: SGD momentum.
        scheduler: ``"plateau"`` (reduce-LR-on-plateau), ``"cosine"`` or ``"none"``.
        plateau_factor: LR factor of the plateau scheduler.
        plateau_patience: epochs without improvement before reducing the LR.
        warmup_epochs: linear warm-up epochs (cosine only).
        grad_clip: max gradient norm (0 = off).
    """

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "plateau"
    plateau_factor: float = 0.3
    plateau_patience: int = 2
    warmup_epochs: int = 0
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run directory.

    Attributes:
        data, model, optim, augment: sub-configurations.
        epochs: maximum number of epochs.
        batch_size: images per step (per process under DDP).
        class_balance: ``"weighted_loss"`` (study), ``"sampler"`` or ``"none"``.
        label_smoothing: smoothing of the binary targets.
        ema_decay: keep an exponential moving average of the weights with this decay (e.g.
            0.999; 0 = off); validation, ``best.pt`` and ``last.pt`` then use the averaged weights.
        shift_val_images: validation images also scored under fixed perturbations after every
            epoch (``val_shift_*`` in the history; 0 = off).
        early_stopping_patience: stop after this many epochs without val-loss improvement (0 = off).
        min_epoch_for_best: only epochs >= this may become ``best.pt``.
        seed: global seed.
        deterministic: use deterministic algorithms (slower).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``.
        channels_last: ``"auto"``, ``"on"``, ``"off"``.
        threshold_method: operating-point rule fitted on validation: ``"youden"``,
            ``"sensitivity"`` or ``"f1"``.
        target_sensitivity: the sensitivity the ``"sensitivity"`` rule must reach.
        calibrate: fit temperature scaling on validation at the end of training.
        sync_bn: convert BatchNorm to SyncBatchNorm under DDP.
        log_every: log a line every N steps (0 = only per epoch).
        progress: show a progress bar.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 10
    batch_size: int = 32
    class_balance: str = "weighted_loss"
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    shift_val_images: int = 256
    early_stopping_patience: int = 5
    min_epoch_for_best: int = 1
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    threshold_method: str = "youden"
    target_sensitivity: float = 0.95
    calibrate: bool = True
    sync_bn: bool = False
    log_every: int = 0
    progress: bool = True

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), safe for YAML and ``torch.save``."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a (possibly partial) nested dict; unknown keys raise ConfigError."""
        return _from_dict(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Load a YAML file (a partial config is completed with defaults)."""
        try:
            with open(path, encoding="utf-8") as fh:
                d = yaml.safe_load(fh) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e.__class__.__name__})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
        return cls.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def override(self, dotted: dict[str, Any]) -> "TrainConfig":
        """Return a copy with ``{"optim.lr": 1e-3, ...}`` applied (values already typed
        or strings parsed as YAML scalars)."""
        d = self.to_dict()
        for key, value in dotted.items():
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass
            node = d
            parts = key.split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"unknown config section '{p}' in '{key}'{_did_you_mean(key)}")
                node = node[p]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config key '{key}'{_did_you_mean(key)}")
            node[parts[-1]] = value
        return TrainConfig.from_dict(d)

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0.0 < self.data.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.optimizer in {"adam", "adamw", "sgd"}, "optim.optimizer must be adam, adamw or sgd"),
            (self.optim.scheduler in {"plateau", "cosine", "none"}, "optim.scheduler must be plateau, cosine or none"),
            (self.class_balance in {"weighted_loss", "sampler", "none"}, "class_balance must be weighted_loss, sampler or none"),
            (self.precision in {"auto", "fp32", "bf16", "fp16"}, "precision must be auto, fp32, bf16 or fp16"),
            (self.channels_last in {"auto", "on", "off"}, "channels_last must be auto, on or off"),
            (self.threshold_method in {"youden", "sensitivity", "f1"}, "threshold_method must be youden, sensitivity or f1"),
            (self.device in {"auto", "cpu", "cuda", "mps"} or self.device.startswith("cuda:"), "device must be auto, cpu, cuda or mps"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.shift_val_images >= 0, "shift_val_images must be >= 0"),
            (self.augment.gamma >= 0 and 0.0 <= self.augment.noise < 1.0, "augment.gamma must be >= 0 and augment.noise in [0, 1)"),
            (all(0.0 <= getattr(self.augment, k) <= 1.0 for k in ("hflip", "equalize", "autocontrast", "blur", "sharpen", "letterbox", "jpeg")),
             "augment probabilities (hflip, equalize, autocontrast, blur, sharpen, letterbox, jpeg) must be in [0, 1]"),
            (1 <= self.augment.jpeg_quality[0] <= self.augment.jpeg_quality[1] <= 100, "augment.jpeg_quality must be (min, max) with 1 <= min <= max <= 100"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


def config_keys() -> list[str]:
    """Every dotted key of :class:`TrainConfig` (``epochs``, ``optim.lr``, ...), in declaration order."""
    keys: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        sub = _SECTIONS.get(f.name)
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)] if sub is not None else [f.name]
    return keys


def suggest_keys(key: str, n: int = 3) -> list[str]:
    """Known config keys close to an unknown one, best first: the same name in another section
    (``lr`` → ``optim.lr``), a name its words abbreviate (``optim.learning_rate`` → ``optim.lr``),
    then similar spellings.

    Args:
        key: the unknown dotted key.
        n: at most this many suggestions.
    """
    known = config_keys()
    key = key.strip().lower()
    leaf = key.rsplit(".", 1)[-1]

    def abbrev(name: str) -> str:
        return "".join(w[:1] for w in name.split("_") if w) if "_" in name else ""

    initials = abbrev(leaf)
    strong = [k for k in known if k != key and k.rsplit(".", 1)[-1] in (leaf, initials if len(initials) > 1 else leaf)]
    strong += [k for k in known if len(leaf) > 1 and abbrev(k.rsplit(".", 1)[-1]) == leaf]
    if strong:
        return strong[:n]
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in known), reverse=True)
    best = scored[0][0] if scored else 0.0
    return [k for r, k in scored if r >= max(0.6, best - 0.1)][:n]


def _did_you_mean(key: str) -> str:
    close = suggest_keys(key)
    return f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix or 'root'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_did_you_mean(f'{prefix}{key}')}")
        sub = _SECTIONS.get(key) if cls is TrainConfig else None
        if sub is not None:
            kwargs[key] = _from_dict(sub, value or {}, f"{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


_NONE_WORDS = frozenset({"none", "null", "~", ""})
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or ``--set`` value to the field's declared type: ``"1e-3"`` (a string
    for YAML) becomes 0.001, ``"none"`` becomes ``None`` for optional fields, ``[0.5, 1]``
    becomes a tuple; a value that does not fit raises ConfigError instead of failing later.

    Args:
        value: the value as parsed from YAML.
        tp: the field's type hint.
        key: the dotted key, for the error message.
    """
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
                return value.strip().lower() in _TRUE_WORDS
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        elif typing.get_origin(tp) is tuple:
            items = typing.get_args(tp)
            if isinstance(value, (list, tuple)) and len(value) == len(items):
                return tuple(_coerce(v, t, key) for v, t in zip(value, items))
        else:
            return value
    except (ValueError, ConfigError):
        pass
    expected = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    expected = expected or str(tp)
    raise ConfigError(f"config key '{key}' expects {expected}{' or none' if optional else ''}, got {value!r}")


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "augment": AugmentConfig,
}


def list_presets() -> list[str]:
    """Names of the preset configs shipped with the package."""
    files = resources.files("pneumoscan").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> TrainConfig:
    """Load a shipped preset (``default``, ``study_seed_cnn``, ``study_vgg16``, ...)."""
    f = resources.files("pneumoscan").joinpath("presets", f"{name}.yaml")
    if not f.is_file():
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(list_presets())})")
    d = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    return TrainConfig.from_dict(d)
