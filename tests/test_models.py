"""Model registry: every registered model builds, maps (B, 1, S, S) greyscale to (B, 1) logits
and trains (every trainable parameter gets a gradient); the study's parameter counts; weight
loading (ImageNet offline through the torch hub cache, a local state-dict file) and its errors."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from pneumoscan.errors import ModelError, WeightsError
from pneumoscan.models import count_parameters, create_model, get_spec, list_models
from pneumoscan.models.registry import XrayClassifier
from pneumoscan.models.weights import hub_checkpoint_dir, torchvision_weights

ALL_MODELS = list_models()
GRAD_SIZE = 64  # every registered architecture accepts a 64-px input (multiples of 32, adaptive pooling)
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def test_registry_lists_the_study_and_modern_models() -> None:
    assert {"seed_cnn", "vgg16", "resnet50", "resnet18", "densenet121", "mobilenet_v2", "efficientnet_b0"} <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)


def _quiet_stochastic_layers(model: nn.Module) -> None:
    """Dropout and stochastic depth to eval (identity) so that no gradient is zero by chance;
    BatchNorm stays in train mode (batch statistics, as in training)."""
    from torchvision.ops import StochasticDepth

    for m in model.modules():
        if isinstance(m, (nn.Dropout, StochasticDepth)):
            m.eval()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, input_size=GRAD_SIZE)
    assert isinstance(model, XrayClassifier)
    model.train()
    _quiet_stochastic_layers(model)
    x = torch.rand(2, 1, GRAD_SIZE, GRAD_SIZE)
    logits = model(x)
    assert logits.shape == (2, 1)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0], [1.0]])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable parameter"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient in {bad[:5]}"
    zero = [n for n, p in trainable if not p.grad.any()]
    assert not zero, f"{name}: all-zero gradient for {zero[:5]}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    for n in frozen:
        assert dict(model.named_parameters())[n].grad is None


@pytest.mark.parametrize("name", ALL_MODELS)
def test_spec_is_consistent_with_the_built_model(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):
        model = create_model(name)
    assert spec.gradcam_layer in dict(model.named_modules()), f"gradcam_layer {spec.gradcam_layer!r} is not a module of {name}"
    assert model.adapter.mean.shape[1] == spec.in_channels == len(spec.mean) == len(spec.std)
    prep = spec.preprocessing()
    assert prep.input_size == spec.input_size and prep.in_channels == spec.in_channels
    assert spec.preprocessing(96).input_size == 96
    assert getattr(model, "pneumoscan_name") == name
    assert count_parameters(model) > 0
    assert count_parameters(model, trainable_only=False) >= count_parameters(model)


def test_model_eval_output_at_default_input_size() -> None:
    """One model at its full default size (the shipped default's architecture, 224 px)."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 224, 224))
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_adapter_accepts_three_channel_input() -> None:
    torch.manual_seed(0)
    model = create_model("seed_cnn", input_size=64).eval()
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = model(grey)
        b = model(grey.expand(2, 3, 64, 64))
    torch.testing.assert_close(a, b)


def test_seed_cnn_trainable_parameters_at_128() -> None:
    model = create_model("seed_cnn", input_size=128)
    assert count_parameters(model) == 2_524_033
    assert count_parameters(model) == count_parameters(model, trainable_only=False)


def test_vgg16_head_trainable_parameters_at_256() -> None:
    with torch.device("meta"):
        model = create_model("vgg16", input_size=256)
    assert count_parameters(model) == 16_843_521
    assert count_parameters(model.head) == 16_843_521
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert count_parameters(model, trainable_only=False) == 16_843_521 + 14_714_688  # + VGG-16 conv features


def test_frozen_backbone_stays_in_eval_mode() -> None:
    with torch.device("meta"):
        model = create_model("vgg16", input_size=64)
    model.train()
    assert model.head.training and not model.backbone.training
    model.set_backbone_trainable(True)
    model.train()
    assert model.backbone.training
    assert count_parameters(model) == count_parameters(model, trainable_only=False)


def test_unknown_model_raises_model_error() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet9000'.*seed_cnn"):
        create_model("resnet9000")
    with pytest.raises(ModelError):
        get_spec("")


@pytest.mark.parametrize("name", ["seed_cnn", "vgg16"])
def test_input_size_not_multiple_of_32_raises_model_error(name: str) -> None:
    with pytest.raises(ModelError, match="multiple of 32"):
        create_model(name, input_size=100)


def test_seed_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        create_model("seed_cnn", weights="imagenet")


# ----------------------------------------------------------------------------- ImageNet weights
def _cached_mobilenet() -> Path:
    return hub_checkpoint_dir() / MOBILENET_FILE


def test_mobilenet_v2_imagenet_loads_offline_from_hub_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = _cached_mobilenet()
    if not cached.is_file():
        pytest.skip(f"{cached} not present (run 'pneumoscan weights import {MOBILENET_FILE}')")

    def offline(*_: object, **__: object) -> None:
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # proves nothing is downloaded
    model = create_model("mobilenet_v2", weights="imagenet")
    ref = torch.load(cached, map_location="cpu", weights_only=True)
    sd = model.state_dict()
    for key in ("features.0.0.weight", "features.18.1.running_var", "features.10.conv.1.0.weight"):
        torch.testing.assert_close(sd[f"backbone.{key}"], ref[key], rtol=0, atol=0)
    assert "classifier.1.weight" in ref and not any(k.startswith("backbone.classifier.1") for k in sd)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_imagenet_weights_missing_gives_clear_weights_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored after the test
    torch.hub.set_dir(str(tmp_path / "hub"))

    def offline(*_: object, **__: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert not (hub_checkpoint_dir() / MOBILENET_FILE).exists()
    with pytest.raises(WeightsError) as ei:
        create_model("mobilenet_v2", weights="imagenet")
    msg = str(ei.value)
    assert "not available offline" in msg
    assert torchvision_weights("mobilenet_v2").url in msg
    assert f"pneumoscan weights import {MOBILENET_FILE}" in msg
    assert str(tmp_path / "hub" / "checkpoints" / MOBILENET_FILE) in msg
    assert "weights=PATH" in msg


# ----------------------------------------------------------------------------- weights=PATH
def test_weights_path_loads_a_pneumoscan_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_model("seed_cnn", input_size=64)
    path = tmp_path / "seed.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    loaded = create_model("seed_cnn", input_size=64, weights=str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(src.eval()(x), loaded.eval()(x))


def test_weights_path_loads_a_pneumoscan_torchvision_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = create_model("resnet18")
    path = tmp_path / "resnet18_xray.pt"
    torch.save({"state_dict": src.state_dict(), "note": "wrapped"}, path)
    loaded = create_model("resnet18", weights=str(path))
    for k in ("backbone.conv1.weight", "backbone.layer4.1.bn2.running_mean", "head.1.weight", "head.1.bias"):
        torch.testing.assert_close(loaded.state_dict()[k], src.state_dict()[k], rtol=0, atol=0)


def test_weights_path_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        create_model("seed_cnn", weights=str(tmp_path / "missing.pt"))
    other = tmp_path / "resnet18.pt"
    torch.save(create_model("resnet18").state_dict(), other)
    with pytest.raises(WeightsError, match="do not fit"):
        create_model("seed_cnn", weights=str(other))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsError, match="not a safe weights-only"):
        create_model("seed_cnn", weights=str(junk))
    renamed = tmp_path / MOBILENET_FILE  # torchvision-style name whose hash prefix cannot match
    torch.save({"w": torch.zeros(1)}, renamed)
    with pytest.raises(WeightsError, match="does not match"):
        create_model("mobilenet_v2", weights=str(renamed))
