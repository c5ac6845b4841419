"""Transformations of chest X-rays that imitate films from other hospitals, for fitting the
not-a-chest-X-ray guard and for measuring how well it accepts them.

Only paediatric AP films from one hospital are available offline, so the variety of real
chest films (adult PA and AP films, portable and ICU films with lines, tubes and electrodes,
padded or letterboxed exports, side markers and burnt-in text, tight crops and wide fields,
other processing and bit depths, either polarity) is built by transforming them. Each
*family* changes one aspect (``portable_mix`` combines several):

=================  ==========================================================================
``proportions``    other body proportions and positioning: anisotropic stretch, shear,
                   shift and a smooth warp of the anatomy (adult thorax, other heart and
                   lung shapes)
``letterbox``      black, white or grey borders up to another aspect ratio (or a frame)
``rotation``       rotated by up to 15 degrees, corners filled black, white or grey
``tight_crop``     cropped to the thorax (40-80 % of the area)
``wide_field``     zoomed out: the film smaller on a background of surroundings
``exposure``       gamma, window/level, contrast compression, (local) histogram equalisation,
                   edge enhancement
``devices``        lines, tubes and wires (bright thin curves), ECG electrodes (discs),
                   sternal wires and a pacemaker-like box
``markers_text``   L/R markers and burnt-in text in corners and along edges
``noise_blur``     quantum noise, blur, down-sampling, strong JPEG compression
``inverted``       MONOCHROME1 stored without its inversion (white air, black bone)
``bit16``          16-bit PNG holding 10-, 12-, 14- or 16-bit data
``portable_mix``   an ICU film: devices, markers, rotation, exposure, borders, noise together
=================  ==========================================================================

:data:`FIT` and :data:`HELD_OUT` are two parameter profiles: the held-out evaluation uses
other ranges, other marker texts and other seeds than the fitting set. While fitting, half
the copies of every family also get milder other proportions (``jitter``), so that the
classifier cannot lean on the exact layout of one hospital's paediatric films. Only numpy and Pillow
are needed (the acceptance tests use these transformations).
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .guard_synth import encode, font

#: Parameter profile of the fitting set (a little wider than the held-out one).
FIT: dict[str, Any] = {
    "name": "fit", "stretch": (0.72, 1.38), "shear": 0.14, "warp": 0.045, "jitter": 0.5, "max_rotation": 17.0, "aspect": (0.45, 2.5), "crop_area": (0.45, 0.85), "wide_scale": (0.58, 0.92),
    "gamma": (0.4, 2.6), "noise": (1.0, 16.0), "blur": (0.4, 1.6), "jpeg": (15, 95), "line_width": (1, 5),
    "texts": ("PORTABLE", "AP", "SUPINE", "ERECT", "ICU", "BED 12", "12/03/2019 04:21", "ID 0042817", "CHEST",
              "kV 90 mAs 2.5", "SEMI-ERECT", "MOBILE", "St. Mary", "ACC 88231", "DX-1"),
}
#: Parameter profile of the held-out evaluation set (other ranges, texts and seeds).
HELD_OUT: dict[str, Any] = {
    "name": "held_out", "stretch": (0.77, 1.3), "shear": 0.12, "warp": 0.04, "jitter": 0.0, "max_rotation": 15.0, "aspect": (0.5, 2.2), "crop_area": (0.5, 0.8), "wide_scale": (0.62, 0.88),
    "gamma": (0.45, 2.2), "noise": (1.5, 12.0), "blur": (0.5, 1.4), "jpeg": (20, 90), "line_width": (1, 4),
    "texts": ("PA", "UPRIGHT", "AP PORTABLE", "CCU 3", "2021-07-14", "08:55", "MRN 553120", "THORAX", "INSP",
              "General Hospital", "R. Smith", "LAT DECUB", "Exp 4", "WARD 7"),
}


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(math.log(lo), math.log(hi))))


def _fill(rng: np.random.Generator) -> int:
    return int(rng.choice([0, 0, 255, int(rng.integers(0, 256))]))


# ----------------------------------------------------------------------------- geometry
def letterbox(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Pad to another aspect ratio (or add a frame) with black, white or grey borders."""
    h, w = a.shape
    fill = _fill(rng)
    if rng.random() < 0.25:  # a frame on every side
        t, b, l, r = (int(rng.uniform(0.02, 0.15) * min(h, w)) for _ in range(4))
    else:
        target = _logu(rng, *p["aspect"])
        if target > w / h:
            extra = int(h * target) - w
            l = int(extra * rng.uniform(0.0, 1.0) if rng.random() < 0.3 else extra // 2)
            t, b, r = 0, 0, extra - l
        else:
            extra = int(w / target) - h
            t = int(extra * rng.uniform(0.0, 1.0) if rng.random() < 0.3 else extra // 2)
            l, r, b = 0, 0, extra - t
    out = np.full((h + t + b, w + l + r), fill, np.uint8)
    out[t : t + h, l : l + w] = a
    if fill not in (0, 255) and rng.random() < 0.5:  # a grey pad with a little sensor noise
        noise = rng.normal(0, 1.5, out.shape)
        noise[t : t + h, l : l + w] = 0
        out = _u8(out + noise)
    return out


def rotation(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Rotate by up to ``max_rotation`` degrees, keeping or growing the frame."""
    ang = float(rng.uniform(-p["max_rotation"], p["max_rotation"]))
    im = Image.fromarray(a).rotate(ang, resample=Image.Resampling.BILINEAR, expand=bool(rng.random() < 0.4), fillcolor=_fill(rng))
    return np.asarray(im)


def tight_crop(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Crop to the thorax: a box of ``crop_area`` of the image, centred a little above the
    middle (adult PA films are collimated to the lungs)."""
    h, w = a.shape
    area = rng.uniform(*p["crop_area"])
    aspect = _logu(rng, 0.75, 1.35)
    cw, ch = min(w, int(w * math.sqrt(area * aspect))), min(h, int(h * math.sqrt(area / aspect)))
    cx = w / 2 + rng.normal(0, 0.04) * w
    cy = h * rng.uniform(0.4, 0.55)
    x0 = int(np.clip(cx - cw / 2, 0, w - cw))
    y0 = int(np.clip(cy - ch / 2, 0, h - ch))
    return a[y0 : y0 + ch, x0 : x0 + cw]


def _reflect(v: np.ndarray, n: int) -> np.ndarray:
    """Coordinates reflected into ``[0, n - 1]`` (mirror at the edges)."""
    period = 2 * (n - 1)
    v = np.abs(v) % period if period > 0 else np.zeros_like(v)
    return np.where(v > n - 1, period - v, v)


def _smooth_field(rng: np.random.Generator, h: int, w: int, amplitude: float) -> np.ndarray:
    """A smooth random displacement (pixels): a 4x4 grid of normal values, upsampled bicubically."""
    grid = rng.normal(0, amplitude, (4, 4)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def proportions(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Other body proportions and positioning: the anatomy stretched differently along each
    axis (``stretch``: broad or slender thorax, more or less abdomen), sheared (``shear``),
    shifted, and smoothly warped (``warp`` of the side: a larger heart, other lung shapes).
    The frame keeps its size; what it reaches beyond the film is mirrored in."""
    h, w = a.shape
    sx, sy = _logu(rng, *p["stretch"]), _logu(rng, *p["stretch"])
    shear = float(rng.uniform(-p["shear"], p["shear"]))
    cx, cy = w / 2 + rng.normal(0, 0.05) * w, h / 2 + rng.normal(0, 0.05) * h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx - w / 2, yy - h / 2
    side = max(h, w)
    xs = cx + (u + shear * v) / sx + _smooth_field(rng, h, w, p["warp"] * side)
    ys = cy + v / sy + _smooth_field(rng, h, w, p["warp"] * side)
    xs, ys = _reflect(xs, w), _reflect(ys, h)
    x0, y0 = np.minimum(xs.astype(np.intp), w - 2), np.minimum(ys.astype(np.intp), h - 2)
    fx, fy = xs - x0, ys - y0
    f = a.astype(np.float32)
    top = f[y0, x0] * (1 - fx) + f[y0, x0 + 1] * fx
    bottom = f[y0 + 1, x0] * (1 - fx) + f[y0 + 1, x0 + 1] * fx
    return _u8(top * (1 - fy) + bottom * fy)


def _feather(h: int, w: int, margin: float) -> np.ndarray:
    """A mask that is 1 inside and falls smoothly to 0 over ``margin`` of each side."""
    def ramp(n: int) -> np.ndarray:
        m = max(1.0, margin * n)
        d = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5)
        return np.clip(d / m, 0, 1) ** 2 * (3 - 2 * np.clip(d / m, 0, 1))
    return (ramp(h)[:, None] * ramp(w)[None, :]).astype(np.float32)


def wide_field(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Zoom out: the film at ``wide_scale`` of a larger field. Around it, more of the body
    fading into dark air (its own edges reflected, blurred and darkened), dark air alone, or
    bright unexposed (collimated) margins with a sharp edge."""
    h, w = a.shape
    s = rng.uniform(*p["wide_scale"])
    H, W = int(h / s), max(w + 2, int(w / s * _logu(rng, 0.85, 1.2)))
    y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    kind = rng.integers(3)
    air = float(np.percentile(a, 3))
    if kind == 2:  # collimation: bright, nearly flat margins
        out = np.full((H, W), rng.uniform(180, 250), np.float32) + rng.normal(0, rng.uniform(0, 1.2), (H, W))
        out[y0 : y0 + h, x0 : x0 + w] = a
        return _u8(out)
    out = np.full((H, W), air + rng.uniform(-5, 10), np.float32)
    if kind == 0:  # more body: the film's edges, reflected, blurred, fading out
        big = np.pad(a, ((y0, H - h - y0), (x0, W - w - x0)), mode="reflect")
        big = np.asarray(Image.fromarray(big).filter(ImageFilter.GaussianBlur(float(rng.uniform(3, 10))))).astype(np.float32)
        fade = _feather(H, W, 0.2)
        out = out * (1 - fade) + big * rng.uniform(0.5, 0.9) * fade
    film = _feather(h, w, rng.uniform(0.04, 0.12))  # no straight edge: the body meets the air
    out[y0 : y0 + h, x0 : x0 + w] = out[y0 : y0 + h, x0 : x0 + w] * (1 - film) + a * film
    return _u8(out + rng.normal(0, rng.uniform(0, 2.5), (H, W)))


# ----------------------------------------------------------------------------- intensity
def equalise_local(a: np.ndarray, tiles: int = 4, clip: float = 3.0) -> np.ndarray:
    """A CLAHE-like equalisation: clipped histogram equalisation per tile, blended
    bilinearly between tile centres.

    Args:
        a: ``uint8`` greyscale image.
        tiles: tiles per side.
        clip: histogram clip limit, in multiples of the mean bin height.
    """
    h, w = a.shape
    ys, xs = np.linspace(0, h, tiles + 1).astype(int), np.linspace(0, w, tiles + 1).astype(int)
    luts = np.zeros((tiles, tiles, 256), np.float32)
    for i in range(tiles):
        for j in range(tiles):
            hist = np.bincount(a[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].ravel(), minlength=256).astype(np.float64)
            limit = clip * max(hist.sum(), 1) / 256
            excess = np.maximum(hist - limit, 0).sum()
            hist = np.minimum(hist, limit) + excess / 256
            cdf = np.cumsum(hist)
            luts[i, j] = 255 * (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1e-9)
    cy = np.clip((np.arange(h) + 0.5) / (h / tiles) - 0.5, 0, tiles - 1)
    cx = np.clip((np.arange(w) + 0.5) / (w / tiles) - 0.5, 0, tiles - 1)
    y0, x0 = np.minimum(cy.astype(int), tiles - 2), np.minimum(cx.astype(int), tiles - 2)
    fy, fx = (cy - y0)[:, None], (cx - x0)[None, :]
    Y0, X0 = y0[:, None], x0[None, :]
    v = a.astype(np.intp)
    top = luts[Y0, X0, v] * (1 - fx) + luts[Y0, X0 + 1, v] * fx
    bottom = luts[Y0 + 1, X0, v] * (1 - fx) + luts[Y0 + 1, X0 + 1, v] * fx
    return _u8(top * (1 - fy) + bottom * fy)


def exposure(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Other exposure and processing: one or two of gamma, window/level, contrast
    compression, global or local equalisation, edge enhancement, log response."""
    out = a
    for k in rng.choice(6, size=int(rng.integers(1, 3)), replace=False):
        x = out.astype(np.float32) / 255
        if k == 0:
            out = _u8(255 * x ** _logu(rng, *p["gamma"]))
        elif k == 1:  # a narrower window: part of the range saturates
            lo, hi = rng.uniform(0, 0.3), rng.uniform(0.7, 1.0)
            out = _u8(255 * np.clip((x - lo) / (hi - lo), 0, 1))
        elif k == 2:  # a wider window: low contrast
            lo, hi = rng.uniform(0, 0.35), rng.uniform(0.6, 1.0)
            out = _u8(255 * (lo + x * (hi - lo)))
        elif k == 3:
            out = equalise_local(out, int(rng.integers(2, 9)), float(rng.uniform(1.5, 4.0)))
        elif k == 4:
            r = float(rng.uniform(2, 12))
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.UnsharpMask(r, int(rng.integers(60, 250)), 2)))
        else:
            hist = np.bincount(out.ravel(), minlength=256).cumsum()
            out = _u8(255 * (hist[out] - hist[0]) / max(hist[-1] - hist[0], 1))
    return out


def invert(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """MONOCHROME1 pixels displayed without their inversion."""
    return 255 - a


def noise_blur(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Quantum noise, blur or a low-resolution source (strong JPEG comes at encoding)."""
    x = a.astype(np.float32)
    k = rng.integers(3)
    if k == 0:
        sigma = rng.uniform(*p["noise"])
        x = x + rng.normal(0, 1, x.shape) * sigma * np.sqrt(np.maximum(x, 8) / 128)
    elif k == 1:
        x = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(float(rng.uniform(*p["blur"]))))).astype(np.float32)
    else:
        h, w = a.shape
        f = rng.uniform(1.5, 2.5)
        small = Image.fromarray(a).resize((max(16, int(w / f)), max(16, int(h / f))), Image.Resampling.BILINEAR)
        x = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC)).astype(np.float32)
        x = x + rng.normal(0, rng.uniform(0, 4), x.shape)
    return _u8(x)


# ----------------------------------------------------------------------------- overlays
def _bezier(pts: np.ndarray, n: int = 40) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)[:, None]
    c = (1 - t) ** 3 * pts[0] + 3 * (1 - t) ** 2 * t * pts[1] + 3 * (1 - t) * t**2 * pts[2] + t**3 * pts[3]
    return [(float(x), float(y)) for x, y in c]


def devices(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """Lines, tubes and wires (bright thin curves), ECG electrodes (bright discs or rings
    with their leads), sternal wire loops and a pacemaker-like box."""
    h, w = a.shape
    im = Image.fromarray(a)
    d = ImageDraw.Draw(im)
    unit = max(h, w) / 224
    for _ in range(int(rng.integers(1, 5))):  # tubes and lines entering from the top or sides
        start = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(-0.05, 0.15) * h]) if rng.random() < 0.7 else \
            np.array([float(rng.choice([-0.02, 1.02])) * w, rng.uniform(0.1, 0.8) * h])
        end = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.85) * h])
        mid = [start + (end - start) * f + rng.normal(0, 0.12, 2) * (w, h) for f in (0.33, 0.66)]
        width = max(1, int(round(rng.integers(*p["line_width"], endpoint=True) * unit)))
        bright = int(rng.integers(190, 256))
        line = _bezier(np.array([start, *mid, end]))
        d.line(line, fill=bright, width=width, joint="curve")
        if width >= 3 and rng.random() < 0.5:  # a tube: darker lumen
            d.line(line, fill=int(bright * rng.uniform(0.5, 0.8)), width=max(1, width // 3))
    for _ in range(int(rng.integers(0, 7))):  # electrodes with leads
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.05, 0.75) * h
        r = rng.uniform(2.5, 7.0) * unit
        val = int(rng.integers(200, 256))
        if rng.random() < 0.5:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=val)
        else:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=val, width=max(1, int(r / 3)))
            d.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=val)
        if rng.random() < 0.7:
            end = np.array([rng.uniform(0, 1) * w, float(rng.choice([-0.05, 1.05])) * h])
            mids = [np.array([cx, cy]) + (end - (cx, cy)) * f + rng.normal(0, 0.08, 2) * (w, h) for f in (0.3, 0.7)]
            d.line(_bezier(np.array([(cx, cy), *mids, end])), fill=int(rng.integers(170, 256)), width=max(1, int(unit)))
    if rng.random() < 0.3:  # sternal wires: small bright loops down the midline
        for k in range(int(rng.integers(3, 7))):
            cx, cy = w * rng.normal(0.5, 0.02), h * (0.3 + 0.07 * k)
            d.ellipse([cx - 3 * unit, cy - 2 * unit, cx + 3 * unit, cy + 2 * unit], outline=255, width=max(1, int(unit)))
    if rng.random() < 0.2:  # a pacemaker / port: a bright box with a lead
        cx, cy = w * float(rng.choice([0.2, 0.8])), h * rng.uniform(0.12, 0.3)
        s = rng.uniform(8, 14) * unit
        d.rounded_rectangle([cx - s, cy - s * 0.7, cx + s, cy + s * 0.7], radius=int(s / 3), fill=250)
        d.line(_bezier(np.array([(cx, cy), (cx, cy + 30 * unit), (w * 0.5, h * 0.5), (w * 0.55, h * 0.6)])), fill=240, width=max(1, int(2 * unit)))
    return np.asarray(im)


