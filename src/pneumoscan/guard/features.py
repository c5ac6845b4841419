"""Cheap deterministic image features for the not-a-chest-X-ray guard.

A frontal chest radiograph is a smooth greyscale image that fills its frame, with a
characteristic layout: two dark lung fields either side of a bright mediastinum and spine,
roughly left-right symmetric, bright shoulders and abdomen. Documents, screenshots and charts
have few grey levels and many axis-aligned edges; noise has no spatial correlation; CT/MR
slices are round objects on black; photographs are colourful or lack the layout.

:func:`image_features` turns a decoded greyscale image (and its reader metadata) into a fixed
vector of such measurements; :mod:`pneumoscan.guard.core` classifies it.

Chest films come padded, letterboxed, with any window/level, bit depth and polarity, so the
image is first brought to a canonical form (:func:`prepare`): uniform borders are cropped
(:func:`content_box`), the intensities are stretched between their 0.5th and 99.5th
percentiles, and, given the mean chest X-ray template, an image that correlates negatively
with it is inverted (MONOCHROME1 pixels shown without their inversion). Every feature is
measured on that form.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..core.imaging import fit_within, resize_float

#: Side of the square, stretched copy most features are measured on (the models' inputs are
#: stretched squares too).
SIDE = 128
#: Side of the layout thumbnail (z-scored intensities, a THUMB x THUMB grid).
THUMB = 8
#: Side of the thumbnail compared with the mean chest X-ray template.
TEMPLATE = 16
#: Larger images are first reduced to fit this side (the size ``predict`` decodes at for
#: the guard), so that texture statistics do not depend on the resolution of the input.
WORK_SIDE = 224
#: Bins of the edge-orientation histogram (over 0-180 degrees).
ORIENT_BINS = 6
#: Intensity percentiles measured (symmetric: inverting the image swaps them).
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: Percentiles the intensities are stretched between (markers, text and wires above the
#: upper one saturate instead of compressing the film).
STRETCH = (0.5, 99.5)
#: A border line (row or column) is cropped when this share of its pixels lies within
#: ``BORDER_TOL`` of the outermost line's median (JPEG ringing and sensor noise included).
BORDER_COVERAGE = 0.97
BORDER_TOL = 0.03
#: Lines of a border holding text are still this much border level.
BORDER_MOSTLY = 0.6
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
    den = math.sqrt(float(np.einsum("i,i->", a, a)) * float(np.einsum("i,i->", b, b)))
    return float(np.einsum("i,i->", a, b)) / den if den > 1e-12 else 0.0


def percentiles(x: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(x, qs)`` (linear interpolation, float64 results) from one sort of
    ``x``: the same values, and NumPy's vectorised sort beats its partition several times over
    for the 10⁴–10⁵ pixels the guard looks at."""
    return _sorted_percentiles(np.sort(x, axis=None), qs)


