"""Grad-CAM for every registered model (random initialisation): the map's shape and range,
that it depends on the input, the frozen vgg16 backbone, layer overrides, and overlays at
the image's original resolution."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.data.io import read_image
from pneumoscan.data.transforms import preprocess_batch
from pneumoscan.errors import ModelError
from pneumoscan.core.imaging import overlay, resize_float
from pneumoscan.explain import GradCAM, save_overlay
from pneumoscan.models import create_model, get_spec, list_models

#: Small inputs keep the big backbones fast on a CPU; every model accepts a multiple of 32.
SIDE = 96
HEAVY = {"densenet121", "resnet50", "vgg16", "efficientnet_b0"}


@pytest.fixture(scope="module")
def two_images(xray_dir: Path) -> torch.Tensor:
    """A real X-ray and a clearly different input (the same X-ray turned upside down and
    inverted)."""
    img = read_image(sorted(xray_dir.rglob("*.jpeg"))[0])
    other = 1.0 - img[::-1].copy()
    return preprocess_batch([img, other], SIDE)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_models()]
)
def test_gradcam_every_model(name: str, two_images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model(name, input_size=SIDE).eval()
    for p in model.parameters():  # as in a Predictor: nothing trainable
        p.requires_grad_(False)
    cam = GradCAM(model)  # the registered default layer
    assert cam.layer_name == get_spec(name).gradcam_layer
    maps, logits = cam.compute(two_images)
    assert maps.shape == (2, 1, SIDE, SIDE) and logits.shape == (2,)
    assert torch.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    # each map is scaled to [0, 1] (a map is all 0 only where the layer holds no evidence)
    assert max(float(maps[0].max()), float(maps[1].max())) == pytest.approx(1.0)
    assert (maps[0] - maps[1]).abs().mean() > 1e-3  # the map depends on the input
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_flows_through_vgg16_frozen_backbone_with_inplace_relu(two_images: torch.Tensor) -> None:
    torch.manual_seed(1)
    model = create_model("vgg16", input_size=64).eval()  # frozen backbone (the study's setting)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    x = torch.nn.functional.interpolate(two_images, size=(64, 64), mode="bilinear")
    cam = GradCAM(model, target="pneumonia")
    maps, _ = cam.compute(x, upsample=False)
    assert maps.shape == (2, 1, 4, 4)  # backbone.0.29: the last ReLU(inplace) before the final pool
    assert cam._grads[0] is not None and cam._grads[0].abs().sum() > 0


def test_layer_override_and_unknown_layer(two_images: torch.Tensor) -> None:
    model = create_model("seed_cnn", input_size=SIDE).eval()
    deep = GradCAM(model).compute(two_images, upsample=False)[0]
    early = GradCAM(model, layer="backbone.2").compute(two_images, upsample=False)[0]
    assert deep.shape[-1] == SIDE // 16 and early.shape[-1] == SIDE // 8  # backbone.4.2 precedes the last pool
    with pytest.raises(ModelError, match="unknown layer"):
        GradCAM(model, layer="backbone.99")
    with pytest.raises(ModelError, match="target"):
        GradCAM(model, target="everything")


def test_targets_explain_opposite_evidence(two_images: torch.Tensor) -> None:
    torch.manual_seed(2)
    model = create_model("resnet18").eval()
    pos, z = GradCAM(model, target="pneumonia").compute(two_images, upsample=False)
    neg, _ = GradCAM(model, target="normal").compute(two_images, upsample=False)
    pred, _ = GradCAM(model, target="predicted", logit_threshold=float(z[0])).compute(two_images, upsample=False)
    # the predicted-class map equals the pneumonia map for an image at/above the threshold
    assert torch.allclose(pred[0], pos[0])
    assert not torch.allclose(pos[0], neg[0])


def test_predictor_explain_at_original_resolution(tiny_run: Path, fullres_dir: Path, tmp_path: Path) -> None:
    from pneumoscan.inference import load_predictor

    p = load_predictor(tiny_run)
    f = sorted(fullres_dir.glob("*.jpeg"))[1]
    with Image.open(f) as im:
        w, h = im.size
    cam = p.explain(f)
    assert cam.shape == (h, w) and cam.dtype == np.float32 and 0.0 <= cam.min() and cam.max() <= 1.0
    arr = read_image(f, max_side=200)
    assert p.explain(arr).shape == arr.shape
    pred = p.predict_image(f, heatmap=True)
    assert pred.heatmap is not None and pred.heatmap.ndim == 2
    out = save_overlay(tmp_path / "o.png", read_image(f), cam)
    with Image.open(out) as im:
        assert im.size == (w, h) and im.mode == "RGB"


def test_overlay_colours_only_where_the_map_is_high() -> None:
    img = np.full((40, 60), 0.5, np.float32)
    cam = np.zeros((10, 10), np.float32)
    cam[:, 5:] = 1.0
    rgb = overlay(img, cam)
    assert rgb.shape == (40, 60, 3)
    left, right = rgb[:, :20].astype(int), rgb[:, -20:].astype(int)
    assert (left.max(axis=2) - left.min(axis=2)).max() <= 1  # grey where the map is 0
    assert (right[..., 0] - right[..., 2]).mean() > 50  # red where the map is 1
    assert resize_float(cam, 40, 60).shape == (40, 60)
