"""Heat-map figures: the original beside the Grad-CAM overlay, with a colour bar and a caption.

Drawn with NumPy and Pillow only (no matplotlib, no PyTorch), so a slim install renders them
too. Each panel is at most :data:`FIGURE_MAX_SIDE` pixels on its longer side whatever the
image's resolution, so a 4,000-pixel DICOM costs a few megabytes, not hundreds::

    from pneumoscan.explain.figure import Caption, save_heatmap_figure
    cap = Caption(probability=0.91, label="PNEUMONIA", threshold=0.73, model="mobilenet_v2-res224-kermany")
    save_heatmap_figure("chest.heatmap.png", image, cam, cap)

:func:`heatmap_figure` returns the RGB array (the DICOM Secondary Capture of
:mod:`pneumoscan.workflows.dicom_output` burns the same figure in).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.imaging import jet, overlay, resize_float, to_uint8
from ..utils.io import atomic_open

#: Longest side of each panel of a figure, in pixels.
FIGURE_MAX_SIDE = 1024
#: Small images are enlarged to this longest side so that the caption stays legible.
FIGURE_MIN_SIDE = 384
#: ``predict --heatmap-style``: the side-by-side figure, or the bare overlay at the image's resolution.
HEATMAP_STYLES = ("figure", "overlay")
#: Shown on every figure: what the map is, and what it is not.
DISCLAIMER = "Grad-CAM: regions that drove this prediction. Research software, not a diagnosis."

_BACKGROUND = (17, 17, 17)
_TEXT = (235, 235, 235)
_MUTED = (170, 170, 170)


@dataclass(frozen=True)
class Caption:
    """What a figure says about its prediction.

    Attributes:
        probability: calibrated probability of pneumonia (``None``: no prediction).
        label: ``"PNEUMONIA"`` or ``"NORMAL"``.
        threshold: the model's operating threshold.
        model: the model's name.
        weights: the weights' id (sha256 prefix), if known.
    """

    probability: float | None
    label: str | None
    threshold: float
    model: str
    weights: str | None = None

    def lines(self) -> list[str]:
        """The caption as short lines (ASCII: every font has the glyphs)."""
        if self.probability is None:
            verdict = "no prediction"
        else:
            op = ">=" if self.probability >= self.threshold else "<"
            verdict = f"P(pneumonia) {self.probability:.3f} {op} threshold {self.threshold:.3f}: {self.label}"
        model = f"model {self.model}" + (f" (weights {self.weights})" if self.weights else "")
        return [verdict, model, DISCLAIMER]

    def text(self) -> str:
        """The caption on one line (DICOM ImageComments, logs)."""
        return "; ".join(self.lines())


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    longest = max(height, width, 1)
    scale = min(max_side / longest, max(1.0, min(FIGURE_MIN_SIDE, max_side) / longest))
    return max(1, round(height * scale)), max(1, round(width * scale))


def heatmap_figure(
    image: np.ndarray, cam: np.ndarray, caption: Caption, *, max_side: int = FIGURE_MAX_SIDE, alpha: float = 0.4,
) -> np.ndarray:
    """The original and the Grad-CAM overlay side by side, a 0 → 1 colour bar of the map and the
    caption below, on a dark background.

    Args:
        image: 2-D float greyscale in [0, 1] (any size; resized to the panel size first).
        cam: 2-D map in [0, 1] (any size).
        caption: the prediction to print under the panels.
        max_side: the longer side of each panel, at most (small images are enlarged to
            :data:`FIGURE_MIN_SIDE`).
        alpha: heat-map opacity where the map is 1.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    if image.ndim != 2 or cam.ndim != 2:
        raise ValueError("heatmap_figure needs a 2-D image and a 2-D map")
    ph, pw = _panel_size(image.shape[0], image.shape[1], max_side)
    small = resize_float(np.nan_to_num(image, nan=0.0), ph, pw)
    grey = to_uint8(small)
    over = overlay(small, cam, alpha)

    fs = int(np.clip(round(max(ph, pw) / 34), 12, 30))
    pad, gap = fs, fs
    bar_w = max(10, fs)
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tick_w = int(max(probe.textlength(t, font=font) for t in ("0.0", "0.5", "1.0"))) + fs // 2
    width = pad + pw + gap + pw + gap + bar_w + tick_w + pad
    lines = caption.lines()
    cfs = fs  # the caption shrinks (down to 9 px) rather than overflow a narrow figure
    while cfs > 9 and max(probe.textlength(t, font=_font(cfs)) for t in lines) > width - 2 * pad:
        cfs -= 1
    cfont = _font(cfs)
    line_h = round(cfs * 1.35)
    top = pad + round(fs * 1.4)
    height = top + ph + pad + line_h * len(lines) + pad

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    x_over = pad + pw + gap
    canvas.paste(Image.fromarray(grey).convert("RGB"), (pad, top))
    canvas.paste(Image.fromarray(over), (x_over, top))
    x_bar = x_over + pw + gap
    ramp = to_uint8(jet(np.linspace(1.0, 0.0, ph, dtype=np.float32)))  # 1 at the top
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None, :], bar_w, axis=1))), (x_bar, top))

    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), "original", font=font, fill=_TEXT)
    draw.text((x_over, pad), "Grad-CAM overlay", font=font, fill=_TEXT)
    for value, y in ((1.0, top), (0.5, top + ph / 2), (0.0, top + ph)):
        draw.text((x_bar + bar_w + fs // 4, round(y - fs * 0.6)), f"{value:.1f}", font=font, fill=_MUTED)
    y = top + ph + pad
    for i, line in enumerate(lines):
        draw.text((pad, y), line, font=cfont, fill=_TEXT if i < 2 else _MUTED)
        y += line_h
    return np.asarray(canvas, dtype=np.uint8)


def save_heatmap_figure(
    path: str | Path, image: np.ndarray, cam: np.ndarray, caption: Caption, *, max_side: int = FIGURE_MAX_SIDE,
) -> Path:
    """Write :func:`heatmap_figure` as a PNG atomically.

    Args:
        path: destination ``.png``.
        image: 2-D float greyscale in [0, 1].
        cam: 2-D map in [0, 1].
        caption: the prediction to print under the panels.
        max_side: the longer side of each panel, at most.
    """
    return save_png(path, heatmap_figure(image, cam, caption, max_side=max_side))


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB array (a figure) as a PNG atomically.

    Args:
        path: destination ``.png``.
        rgb: the pixels.
    """
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(fh, format="PNG")
    return path