def markers_text(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """An L or R marker and lines of burnt-in text in the corners or along an edge."""
    h, w = a.shape
    im = Image.fromarray(a)
    d = ImageDraw.Draw(im)
    if rng.random() < 0.85:
        size = max(8, int(min(h, w) * rng.uniform(0.06, 0.14)))
        x, y = rng.uniform(0.03, 0.2) * w, rng.uniform(0.03, 0.2) * h
        if rng.random() < 0.5:
            x = w - x - size
        val = int(rng.choice([255, 255, 0]))
        if rng.random() < 0.5:  # a boxed lead marker
            d.rectangle([x - 3, y - 3, x + size + 3, y + size * 1.2 + 3], outline=val, width=max(1, size // 10))
        d.text((x, y), str(rng.choice(["L", "R"])), fill=val, font=font(size))
    for _ in range(int(rng.integers(1, 6))):
        size = max(6, int(min(h, w) * rng.uniform(0.025, 0.06)))
        text = " ".join(rng.choice(p["texts"], int(rng.integers(1, 3))))
        corner = rng.integers(4)
        x = rng.uniform(0.01, 0.06) * w if corner % 2 == 0 else w * rng.uniform(0.45, 0.75)
        y = rng.uniform(0.01, 0.08) * h if corner < 2 else h * rng.uniform(0.85, 0.95)
        val = int(rng.choice([255, 230, 0, 128]))
        if rng.random() < 0.25:  # text on its own box
            box = d.textbbox((x, y), text, font=font(size))
            d.rectangle(box, fill=255 - val if val in (0, 255) else 0)
        d.text((x, y), text, fill=val, font=font(size))
    return np.asarray(im)


def portable_mix(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    """An ICU / portable film: devices with markers and text, and often a tilt, other
    processing, a tight or wide field, borders, noise or the other polarity."""
    out = devices(a, rng, p)
    if rng.random() < 0.5:
        out = exposure(out, rng, p)
    if rng.random() < 0.5:
        out = rotation(out, rng, {**p, "max_rotation": p["max_rotation"] * 0.7})
    field = rng.random()
    if field < 0.25:
        out = tight_crop(out, rng, p)
    elif field < 0.5:
        out = wide_field(out, rng, p)
    if rng.random() < 0.8:
        out = markers_text(out, rng, p)
    if rng.random() < 0.3:
        out = letterbox(out, rng, p)
    if rng.random() < 0.2:
        x = out.astype(np.float32)
        out = _u8(x + rng.normal(0, 1, x.shape) * rng.uniform(*p["noise"]) * np.sqrt(np.maximum(x, 8) / 128))
    if rng.random() < 0.1:
        out = invert(out, rng, p)
    return out


def _identity(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    return a


#: The transformation of each family (``bit16`` changes only the storage, at encoding).
FAMILIES: dict[str, Callable[[np.ndarray, np.random.Generator, dict[str, Any]], np.ndarray]] = {
    "proportions": proportions, "letterbox": letterbox, "rotation": rotation, "tight_crop": tight_crop, "wide_field": wide_field,
    "exposure": exposure, "devices": devices, "markers_text": markers_text, "noise_blur": noise_blur,
    "inverted": invert, "bit16": _identity, "portable_mix": portable_mix,
}


def encode_cxr(a: np.ndarray, rng: np.random.Generator, p: dict[str, Any], bit16: bool = False) -> tuple[bytes, str]:
    """Resize to a random working size and encode as JPEG, 8-bit PNG or 16-bit PNG.

    Args:
        a: ``uint8`` greyscale image.
        rng: random generator.
        p: parameter profile (JPEG quality range).
        bit16: store as 16-bit PNG holding 10- to 16-bit data (with an offset sometimes).

    Returns:
        ``(bytes, file name)``.
    """
    h, w = a.shape
    side = int(rng.integers(224, 900))
    s = side / max(h, w)
    a = np.asarray(Image.fromarray(a).resize((max(16, int(w * s)), max(16, int(h * s))), Image.Resampling.BILINEAR))
    if bit16:
        bits = int(rng.choice([10, 12, 12, 14, 16]))
        top = 2**bits - 1
        offset = int(rng.integers(0, 65535 - top + 1)) if rng.random() < 0.2 else 0
        v = offset + a.astype(np.float64) / 255 * top + rng.uniform(0, top / 255, a.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(v, 0, 65535).astype(np.uint16)).save(buf, format="PNG")
        return buf.getvalue(), "x16.png"
    if rng.random() < 0.6:
        return encode(a, "JPEG", int(rng.integers(*p["jpeg"]))), "x.jpg"
    return encode(a, "PNG"), "x.png"


def transform_cxr(a: np.ndarray, family: str, rng: np.random.Generator, profile: dict[str, Any] = HELD_OUT) -> tuple[bytes, str]:
    """One transformed, encoded copy of a chest X-ray.

    Args:
        a: ``uint8`` greyscale chest X-ray.
        family: a :data:`FAMILIES` key.
        rng: random generator.
        profile: :data:`FIT` or :data:`HELD_OUT`.

    Returns:
        ``(bytes, file name)`` as a user would upload them.
    """
    if rng.random() < profile.get("jitter", 0.0):  # fitting: any family on other proportions too
        a = proportions(a, rng, {**profile, "stretch": tuple(math.sqrt(v) for v in profile["stretch"])})
    out = np.ascontiguousarray(FAMILIES[family](a, rng, profile))
    return encode_cxr(out, rng, profile, bit16=family == "bit16")
