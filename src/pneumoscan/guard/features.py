"""Cheap deterministic image features for the not-a-chest-X-ray guard.

A frontal chest radiograph is a smooth greyscale image that fills its frame, with a
characteristic layout: two dark lung fields either side of a bright mediastinum and spine,
roughly left-right symmetric, bright shoulders and abdomen. Documents, screenshots and charts
have few grey levels and many axis-aligned edges; noise has no spatial correlation; CT/MR
slices are round objects on black; photographs are colourful or lack the layout.

:func:`image_features` turns a decoded greyscale image (and its reader metadata) into a fixed
vector of such measurements; :mod:`pneumoscan.guard.core` classifies it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.imaging import resize_float

#: Side of the square, stretched copy most features are measured on (the models' inputs are
#: stretched squares too).
SIDE = 128
#: Side of the layout thumbnail (z-scored intensities, a THUMB x THUMB grid).
THUMB = 8
#: Side of the thumbnail compared with the mean chest X-ray template.
TEMPLATE = 16
#: Largest native-resolution centre crop used for texture statistics.
NATIVE = 256
#: Intensity percentiles measured.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (in float64)."""
    a = np.array(a, dtype=np.float64).ravel()  # always a copy: centred in place below
    b = np.array(b, dtype=np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    den = math.sqrt(float(np.einsum("i,i->", a, a)) * float(np.einsum("i,i->", b, b)))
    return float(np.einsum("i,i->", a, b)) / den if den > 1e-12 else 0.0


def percentiles(x: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(x, qs)`` (linear interpolation, float64 results) from one sort of
    ``x``: the same values, and NumPy's vectorised sort beats its partition several times over
    for the 10⁴–10⁵ pixels the guard looks at."""
    s = np.sort(x, axis=None)
    v = np.asarray(qs, dtype=np.float64) / 100.0 * (s.size - 1)
    lo = np.floor(v).astype(np.intp)
    hi = np.minimum(lo + 1, s.size - 1)
    g = v - lo
    a, b = s[lo].astype(np.float64), s[hi].astype(np.float64)
    d = b - a
    # numpy's _lerp: from below for g < 0.5, from above otherwise (exact at the ends)
    return np.where(g >= 0.5, b - d * (1 - g), a + d * g)


def _hist64(x: np.ndarray) -> np.ndarray:
    """``np.histogram(x, bins=64, range=(0, 1))[0]`` for ``x`` in [0, 1]: ``x * 64`` is exact
    in binary floating point, so its integer part is the bin (1.0 falls in the last)."""
    idx = np.minimum((x * 64).astype(np.intp), 63)
    return np.bincount(idx.ravel(), minlength=64)


def _neighbour_corr(c: np.ndarray) -> tuple[float, float]:
    """Correlation of every pixel with its right and with its lower neighbour (as
    :func:`_corr` of the shifted views), from running sums in float64."""
    c = np.asarray(c, dtype=np.float64)
    total, total2 = float(c.sum()), float(np.einsum("ij,ij->", c, c))
    out = []
    for first, last, prod in (
        (c[:, 0], c[:, -1], np.einsum("ij,ij->", c[:, :-1], c[:, 1:])),
        (c[0, :], c[-1, :], np.einsum("ij,ij->", c[:-1, :], c[1:, :])),
    ):
        n = c.size - first.size
        sa, sb = total - float(last.sum()), total - float(first.sum())
        saa, sbb = total2 - float(last @ last), total2 - float(first @ first)
        va, vb = saa - sa * sa / n, sbb - sb * sb / n
        tiny = 1e-9 * max(saa, sbb)  # below this the raw sums cannot tell a flat image from rounding
        if va <= max(tiny, 1e-12) or vb <= max(tiny, 1e-12):
            out.append(0.0)
            continue
        out.append((float(prod) - sa * sb / n) / math.sqrt(va * vb))
    return out[0], out[1]


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (float(x.std()) + 1e-3)


def thumbnail(img: np.ndarray) -> np.ndarray:
    """The z-scored ``TEMPLATE``² thumbnail of an image (what the chest template is the mean of
    and is compared with).

    Args:
        img: 2-D float greyscale image in [0, 1].
    """
    x = resize_float(np.nan_to_num(np.asarray(img, dtype=np.float32)), SIDE, SIDE)
    return _zscore(resize_float(x, TEMPLATE, TEMPLATE, clip=False))


def template_features(thumb: np.ndarray, template: np.ndarray | None) -> dict[str, float]:
    """Correlation of a :func:`thumbnail` (and of its mirror image) with the chest template.

    Args:
        thumb: ``TEMPLATE``² z-scored thumbnail.
        template: the mean chest X-ray thumbnail, or ``None`` (both features 0).
    """
    if template is None:
        return {"template_corr": 0.0, "template_corr_flip": 0.0}
    return {"template_corr": _corr(thumb, template), "template_corr_flip": _corr(thumb[:, ::-1], template)}


def image_features(img: np.ndarray, meta: dict[str, Any] | None = None, template: np.ndarray | None = None) -> dict[str, float]:
    """Measurements of one image for the guard.

    Args:
        img: 2-D float greyscale image in [0, 1] (as :func:`pneumoscan.data.io.read_image`
            returns it; any resolution).
        meta: the reader's metadata (``saturation``/``colour_fraction`` from
            :func:`pneumoscan.data.io.read_image_with_meta`); missing keys count as 0.
        template: the mean chest X-ray thumbnail (``TEMPLATE``² z-scores) to correlate with;
            ``None`` gives 0 for those features.

    Returns:
        An ordered dict ``name -> value`` (always the same names in the same order).
    """
    meta = meta or {}
    img = np.asarray(img, dtype=np.float32)
    if not np.isfinite(img).all():
        img = np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0)
    x = resize_float(img, SIDE, SIDE)
    f: dict[str, float] = {}

    # ---------------------------------------------------------------- intensity
    sd = x.std()
    f["mean"] = float(x.mean())
    f["std"] = float(sd)
    for q, v in zip(PERCENTILES, percentiles(x, PERCENTILES)):
        f[f"p{q}"] = float(v)
    h64 = _hist64(x).astype(np.float64) / x.size
    # the 16 bins are sums of 4 of the 64 (their edges k/16 = 4k/64 are exact binary fractions)
    hist = h64.reshape(16, 4).sum(axis=1)
    for i, v in enumerate(hist):
        f[f"hist{i:02d}"] = float(v)
    nz = h64[h64 > 0]
    f["entropy"] = float(-(nz * np.log2(nz)).sum() / 6.0)
    f["dark_frac"] = float((x < 0.05).mean())
    f["bright_frac"] = float((x > 0.95).mean())

    # ---------------------------------------------------------------- native texture
    h, w = img.shape
    ch, cw = min(h, NATIVE), min(w, NATIVE)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = img[y0 : y0 + ch, x0 : x0 + cw]
    u = np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8)
    counts = np.bincount(u.ravel(), minlength=256).astype(np.float64)
    f["levels"] = float((counts > 0).sum() / 256.0)
    top = np.sort(counts)[::-1] / max(u.size, 1)
    f["mode_share"] = float(top[0])
    f["top3_share"] = float(top[:3].sum())
    if ch > 2 and cw > 2:
        f["nbr_corr_x"], f["nbr_corr_y"] = _neighbour_corr(crop)
        lap = crop[1:-1, 1:-1] * 4 - crop[:-2, 1:-1] - crop[2:, 1:-1] - crop[1:-1, :-2] - crop[1:-1, 2:]
        f["laplace"] = float(np.abs(lap).mean() / (float(crop.std()) + 1e-3))
    else:
        f["nbr_corr_x"] = f["nbr_corr_y"] = f["laplace"] = 0.0

    # ---------------------------------------------------------------- edges (on the square)
    gx = np.zeros_like(x)
    gy = np.zeros_like(x)
    gx[:, 1:-1] = (x[:, 2:] - x[:, :-2]) / 2
    gy[1:-1, :] = (x[2:, :] - x[:-2, :]) / 2
    g = np.hypot(gx, gy)
    gm = g.mean()
    strong = g > 0.05
    f["grad_mean"] = float(gm)
    f["grad_rel"] = float(gm / (sd + 1e-3))
    f["edge_frac_05"] = float(strong.mean())
    f["edge_frac_15"] = float((g > 0.15).mean())
    if np.count_nonzero(strong) > 10:
        ax, ay = np.abs(gx[strong]), np.abs(gy[strong])
        f["axis_aligned"] = float(((ax < 0.1 * ay) | (ay < 0.1 * ax)).mean())
    else:
        f["axis_aligned"] = 0.0

    # ---------------------------------------------------------------- symmetry and layout
    z64 = _zscore(resize_float(x, 64, 64, clip=False))
    f["sym_lr"] = _corr(z64, z64[:, ::-1])
    f["sym_ud"] = _corr(z64, z64[::-1, :])
    z = _zscore(x)
    rows = z.reshape(8, SIDE // 8, SIDE).mean(axis=(1, 2))
    cols = z.reshape(SIDE, 8, SIDE // 8).mean(axis=(0, 2))
    for i in range(8):
        f[f"row{i}"] = float(rows[i])
    for i in range(8):
        f[f"col{i}"] = float(cols[i])
    f["col_centre_minus_sides"] = float(z[:, 48:80].mean() - 0.5 * (z[:, 16:48].mean() + z[:, 80:112].mean()))
    f["centre_minus_border"] = float(z[32:96, 32:96].mean() - np.concatenate([z[:16].ravel(), z[-16:].ravel(), z[:, :16].ravel(), z[:, -16:].ravel()]).mean())
    corners = np.concatenate([x[:16, :16].ravel(), x[:16, -16:].ravel(), x[-16:, :16].ravel(), x[-16:, -16:].ravel()])
    f["corner_mean"] = float(corners.mean())
    f["corner_dark"] = float((corners < 0.05).mean())
    tz = _zscore(resize_float(x, THUMB, THUMB, clip=False))
    for i, v in enumerate(tz.ravel()):
        f[f"thumb{i:02d}"] = float(v)
    f.update(template_features(_zscore(resize_float(x, TEMPLATE, TEMPLATE, clip=False)), template))

    # ---------------------------------------------------------------- colour (from the reader)
    f["saturation"] = float(meta.get("saturation", 0.0) or 0.0)
    f["colour_fraction"] = float(meta.get("colour_fraction", 0.0) or 0.0)
    return f


def feature_names() -> list[str]:
    """The names :func:`image_features` returns, in order."""
    return list(image_features(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).keys())