def _sorted_percentiles(s: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """:func:`percentiles` of already sorted values ``s``."""
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


def _pool(x: np.ndarray, n: int) -> np.ndarray:
    """Means of the blocks of a square image, on an ``n``² grid (``n`` divides its side)."""
    k = x.shape[0] // n
    return x.reshape(n, k, n, k).mean(axis=(1, 3))


def _border_lines(a: np.ndarray, tol: float, coverage: float) -> tuple[int, int]:
    """``(first, end)``: the rows of ``a`` left after dropping the uniform rows at the top and
    at the bottom. A row is uniform when ``coverage`` of its pixels lie within ``tol`` of the
    outermost row's most common level; rows of burnt-in text in such a border (at least
    :data:`BORDER_MOSTLY` border level) are dropped with it when a uniform row follows them."""
    n, m = a.shape
    first, end = 0, n
    k = int(round(tol * 255))
    for edge in (0, n - 1):
        counts = np.bincount(np.rint(a[edge] * 255).astype(np.intp), minlength=256)
        mode = int(np.argmax(counts))
        if counts[max(0, mode - k) : mode + k + 1].sum() < BORDER_MOSTLY * m:
            continue  # the usual case: no border on this side
        share = np.count_nonzero(np.abs(a - mode / 255) <= tol, axis=1) / m
        if edge == n - 1:
            share = share[::-1]
        mostly = share >= BORDER_MOSTLY
        run = int(np.argmin(mostly)) if not mostly.all() else n
        clean = np.flatnonzero(share[:run] >= coverage)
        depth = int(clean[-1]) + 1 if clean.size else 0
        if edge == 0:
            first = depth
        else:
            end = n - depth
    return first, end


def content_box(img: np.ndarray, tol: float = BORDER_TOL, coverage: float = BORDER_COVERAGE) -> tuple[int, int, int, int]:
    """The box inside uniform borders (letterbox bars, padding, frames of any grey level).

    Args:
        img: 2-D float greyscale image in [0, 1] (:func:`prepare` stretches it to its full
            range first: 12-bit pixels in a 16-bit file are judged like 8-bit ones).
        tol: largest difference from a border's level still counted as border.
        coverage: share of a row or column's pixels that must be border level.

    Returns:
        ``(y0, y1, x0, x1)``; the whole image when cropping would leave less than 8 % of a
        side (a blank image is blank, not a tiny crop of itself).
    """
    h, w = img.shape
    y0, y1, x0, x1 = 0, h, 0, w
    small_h, small_w = max(2, 0.08 * h), max(2, 0.08 * w)
    for _ in range(2):  # rows, columns, and again (a frame with a text line in a corner)
        a, b = _border_lines(img[y0:y1, x0:x1], tol, coverage)
        y0, y1 = y0 + a, y0 + max(b, a)
        if y1 - y0 < small_h:
            return 0, h, 0, w
        a, b = _border_lines(img[y0:y1, x0:x1].T, tol, coverage)
        x0, x1 = x0 + a, x0 + max(b, a)
        if x1 - x0 < small_w:
            return 0, h, 0, w
    return y0, y1, x0, x1


@dataclass
class Prepared:
    """An image's content, ready for the rules and the features.

    Attributes:
        image: the image the rest refers to (reduced to fit ``WORK_SIDE``, finite).
        box: ``(y0, y1, x0, x1)`` of the content inside uniform borders.
        square: the content resized to ``SIDE``² (raw intensities).
        sorted: the square's values, sorted (for percentiles).
        lo: intensity mapped to 0 by the stretch.
        hi: intensity mapped to 1.
    """

    image: np.ndarray
    box: tuple[int, int, int, int]
    square: np.ndarray
    sorted: np.ndarray
    lo: float
    hi: float

    def percentiles(self, qs: tuple[float, ...]) -> np.ndarray:
        """Raw-intensity percentiles of the content (as :func:`percentiles`)."""
        return _sorted_percentiles(self.sorted, qs)


def prepare(img: np.ndarray) -> Prepared:
    """Reduce to ``WORK_SIDE``, crop uniform borders, resize the content to the ``SIDE``²
    square and find its stretch (:data:`STRETCH` percentiles).

    Args:
        img: 2-D float greyscale image in [0, 1] (non-finite values become 0 or 1).
    """
    img = np.asarray(img, dtype=np.float32)
    if not np.isfinite(img).all():
        img = np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0)
    if max(img.shape) > WORK_SIDE:
        img = resize_float(img, *fit_within(img.shape[0], img.shape[1], WORK_SIDE))
    mn, mx = float(img.min()), float(img.max())  # borders are judged relative to the range in use
    box = content_box((img - mn) * (1.0 / (mx - mn))) if mx - mn > 1e-6 else (0, img.shape[0], 0, img.shape[1])
    y0, y1, x0, x1 = box
    sq = resize_float(img[y0:y1, x0:x1], SIDE, SIDE)
    s = np.sort(sq, axis=None)
    lo, hi = (float(v) for v in _sorted_percentiles(s, STRETCH))
    return Prepared(img, box, sq, s, lo, hi)


