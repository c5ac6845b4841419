"""Flag rates of the shipped default model's distribution-shift detector on altered chest films
(docs/guard.md): python scripts/measure_shift_rates.py, from the repository root, with ../shared beside it."""
from __future__ import annotations

import glob
import io

import numpy as np
from PIL import Image, ImageFilter
from pneumoscan.inference import load_predictor



def png(a: np.ndarray) -> bytes:
    """``a`` encoded as PNG."""
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


files = sorted(glob.glob("../shared/data/chest_xray_fullres/*/*/*.jpeg")) + sorted(glob.glob("../shared/data/chest_xray_224/val/*/*.jpeg"))
imgs = [np.asarray(Image.open(f).convert("L")) for f in files]
p = load_predictor(None, guard=False)
rng = np.random.default_rng(0)
alter = {
    "unaltered": lambda a: a,
    "inverted": lambda a: 255 - a,
    "blur sigma 3 px (at 224)": lambda a: np.asarray(Image.fromarray(a).resize((224, 224)).filter(ImageFilter.GaussianBlur(3))),
    "blur sigma 8 px (at 224)": lambda a: np.asarray(Image.fromarray(a).resize((224, 224)).filter(ImageFilter.GaussianBlur(8))),
    "rotated 90": lambda a: np.rot90(a).copy(),
    "noise sigma 0.15": lambda a: np.clip(a / 255.0 + rng.normal(0, 0.15, a.shape), 0, 1) * 255,
    "darkened gamma 2.5": lambda a: (a / 255.0) ** 2.5 * 255,
    "mirrored": lambda a: a[:, ::-1].copy(),
}
for name, f in alter.items():
    arrs = [np.asarray(f(a)).astype(np.uint8) for a in imgs]
    preds = [p.predict_image(png(a), name=f"x{i}.png") for i, a in enumerate(arrs)]
    flagged = [any("unlike the images" in w for w in pr.warnings) for pr in preds]
    print(f"{name:28s} {sum(flagged):3d}/{len(flagged)} = {100 * np.mean(flagged):.0f} % flagged")
