"""Run configuration: YAML round trip, partial files completed with defaults, unknown keys,
typed ``--set`` overrides, validation and the shipped presets."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pneumoscan.config import TrainConfig, list_presets, load_preset
from pneumoscan.errors import ConfigError

PRESETS = list_presets()


def test_default_config_is_valid_and_plain() -> None:
    cfg = TrainConfig()
    cfg.validate()
    d = cfg.to_dict()
    assert set(d) >= {"data", "model", "optim", "augment", "epochs", "batch_size", "class_balance"}
    assert d["augment"]["crop_scale"] == [0.7, 1.0]  # tuples become lists (YAML / torch.save safe)
    assert yaml.safe_load(cfg.to_yaml()) == d


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = TrainConfig().override({
        "data.root": "/data/chest_xray", "data.val_fraction": 0.2, "model.name": "resnet18", "model.weights": "imagenet",
        "model.input_size": 192, "model.dropout": 0.3, "optim.optimizer": "sgd", "optim.lr": 0.003,
        "augment.crop_scale": [0.5, 0.9], "epochs": 7, "class_balance": "sampler", "precision": "fp32", "progress": False,
    })
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    back = TrainConfig.from_yaml(path)
    assert back == cfg
    assert back.augment.crop_scale == (0.5, 0.9)
    assert isinstance(back.augment.crop_scale, tuple)
    assert back.model.input_size == 192 and back.optim.lr == 0.003


def test_partial_yaml_is_completed_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("model: {name: densenet121}\noptim:\n  lr: 3.0e-4\nepochs: 4\n", encoding="utf-8")
    cfg = TrainConfig.from_yaml(path)
    default = TrainConfig()
    assert cfg.model.name == "densenet121" and cfg.optim.lr == 3e-4 and cfg.epochs == 4
    assert cfg.model.weights == default.model.weights
    assert cfg.optim.optimizer == default.optim.optimizer and cfg.optim.scheduler == default.optim.scheduler
    assert cfg.data == default.data and cfg.augment == default.augment
    assert cfg.batch_size == default.batch_size and cfg.threshold_method == default.threshold_method


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert TrainConfig.from_yaml(path) == TrainConfig()


@pytest.mark.parametrize(
    "text, key",
    [
        ("epoch: 3\n", "epoch"),
        ("optim: {learning_rate: 0.1}\n", "optim.learning_rate"),
        ("model: {name: seed_cnn, pretrained: true}\n", "model.pretrained"),
    ],
)
def test_unknown_yaml_key_raises_config_error(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        TrainConfig.from_yaml(path)


def test_bad_yaml_files_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {name: seed_cnn\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        TrainConfig.from_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_yaml(listing)
    section = tmp_path / "section.yaml"
    section.write_text("optim: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="optim"):
        TrainConfig.from_yaml(section)


def test_set_overrides_are_typed() -> None:
    """``--set`` values arrive as strings; each ends up with its field's type."""
    cfg = TrainConfig().override({
        "optim.lr": "1e-3",  # YAML 1.1 reads this as a string; the field is a float
        "optim.weight_decay": "5.0e-4",
        "epochs": "3",
        "batch_size": "16",
        "model.weights": "none",
        "model.input_size": "64",
        "model.dropout": "0.25",
        "model.freeze_backbone": "true",
        "model.unfreeze_at_epoch": "2",
        "augment.crop_scale": "[0.5, 1]",
        "augment.enabled": "off",
        "data.root": "/data/x",
        "data.cache": "false",
        "progress": "no",
    })
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 5e-4 and type(cfg.optim.weight_decay) is float
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.batch_size == 16 and type(cfg.batch_size) is int
    assert cfg.model.weights is None
    assert cfg.model.input_size == 64 and type(cfg.model.input_size) is int
    assert cfg.model.dropout == 0.25
    assert cfg.model.freeze_backbone is True and cfg.model.unfreeze_at_epoch == 2
    assert cfg.augment.crop_scale == (0.5, 1.0) and all(type(v) is float for v in cfg.augment.crop_scale)
    assert cfg.augment.enabled is False and cfg.data.cache is False and cfg.progress is False
    assert cfg.data.root == "/data/x"
    cfg.validate()
    # already-typed values pass through; the original is not modified
    cfg2 = cfg.override({"optim.lr": 0.01, "model.input_size": None})
    assert cfg2.optim.lr == 0.01 and cfg2.model.input_size is None and cfg.optim.lr == 1e-3


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("optim.lrr", "0.1", "unknown config key 'optim.lrr'"),
        ("optimizer.lr", "0.1", "unknown config section 'optimizer'"),
        ("epochs.max", "3", "unknown config section 'epochs'"),
        ("epochs", "three", "'epochs' expects int"),
        ("optim.lr", "fast", "'optim.lr' expects float"),
        ("model.freeze_backbone", "maybe", "'model.freeze_backbone' expects bool"),
        ("augment.crop_scale", "[0.5]", "'augment.crop_scale' expects"),
        ("batch_size", "2.5", "'batch_size' expects int"),
    ],
)
def test_bad_overrides_raise_config_error(key: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig().override({key: value})


@pytest.mark.parametrize(
    "over, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"data.val_fraction": 1.0}, "val_fraction"),
        ({"optim.lr": 0}, "lr"),
        ({"optim.optimizer": "rmsprop"}, "optimizer"),
        ({"optim.scheduler": "step"}, "scheduler"),
        ({"class_balance": "oversample"}, "class_balance"),
        ({"precision": "int8"}, "precision"),
        ({"threshold_method": "max"}, "threshold_method"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_validate_rejects_values_that_cannot_work(over: dict[str, object], match: str) -> None:
    cfg = TrainConfig().override(over)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_presets_are_shipped() -> None:
    assert {"default", "study_seed_cnn", "study_vgg16", "study_resnet50"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name: str) -> None:
    from pneumoscan.models import list_models

    cfg = load_preset(name)
    cfg.validate()
    assert cfg.model.name in list_models()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_contents_match_their_recipes() -> None:
    default = load_preset("default")
    assert (default.model.name, default.model.weights) == ("mobilenet_v2", "imagenet")
    assert default.optim.optimizer == "adamw" and default.optim.scheduler == "cosine"
    seed = load_preset("study_seed_cnn")
    assert (seed.model.name, seed.optim.optimizer, seed.optim.lr, seed.batch_size) == ("seed_cnn", "adam", 1e-4, 32)
    assert seed.class_balance == "weighted_loss" and seed.optim.scheduler == "plateau"
    vgg = load_preset("study_vgg16")
    assert vgg.model.name == "vgg16" and vgg.model.freeze_backbone is True
    resnet = load_preset("study_resnet50")
    assert resnet.model.name == "resnet50" and resnet.optim.optimizer == "sgd"


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*study_seed_cnn"):
        load_preset("nope")


def test_every_field_is_documented() -> None:
    """docs/training.md lists the keys from these docstrings: keep them complete."""
    from pneumoscan.config import _SECTIONS

    for cls in [TrainConfig, *_SECTIONS.values()]:
        doc = cls.__doc__ or ""
        for f in dataclasses.fields(cls):
            if f.name in _SECTIONS:
                continue
            assert f"{f.name}:" in doc or f"{f.name}," in doc, f"{cls.__name__}.{f.name} is missing from its docstring"


def test_cli_builds_config_from_preset_flags_and_set(tmp_path: Path) -> None:
    from pneumoscan.cli import build_parser
    from pneumoscan.cli.train import build_train_config

    args = build_parser().parse_args([
        "train", "--preset", "study_seed_cnn", "--data", str(tmp_path), "--epochs", "2", "--weights", "none",
        "--set", "optim.lr=1e-3", "--set", "model.freeze_backbone=true", "--set", "augment.crop_scale=[0.6,1.0]",
        "--set", "epochs=5", "--no-progress", "--out", str(tmp_path / "run"),
    ])
    cfg = build_train_config(args)
    assert cfg.model.name == "seed_cnn" and cfg.batch_size == 32  # from the preset
    assert cfg.data.root == str(tmp_path) and cfg.model.weights is None  # from flags
    assert cfg.optim.lr == 1e-3 and cfg.model.freeze_backbone is True and cfg.augment.crop_scale == (0.6, 1.0)
    assert cfg.epochs == 5  # --set comes after the flags
    assert cfg.progress is False


def test_cli_builds_config_from_yaml_file(tmp_path: Path) -> None:
    from pneumoscan.cli import build_parser
    from pneumoscan.cli.train import build_train_config

    path = tmp_path / "run.yaml"
    path.write_text("model: {name: resnet18}\nepochs: 9\n", encoding="utf-8")
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "0.002"])
    cfg = build_train_config(args)
    assert (cfg.model.name, cfg.epochs, cfg.optim.lr) == ("resnet18", 9, 0.002)


def test_training_docs_list_every_config_key() -> None:
    """docs/training.md's key tables are generated from the docstrings: regenerate on change."""
    from pneumoscan.config import _SECTIONS

    docs = Path(__file__).resolve().parents[1] / "docs" / "training.md"
    if not docs.is_file():
        pytest.skip("docs/ not present in this installation")
    text = docs.read_text(encoding="utf-8")
    keys = [f"`{f.name}`" for f in dataclasses.fields(TrainConfig) if f.name not in _SECTIONS]
    keys += [f"`{sec}.{f.name}`" for sec, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
    missing = [k for k in keys if k not in text]
    assert not missing, f"docs/training.md lacks {missing}"