def _canonical(p: Prepared, template: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """The stretched square, the stretched content at working resolution, and whether both
    were inverted to match the template's polarity."""
    scale = 1.0 / (p.hi - p.lo) if p.hi - p.lo > 1e-6 else 0.0
    x = np.clip((p.square - p.lo) * scale, 0.0, 1.0)
    invert = False
    if template is not None:  # the sign of the strongest match with any variant of the template
        c = template_bank(template) @ _unit(_pool(x, TEMPLATE))
        invert = bool(c[int(np.argmax(np.abs(c)))] < 0)
    y0, y1, x0, x1 = p.box
    crop = np.clip((p.image[y0:y1, x0:x1] - p.lo) * scale, 0.0, 1.0)
    if invert:
        return 1.0 - x, 1.0 - crop, True
    return x, crop, False


def thumbnail(img: np.ndarray, prepared: Prepared | None = None) -> np.ndarray:
    """The z-scored ``TEMPLATE``² thumbnail of an image's stretched content, in its own
    polarity (the chest template is the mean of these over chest X-rays).

    Args:
        img: 2-D float greyscale image in [0, 1].
        prepared: :func:`prepare` of ``img``, if already computed.
    """
    p = prepared or prepare(img)
    x, _, _ = _canonical(p, None)
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


def template_features(thumb: np.ndarray, template: np.ndarray | None) -> dict[str, float]:
    """Correlation of a thumbnail (and of its mirror image) with the chest template, and the
    best correlation with any of its zoomed, rotated or shifted variants.

    Args:
        thumb: ``TEMPLATE``² thumbnail.
        template: the mean chest X-ray thumbnail, or ``None`` (all features 0).
    """
    if template is None:
        return {"template_corr": 0.0, "template_corr_flip": 0.0, "template_corr_best": 0.0}
    c = template_bank(template) @ _unit(thumb)
    return {"template_corr": float(c[0]), "template_corr_flip": _corr(thumb[:, ::-1], template), "template_corr_best": float(c.max())}


def _symmetry_best(x32: np.ndarray) -> float:
    """The best left-right mirror correlation of a 32² thumbnail about an axis tilted by up to
    8 degrees or moved by up to 2 pixels."""
    z = _zscore(x32).astype(np.float32)
    best = -1.0
    for angle in (-8.0, 0.0, 8.0):
        r = z if angle == 0 else np.asarray(Image.fromarray(z, mode="F").rotate(angle, resample=Image.Resampling.BILINEAR))
        m = r[:, ::-1]
        for s in (-4, 0, 4):
            a, b = (r[:, s:], m[:, : 32 - s]) if s >= 0 else (r[:, :s], m[:, -s:])
            best = max(best, _corr(a, b))
    return best


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
    x, crop, inverted = _canonical(p, template)
    f: dict[str, float] = {}

    # ---------------------------------------------------------------- intensity
    sd = float(x.std())
    f["mean"] = float(x.mean())
    f["std"] = sd
    scale = 1.0 / (p.hi - p.lo) if p.hi - p.lo > 1e-6 else 0.0
    qs = tuple(100 - q for q in PERCENTILES) if inverted else PERCENTILES
    vals = np.clip((p.percentiles(qs) - p.lo) * scale, 0.0, 1.0)
    for q, v in zip(PERCENTILES, 1.0 - vals if inverted else vals):
        f[f"p{q}"] = float(v)
    h64 = _hist64(x).astype(np.float64) / x.size
    # the 16 bins are sums of 4 of the 64 (their edges k/16 = 4k/64 are exact binary fractions)
    for i, v in enumerate(h64.reshape(16, 4).sum(axis=1)):
        f[f"hist{i:02d}"] = float(v)
    nz = h64[h64 > 0]
    f["entropy"] = float(-(nz * np.log2(nz)).sum() / 6.0)
    f["dark_frac"] = float((x < 0.05).mean())
    f["bright_frac"] = float((x > 0.95).mean())

    # ---------------------------------------------------------------- texture at working resolution
    ch, cw = crop.shape
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
    gm = float(g.mean())
    strong = g > 0.05
    f["grad_mean"] = gm
    f["grad_rel"] = gm / (sd + 1e-3)
    f["edge_frac_05"] = float(strong.mean())
    f["edge_frac_15"] = float((g > 0.15).mean())
    if np.count_nonzero(strong) > 10:
        ax, ay = np.abs(gx[strong]), np.abs(gy[strong])
        f["axis_aligned"] = float(((ax < 0.1 * ay) | (ay < 0.1 * ax)).mean())
    else:
        f["axis_aligned"] = 0.0
    # orientation of the edges (0 = horizontal gradient, i.e. vertical edges), magnitude-weighted
    theta = np.arctan2(gy, gx) % np.pi
    bins = np.minimum((theta * (ORIENT_BINS / np.pi)).astype(np.intp), ORIENT_BINS - 1)
    orient = np.bincount(bins.ravel(), weights=g.ravel(), minlength=ORIENT_BINS) / (float(g.sum()) + 1e-9)
    for i, v in enumerate(orient):
        f[f"orient{i}"] = float(v)
    # how unevenly detail is spread (16-pixel blocks): photographs mix flat and busy regions
    block_sd = x.reshape(8, SIDE // 8, 8, SIDE // 8).std(axis=(1, 3))
    f["block_sd_cv"] = float(block_sd.std() / (block_sd.mean() + 1e-3))

    # ---------------------------------------------------------------- symmetry and layout
    p64 = _pool(x, 64)
    p32 = _pool(p64, 32)
    p16 = _pool(p32, TEMPLATE)
    z64 = _zscore(p64)
    f["sym_lr"] = _corr(z64, z64[:, ::-1])
    f["sym_lr_best"] = _symmetry_best(p32)
    f["sym_ud"] = _corr(z64, z64[::-1, :])
    z = _zscore(x)
    rows = z.reshape(8, SIDE // 8, SIDE).mean(axis=(1, 2))
    cols = z.reshape(SIDE, 8, SIDE // 8).mean(axis=(0, 2))
    for i in range(8):
        f[f"row{i}"] = float(rows[i])
    for i in range(8):
        f[f"col{i}"] = float(cols[i])
    f["col_centre_minus_sides"] = float(z[:, 48:80].mean() - 0.5 * (z[:, 16:48].mean() + z[:, 80:112].mean()))
    border = (z[:16].sum() + z[-16:].sum() + z[16:-16, :16].sum() + z[16:-16, -16:].sum()) / (SIDE * SIDE - 96 * 96)
    f["centre_minus_border"] = float(z[32:96, 32:96].mean() - border)
    corners = np.stack([x[:16, :16], x[:16, -16:], x[-16:, :16], x[-16:, -16:]])
    f["corner_mean"] = float(corners.mean())
    f["corner_dark"] = float((corners < 0.05).mean())
    tz = _zscore(_pool(p16, THUMB))
    for i, v in enumerate(tz.ravel()):
        f[f"thumb{i:02d}"] = float(v)
    f.update(template_features(_zscore(p16), template))

    # ---------------------------------------------------------------- colour (from the reader)
    f["saturation"] = float(meta.get("saturation", 0.0) or 0.0)
    f["colour_fraction"] = float(meta.get("colour_fraction", 0.0) or 0.0)
    return f


def feature_names() -> list[str]:
    """The names :func:`image_features` returns, in order."""
    return list(image_features(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).keys())
