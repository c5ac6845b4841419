"""Cheap deterministic image features for the not-a-chest-X-ray guard.

A frontal chest radiograph is a smooth greyscale image that fills its frame, with a
characteristic layout: two dark lung fields either side of a bright mediastinum and spine,
roughly left-right symmetric, bright shoulders and abdomen. Documents, screenshots and charts
have few grey levels and many axis-aligned edges; noise has no spatial correlation; CT/MR
slices are round objects on black; photographs are colourful or lack the layout.

:func:`image_features` turns a decoded greyscale image (and its reader metadata) into a fixed
vector of such measurements; :mod:`pneumoscan.guard.core` classifies it.

Every feature is measured on the image's canonical form
(:mod:`pneumoscan.guard.canonical`: uniform borders cropped, intensities stretched), inverted
when it matches the mean chest X-ray template in the other polarity (MONOCHROME1 pixels shown
without their inversion).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image

from ..core.imaging import resize_float
from .canonical import Prepared, prepare

#: Side of the layout thumbnail (z-scored intensities, a THUMB x THUMB grid).
THUMB = 8
#: Side of the thumbnail compared with the mean chest X-ray template.
TEMPLATE = 16
#: Bins of the edge-orientation histogram (over 0-180 degrees).
ORIENT_BINS = 6
#: Intensity percentiles measured (symmetric: inverting the image swaps them).
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: The template is also matched zoomed (scale), rotated (degrees) and shifted (fractions of
#: the side, x and y), as chest films come tightly cropped, zoomed out, tilted or off-centre.
BANK_SCALES = (0.75, 0.9, 1.0, 1.2, 1.45)
BANK_ANGLES = (-12.0, 0.0, 12.0)
BANK_SHIFTS = ((0.0, 0.0), (-0.08, 0.0), (0.08, 0.0), (-0.08, 0.08), (0.0, 0.08), (0.08, 0.08))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (in float64)."""
    a = np.array(a, dtype=np.float64).ravel()  # always a copy: centred in place below
    b = np.array(b, dtype=np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 1e-12 else 0.0


def _counts(u: np.ndarray) -> np.ndarray:
    """``np.bincount(u.ravel(), minlength=256)`` of a 2-D uint8 array, by Pillow's histogram
    (one pass in C, no widening copy)."""
    return np.array(Image.fromarray(np.ascontiguousarray(u), mode="L").histogram(), dtype=np.int64)


def _hist64(x: np.ndarray) -> np.ndarray:
    """``np.histogram(x, bins=64, range=(0, 1))[0]`` for 2-D ``x`` in [0, 1]: ``x * 64`` is
    exact in binary floating point, so its integer part is the bin (1.0 falls in the last)."""
    return _counts(np.minimum((x * 64).astype(np.uint8), 63))[:64]


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


def _pool(x: np.ndarray, n: int) -> np.ndarray:
    """Means of the blocks of a square image, on an ``n``² grid (``n`` divides its side)."""
    k = x.shape[0] // n
    if k == 2:  # the common case, four strided views
        return (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) * 0.25
    return x.reshape(n, k, n, k).sum(axis=3).sum(axis=1) * (1.0 / (k * k))


def _canonical(p: Prepared, bank: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray | None]:
    """The stretched square, the stretched content at working resolution, whether both were
    inverted to match the template's polarity, and the correlations of the square's
    ``TEMPLATE``² thumbnail with every row of the template ``bank`` (in the returned polarity)."""
    scale = 1.0 / (p.hi - p.lo) if p.hi - p.lo > 1e-6 else 0.0
    x = np.clip((p.square - p.lo) * scale, 0.0, 1.0)
    invert = False
    c = None
    if bank is not None:  # the sign of the strongest match with any variant of the template
        c = bank @ _unit(_pool(x, TEMPLATE))
        invert = bool(c[int(np.argmax(np.abs(c)))] < 0)
    y0, y1, x0, x1 = p.box
    crop = np.clip((p.image[y0:y1, x0:x1] - p.lo) * scale, 0.0, 1.0)
    if invert:
        np.subtract(1.0, x, out=x)
        np.subtract(1.0, crop, out=crop)
        return x, crop, True, -c  # type: ignore[operator]
    return x, crop, False, c


def thumbnail(img: np.ndarray, prepared: Prepared | None = None) -> np.ndarray:
    """The z-scored ``TEMPLATE``² thumbnail of an image's stretched content, in its own
    polarity (the chest template is the mean of these over chest X-rays).

    Args:
        img: 2-D float greyscale image in [0, 1].
        prepared: :func:`prepare` of ``img``, if already computed.
    """
    p = prepared or prepare(img)
    x, _, _, _ = _canonical(p, None)
    return _zscore(_pool(x, TEMPLATE))


def _unit(v: np.ndarray) -> np.ndarray:
    """``v`` flattened, centred and scaled to unit norm (zeros when flat): dot products of
    such vectors are Pearson correlations."""
    v = np.asarray(v, dtype=np.float64).ravel()
    v = v - v.mean()
    n = float(np.sqrt(v @ v))
    return v / n if n > 1e-12 else np.zeros_like(v)


@functools.lru_cache(maxsize=8)
def _bank_of(key: bytes) -> np.ndarray:
    t = np.frombuffer(key, dtype=np.float64).reshape(TEMPLATE, TEMPLATE)
    n = 4 * TEMPLATE
    big = Image.fromarray(resize_float(t, n, n, clip=False), mode="F")
    c = n / 2
    rows = []
    for scale in BANK_SCALES:
        for angle in BANK_ANGLES:
            for dx, dy in BANK_SHIFTS:
                # output pixel p samples the template at c + R(-angle) (p - c - shift) / scale
                ca, sa = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
                tx, ty = c + dx * n, c + dy * n
                coeffs = (ca, sa, c - ca * tx - sa * ty, -sa, ca, c + sa * tx - ca * ty)
                w = big.transform((n, n), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0.0)
                rows.append(_unit(np.asarray(w).reshape(TEMPLATE, 4, TEMPLATE, 4).mean(axis=(1, 3))))
    identity = BANK_SCALES.index(1.0) * len(BANK_ANGLES) * len(BANK_SHIFTS) + BANK_ANGLES.index(0.0) * len(BANK_SHIFTS)
    rows.insert(0, rows.pop(identity))
    return np.stack(rows)


def template_bank(template: np.ndarray) -> np.ndarray:
    """The chest template zoomed, rotated and shifted (:data:`BANK_SCALES`, :data:`BANK_ANGLES`,
    :data:`BANK_SHIFTS`), as rows of unit vectors; row 0 is the template itself.

    Args:
        template: ``TEMPLATE``² mean chest X-ray thumbnail.
    """
    return _bank_of(np.ascontiguousarray(template, dtype=np.float64).tobytes())


def template_features(thumb: np.ndarray, template: np.ndarray | None, corr: np.ndarray | None = None) -> dict[str, float]:
    """Correlation of a thumbnail (and of its mirror image) with the chest template, and the
    best correlation with any of its zoomed, rotated or shifted variants.

    Args:
        thumb: ``TEMPLATE``² thumbnail.
        template: the mean chest X-ray thumbnail, or ``None`` (all features 0).
        corr: the thumbnail's correlations with :func:`template_bank`'s rows, if already
            computed.
    """
    if template is None:
        return {"template_corr": 0.0, "template_corr_flip": 0.0, "template_corr_best": 0.0}
    c = template_bank(template) @ _unit(thumb) if corr is None else corr
    return {"template_corr": float(c[0]), "template_corr_flip": _corr(thumb[:, ::-1], template), "template_corr_best": float(c.max())}


def _symmetry_best(x32: np.ndarray) -> float:
    """The best left-right mirror correlation of a 32² thumbnail about an axis tilted by up to
    8 degrees or moved by up to 2 pixels (the central 24 columns against their mirror)."""
    z = _zscore(x32).astype(np.float32)
    im = Image.fromarray(z, mode="F")
    rot = [np.asarray(im.rotate(angle, resample=Image.Resampling.BILINEAR)) for angle in (-8.0, 8.0)]
    r = np.stack([rot[0], z, rot[1]]).astype(np.float64)  # (angle, row, column)
    m = r[:, :, ::-1]
    a = r[:, :, 4:28].reshape(3, 1, -1)  # one window per angle, against three of its mirror
    b = np.stack([m[:, :, 4 - s : 28 - s] for s in (-4, 0, 4)], axis=1).reshape(3, 3, -1)
    a = a - a.mean(axis=2, keepdims=True)
    b = b - b.mean(axis=2, keepdims=True)
    den = np.sqrt(np.einsum("aik,aik->ai", a, a) * np.einsum("ajk,ajk->aj", b, b))
    c = np.einsum("aik,ajk->aj", a, b) / np.maximum(den, 1e-12)
    return float(c.max())


#: Names of the features measured in groups (in :func:`image_features`' order).
_HIST = [f"hist{i:02d}" for i in range(16)]
_ORIENT = [f"orient{i}" for i in range(ORIENT_BINS)]
_ROWS = [f"row{i}" for i in range(8)]
_COLS = [f"col{i}" for i in range(8)]
_THUMB = [f"thumb{i:02d}" for i in range(THUMB * THUMB)]


def image_features(
    img: np.ndarray, meta: dict[str, Any] | None = None, template: np.ndarray | None = None, prepared: Prepared | None = None
) -> dict[str, float]:
    """Measurements of one image for the guard, on its canonical form (borders cropped,
    intensities stretched, polarity matched to ``template``).

    Args:
        img: 2-D float greyscale image in [0, 1] (as :func:`pneumoscan.data.io.read_image`
            returns it; any resolution).
        meta: the reader's metadata (``saturation``/``colour_fraction`` from
            :func:`pneumoscan.data.io.read_image_with_meta`); missing keys count as 0.
        template: the mean chest X-ray thumbnail (``TEMPLATE``² z-scores): the polarity
            reference and correlated with; ``None`` keeps the polarity and gives 0 for
            the template features.
        prepared: :func:`prepare` of ``img``, if already computed.

    Returns:
        An ordered dict ``name -> value`` (always the same names in the same order).
    """
    meta = meta or {}
    p = prepared or prepare(img)
    x, crop, inverted, corr = _canonical(p, None if template is None else template_bank(template))
    f: dict[str, float] = {}

    # ---------------------------------------------------------------- intensity
    sd = float(x.std())
    f["mean"] = float(x.mean())
    f["std"] = sd
    scale = 1.0 / (p.hi - p.lo) if p.hi - p.lo > 1e-6 else 0.0
    qs = tuple(100 - q for q in PERCENTILES) if inverted else PERCENTILES
    vals = np.clip((p.percentiles(qs) - p.lo) * scale, 0.0, 1.0)
    for q, v in zip(PERCENTILES, (1.0 - vals if inverted else vals).tolist()):
        f[f"p{q}"] = v
    h64 = _hist64(x).astype(np.float64) / x.size
    # the 16 bins are sums of 4 of the 64 (their edges k/16 = 4k/64 are exact binary fractions)
    f.update(zip(_HIST, h64.reshape(16, 4).sum(axis=1).tolist()))
    nz = h64[h64 > 0]
    f["entropy"] = float(-(nz * np.log2(nz)).sum() / 6.0)
    f["dark_frac"] = float((x < 0.05).mean())
    f["bright_frac"] = float((x > 0.95).mean())

    # ---------------------------------------------------------------- texture at working resolution
    ch, cw = crop.shape
    u = np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8)
    counts = _counts(u).astype(np.float64)
    f["levels"] = float((counts > 0).sum() / 256.0)
    top = np.sort(counts)[::-1] / max(u.size, 1)
    f["mode_share"] = float(top[0])
    f["top3_share"] = float(top[:3].sum())
    if ch > 2 and cw > 2:
        f["nbr_corr_x"], f["nbr_corr_y"] = _neighbour_corr(crop)
        lap = crop[1:-1, 1:-1] * 4  # minus the four neighbours, in place
        for nb in (crop[:-2, 1:-1], crop[2:, 1:-1], crop[1:-1, :-2], crop[1:-1, 2:]):
            np.subtract(lap, nb, out=lap)
        f["laplace"] = float(np.abs(lap, out=lap).mean() / (float(crop.std()) + 1e-3))
    else:
        f["nbr_corr_x"] = f["nbr_corr_y"] = f["laplace"] = 0.0

    # ---------------------------------------------------------------- edges (on the square)
    gx = np.zeros_like(x)
    gy = np.zeros_like(x)
    gx[:, 1:-1] = (x[:, 2:] - x[:, :-2]) / 2
    gy[1:-1, :] = (x[2:, :] - x[:-2, :]) / 2
    g = np.sqrt(gx * gx + gy * gy)
    gm = float(g.mean())
    strong = np.flatnonzero(g > 0.05)  # the strong edges' indices
    f["grad_mean"] = gm
    f["grad_rel"] = gm / (sd + 1e-3)
    f["edge_frac_05"] = strong.size / g.size
    f["edge_frac_15"] = np.count_nonzero(g > 0.15) / g.size
    sx, sy = gx.ravel()[strong], gy.ravel()[strong]
    if sx.size > 10:
        ax, ay = np.abs(sx), np.abs(sy)
        f["axis_aligned"] = float(np.count_nonzero((ax < 0.1 * ay) | (ay < 0.1 * ax)) / sx.size)
    else:
        f["axis_aligned"] = 0.0
    # orientation of the edges (0 = horizontal gradient, i.e. vertical edges), magnitude-weighted
    theta = np.arctan2(sy, sx) % np.pi
    bins = np.minimum((theta * (ORIENT_BINS / np.pi)).astype(np.intp), ORIENT_BINS - 1)
    weights = g.ravel()[strong]
    orient = np.bincount(bins, weights=weights, minlength=ORIENT_BINS) / (float(weights.sum()) + 1e-9)
    f.update(zip(_ORIENT, orient.tolist()))
    # how unevenly detail is spread (16-pixel blocks): photographs mix flat and busy regions
    block_sd = np.sqrt(np.maximum(_pool(x * x, 8) - _pool(x, 8) ** 2, 0.0))
    f["block_sd_cv"] = float(block_sd.std() / (block_sd.mean() + 1e-3))

    # ---------------------------------------------------------------- symmetry and layout
    p64 = _pool(x, 64)
    p32 = _pool(p64, 32)
    p16 = _pool(p32, TEMPLATE)
    z64 = _zscore(p64)
    f["sym_lr"] = _corr(z64, z64[:, ::-1])
    f["sym_lr_best"] = _symmetry_best(p32)
    f["sym_ud"] = _corr(z64, z64[::-1, :])
    # region means of the z-scored square, from the 8-pixel blocks
    mean, inv = f["mean"], 1.0 / (sd + 1e-3)
    p8 = _pool(p16, 8)
    f.update(zip(_ROWS, ((p8.mean(axis=1) - mean) * inv).tolist()))
    f.update(zip(_COLS, ((p8.mean(axis=0) - mean) * inv).tolist()))
    c16 = p16.mean(axis=0)
    f["col_centre_minus_sides"] = float((c16[6:10].mean() - 0.5 * (c16[2:6].mean() + c16[10:14].mean())) * inv)
    border = (p16[:2].sum() + p16[-2:].sum() + p16[2:-2, :2].sum() + p16[2:-2, -2:].sum()) / (4 * 16 + 4 * 12)
    f["centre_minus_border"] = float((p16[4:12, 4:12].mean() - border) * inv)
    f["corner_mean"] = float((p16[:2, :2].sum() + p16[:2, -2:].sum() + p16[-2:, :2].sum() + p16[-2:, -2:].sum()) / 16)
    corners = np.stack([x[:16, :16], x[:16, -16:], x[-16:, :16], x[-16:, -16:]])
    f["corner_dark"] = float(np.count_nonzero(corners < 0.05) / corners.size)
    f.update(zip(_THUMB, _zscore(p8).ravel().tolist()))
    f.update(template_features(_zscore(p16), template, corr))

    # ---------------------------------------------------------------- colour (from the reader)
    f["saturation"] = float(meta.get("saturation", 0.0) or 0.0)
    f["colour_fraction"] = float(meta.get("colour_fraction", 0.0) or 0.0)
    return f


def feature_names() -> list[str]:
    """The names :func:`image_features` returns, in order."""
    return list(image_features(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).keys())
