"""Generated images that are *not* chest X-rays, for fitting and testing the guard.

Every generator takes a :class:`numpy.random.Generator` and returns a ``uint8`` image,
``(H, W)`` greyscale or ``(H, W, 3)`` RGB, of a random size. The categories mirror what
people upload by mistake: noise, blank or flat images, gradients, text documents, UI
screenshots, charts, geometric drawings, textures, CT/MR-like cross-sections, and logos,
pie charts and icons.

Only numpy and Pillow are needed (charts use matplotlib when it is installed).
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Generator = Callable[[np.random.Generator], np.ndarray]

_WORDS = (
    "the of and to in is was for that with on as by at from this patient report results table page figure "
    "summary data value total date name invoice account section chapter method analysis model number level "
    "system service user login settings file edit view help window status update version download document "
    "introduction conclusion reference annual meeting notes agenda project budget quarter revenue growth"
).split()


def _size(rng: np.random.Generator, lo: int = 160, hi: int = 900) -> tuple[int, int]:
    w = int(rng.integers(lo, hi))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.8))))
    return w, int(np.clip(w / aspect, lo * 0.6, hi * 1.2))


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` pixels (its bitmap font without FreeType).

    Args:
        size: font size in pixels.
    """
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _colour(rng: np.random.Generator, grey: bool) -> tuple[int, int, int]:
    if grey:
        v = int(rng.integers(0, 256))
        return (v, v, v)
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_WORDS, n))


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    im = Image.fromarray(arr)
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)))


# ----------------------------------------------------------------------------- noise, flat
def noise(rng: np.random.Generator) -> np.ndarray:
    """Uniform, Gaussian or salt-and-pepper noise, greyscale or colour."""
    w, h = _size(rng)
    shape = (h, w) if rng.random() < 0.6 else (h, w, 3)
    kind = rng.integers(3)
    if kind == 0:
        a = rng.integers(0, 256, shape)
    elif kind == 1:
        a = rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), shape)
    else:
        a = np.full(shape, rng.uniform(0, 255))
        m = rng.random(shape[:2]) < rng.uniform(0.02, 0.3)
        a[m] = rng.choice([0, 255], int(m.sum()))[:, None] if a.ndim == 3 else rng.choice([0, 255], int(m.sum()))
    return np.clip(a, 0, 255).astype(np.uint8)


def smooth_noise(rng: np.random.Generator) -> np.ndarray:
    """Multi-octave value noise ("clouds"), sometimes with fine grain on top."""
    w, h = _size(rng)
    acc = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    base = int(rng.integers(2, 12))
    for octave in range(int(rng.integers(1, 6))):
        n = base * 2**octave
        small = rng.random((n, max(2, int(n * w / h)))).astype(np.float32)
        acc += amp * np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        total += amp
        amp *= rng.uniform(0.3, 0.7)
    acc /= total
    acc = (acc - acc.min()) / max(float(acc.max() - acc.min()), 1e-6)
    if rng.random() < 0.4:
        acc = acc + rng.normal(0, rng.uniform(0.01, 0.08), acc.shape)
    return np.clip(acc * 255, 0, 255).astype(np.uint8)


def blank(rng: np.random.Generator) -> np.ndarray:
    """A flat image of any level, sometimes with slight sensor noise or a colour tint."""
    w, h = _size(rng, 32, 900)
    level = float(rng.choice([0, 255, rng.uniform(0, 255)]))
    a = np.full((h, w), level, np.float32) + rng.normal(0, rng.choice([0.0, 0.5, 2.0]), (h, w))
    if rng.random() < 0.3:
        tint = rng.uniform(0.6, 1.0, 3)
        return np.clip(a[..., None] * tint, 0, 255).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def gradient(rng: np.random.Generator) -> np.ndarray:
    """Linear or radial gradients (greyscale or between two colours)."""
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        ang = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(ang) / w + yy * np.sin(ang) / h
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.hypot(xx - cx, yy - cy) / math.hypot(w, h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    if rng.random() < 0.3:
        t = t ** rng.uniform(0.3, 3)
    if rng.random() < 0.5:
        return (t * 255).astype(np.uint8)
    c0, c1 = np.array(_colour(rng, False), np.float32), np.array(_colour(rng, False), np.float32)
    return (c0 + t[..., None] * (c1 - c0)).astype(np.uint8)


def pattern(rng: np.random.Generator) -> np.ndarray:
    """Checkerboards, stripes and grids."""
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w]
    p = int(rng.integers(4, 80))
    kind = rng.integers(3)
    if kind == 0:
        a = ((xx // p + yy // p) % 2) * 255
    elif kind == 1:
        ang = rng.uniform(0, np.pi)
        a = (np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / p) > 0) * 255
    else:
        a = np.where((xx % p < 2) | (yy % p < 2), 30, 230)
    a = a.astype(np.uint8)
    return _blur(a, rng.uniform(0, 1.5)) if rng.random() < 0.5 else a


# ----------------------------------------------------------------------------- documents, UI
def document(rng: np.random.Generator) -> np.ndarray:
    """A page of text: headings, paragraphs, sometimes a table or a dark theme."""
    w = int(rng.integers(400, 1100))
    h = int(w * rng.uniform(0.7, 1.5))
    dark = rng.random() < 0.15
    bg, fg = ((30, 30, 30), (220, 220, 220)) if dark else ((255, 255, 255), (20, 20, 20))
    if not dark and rng.random() < 0.3:
        bg = (int(rng.integers(225, 256)),) * 3
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    margin = int(w * rng.uniform(0.04, 0.12))
    y = margin
    fs = int(rng.integers(10, 22))
    while y < h - margin:
        r = rng.random()
        if r < 0.12:
            f = font(int(fs * 1.6))
            d.text((margin, y), _sentence(rng, int(rng.integers(2, 6))).title(), fill=fg, font=f)
            y += int(fs * 2.6)
        elif r < 0.2:
            rows, cols = int(rng.integers(3, 9)), int(rng.integers(2, 6))
            cw, rh = (w - 2 * margin) // cols, int(fs * 1.8)
            for i in range(rows + 1):
                d.line([(margin, y + i * rh), (margin + cols * cw, y + i * rh)], fill=fg, width=1)
            for j in range(cols + 1):
                d.line([(margin + j * cw, y), (margin + j * cw, y + rows * rh)], fill=fg, width=1)
            f = font(fs)
            for i in range(rows):
                for j in range(cols):
                    d.text((margin + j * cw + 4, y + i * rh + 3), _sentence(rng, 1)[: max(1, cw // fs)], fill=fg, font=f)
            y += rows * rh + fs * 2
        else:
            f = font(fs)
            for _ in range(int(rng.integers(2, 9))):
                line = _sentence(rng, int(rng.integers(4, 16)))
                d.text((margin, y), line, fill=fg, font=f)
                y += int(fs * rng.uniform(1.3, 1.8))
                if y > h - margin:
                    break
            y += fs
    a = np.asarray(im)
    return a.mean(axis=2).astype(np.uint8) if rng.random() < 0.5 else a


def screenshot(rng: np.random.Generator) -> np.ndarray:
    """A synthetic application window: title bar, side panel, buttons, text, images."""
    w = int(rng.integers(480, 1400))
    h = int(w * rng.uniform(0.5, 0.9))
    grey = rng.random() < 0.3
    dark = rng.random() < 0.35
    bg = (32, 33, 36) if dark else (245, 245, 245)
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    bar = int(rng.integers(24, 60))
    d.rectangle([0, 0, w, bar], fill=_colour(rng, grey))
    f = font(int(rng.integers(11, 18)))
    d.text((12, bar // 4), _sentence(rng, 3), fill=(255, 255, 255), font=f)
    side = int(w * rng.uniform(0.0, 0.3))
    if side:
        d.rectangle([0, bar, side, h], fill=(50, 52, 56) if dark else (225, 228, 232))
        for i in range(int(rng.integers(4, 14))):
            d.text((10, bar + 12 + i * 28), _sentence(rng, 2), fill=(200, 200, 200) if dark else (40, 40, 40), font=f)
    x0 = side + 16
    y = bar + 16
    while y < h - 40:
        r = rng.random()
        if r < 0.3:
            bw, bh = int(rng.integers(60, 200)), int(rng.integers(24, 44))
            for k in range(int(rng.integers(1, 4))):
                bx = x0 + k * (bw + 12)
                if bx + bw < w:
                    d.rounded_rectangle([bx, y, bx + bw, y + bh], radius=6, fill=_colour(rng, grey))
                    d.text((bx + 8, y + bh // 4), _sentence(rng, 1), fill=(255, 255, 255), font=f)
            y += bh + 16
        elif r < 0.45:
            iw, ih = int(rng.integers(80, max(81, (w - x0) // 2))), int(rng.integers(60, 240))
            tile = smooth_noise(rng)
            tile = np.asarray(Image.fromarray(tile).resize((iw, ih)).convert("RGB"))
            im.paste(Image.fromarray(tile), (x0, y))
            y += ih + 16
        elif r < 0.55:
            d.rectangle([x0, y, w - 16, y + 30], outline=(120, 120, 120), fill=(255, 255, 255) if not dark else (20, 20, 20))
            y += 46
        else:
            for _ in range(int(rng.integers(1, 5))):
                d.text((x0, y), _sentence(rng, int(rng.integers(3, 12))), fill=(220, 220, 220) if dark else (30, 30, 30), font=f)
                y += 22
            y += 10
    a = np.asarray(im)
    return a.mean(axis=2).astype(np.uint8) if grey else a


def chart(rng: np.random.Generator) -> np.ndarray:
    """A rendered chart (line, bar, scatter or histogram) with axes and labels."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return screenshot(rng)
    fig = Figure(figsize=(rng.uniform(3, 8), rng.uniform(2.5, 6)), dpi=int(rng.integers(60, 120)))
    ax = fig.add_subplot(111)
    kind = rng.integers(4)
    x = np.arange(int(rng.integers(5, 60)))
    if kind == 0:
        for _ in range(int(rng.integers(1, 4))):
            ax.plot(x, np.cumsum(rng.normal(0, 1, x.size)))
    elif kind == 1:
        ax.bar(x[:12], rng.uniform(1, 10, min(12, x.size)))
    elif kind == 2:
        ax.scatter(rng.normal(size=200), rng.normal(size=200), s=8)
    else:
        ax.hist(rng.normal(size=500), bins=int(rng.integers(10, 40)))
    ax.set_title(_sentence(rng, 3))
    ax.set_xlabel(_sentence(rng, 1))
    if rng.random() < 0.5:
        ax.grid(True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    a = np.asarray(Image.open(buf).convert("RGB"))
    return a.mean(axis=2).astype(np.uint8) if rng.random() < 0.3 else a


def shapes(rng: np.random.Generator) -> np.ndarray:
    """Random filled or outlined ellipses, rectangles and polygons on a plain background."""
    w, h = _size(rng)
    grey = rng.random() < 0.5
    im = Image.new("RGB", (w, h), _colour(rng, grey))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 25))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        fill = _colour(rng, grey) if rng.random() < 0.7 else None
        outline = _colour(rng, grey)
        k = rng.integers(3)
        if k == 0:
            d.ellipse([x0, y0, x1, y1], fill=fill, outline=outline, width=int(rng.integers(1, 6)))
        elif k == 1:
            d.rectangle([x0, y0, x1, y1], fill=fill, outline=outline, width=int(rng.integers(1, 6)))
        else:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(3, 8)))]
            d.polygon(pts, fill=fill, outline=outline)
    a = np.asarray(im)
    if rng.random() < 0.3:
        a = _blur(a, rng.uniform(0.5, 4))
    return a.mean(axis=2).astype(np.uint8) if grey else a


def logo(rng: np.random.Generator) -> np.ndarray:
    """Flat graphics: a wordmark in large letters, a pie chart or colour wheel, or an icon of
    concentric shapes, on a plain or gradient background."""
    w, h = _size(rng, 200, 900)
    grey = rng.random() < 0.5
    im = Image.new("RGB", (w, h), _colour(rng, grey))
    d = ImageDraw.Draw(im)
    kind = rng.integers(3)
    cx, cy, r = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), min(w, h) * rng.uniform(0.2, 0.48)
    if kind == 0:  # wordmark
        size = int(h * rng.uniform(0.2, 0.5))
        d.text((w * rng.uniform(0.0, 0.3), h * rng.uniform(0.1, 0.5)), _sentence(rng, int(rng.integers(1, 3))), fill=_colour(rng, grey), font=font(size))
    elif kind == 1:  # pie chart, donut or colour wheel
        n = int(rng.integers(3, 40))
        cuts = np.sort(rng.uniform(0, 360, n)) if rng.random() < 0.5 else np.linspace(0, 360, n + 1)[:-1]
        for a0, a1 in zip(cuts, np.append(cuts[1:], cuts[0] + 360)):
            d.pieslice([cx - r, cy - r, cx + r, cy + r], float(a0), float(a1), fill=_colour(rng, grey), outline=_colour(rng, grey))
        if rng.random() < 0.4:
            d.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=_colour(rng, grey))
    else:  # icon: concentric shapes and a symbol
        for k in range(int(rng.integers(2, 6))):
            rr = r * (1 - k * 0.18)
            box = [cx - rr, cy - rr, cx + rr, cy + rr]
            (d.ellipse if rng.random() < 0.6 else d.rectangle)(box, fill=_colour(rng, grey), outline=_colour(rng, grey), width=int(rng.integers(1, 6)))
        d.text((cx - r / 3, cy - r / 2), str(rng.choice(list("ABCDEFGHKMNPRSTXZ?!#@&"))), fill=_colour(rng, grey), font=font(int(r)))
    a = np.asarray(im)
    if rng.random() < 0.3:
        a = _blur(a, rng.uniform(0.5, 3))
    return a.mean(axis=2).astype(np.uint8) if grey or rng.random() < 0.3 else a


# ----------------------------------------------------------------------------- cross-sections
def _ellipse_mask(h: int, w: int, cx: float, cy: float, rx: float, ry: float, ang: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xx - cx, yy - cy
    c, s = math.cos(ang), math.sin(ang)
    return ((x * c + y * s) / rx) ** 2 + ((-x * s + y * c) / ry) ** 2 <= 1.0


def cross_section(rng: np.random.Generator) -> np.ndarray:
    """A CT- or MR-like axial slice: an elliptical body on a dark background with organs,
    bone rings and texture (random Shepp-Logan-style phantoms)."""
    side = int(rng.integers(128, 640))
    h = w = side
    a = np.zeros((h, w), np.float32)
    cx, cy = w / 2 + rng.normal(0, w * 0.03), h / 2 + rng.normal(0, h * 0.03)
    rx, ry = w * rng.uniform(0.3, 0.47), h * rng.uniform(0.25, 0.47)
    body = _ellipse_mask(h, w, cx, cy, rx, ry, rng.normal(0, 0.1))
    a[body] = rng.uniform(0.3, 0.6)
    if rng.random() < 0.6:  # skull / rib ring
        inner = _ellipse_mask(h, w, cx, cy, rx * 0.92, ry * 0.92, 0)
        a[body & ~inner] = rng.uniform(0.8, 1.0)
    for _ in range(int(rng.integers(3, 14))):
        m = _ellipse_mask(
            h, w, cx + rng.normal(0, rx * 0.4), cy + rng.normal(0, ry * 0.4), rx * rng.uniform(0.05, 0.4),
            ry * rng.uniform(0.05, 0.4), rng.uniform(0, np.pi),
        )
        a[m & body] = rng.uniform(0.0, 1.0)
    if rng.random() < 0.5:  # CT table
        a[int(min(h - 3, cy + ry + 5)) : int(min(h, cy + ry + 12)), int(w * 0.1) : int(w * 0.9)] = rng.uniform(0.3, 0.7)
    a = _blur((np.clip(a, 0, 1) * 255).astype(np.uint8), rng.uniform(0.5, 3)).astype(np.float32) / 255
    a = a + rng.normal(0, rng.uniform(0.0, 0.05), a.shape) * (a > 0.05)
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


#: The generators by category name (the guard's fit and tests use these names).
GENERATORS: dict[str, Generator] = {
    "noise": noise,
    "smooth_noise": smooth_noise,
    "blank": blank,
    "gradient": gradient,
    "pattern": pattern,
    "document": document,
    "screenshot": screenshot,
    "chart": chart,
    "shapes": shapes,
    "cross_section": cross_section,
    "logo": logo,
}


def generate(category: str, seed: int) -> np.ndarray:
    """One generated image of ``category`` (a :data:`GENERATORS` key), reproducible by ``seed``.

    Args:
        category: generator name.
        seed: random seed.
    """
    return GENERATORS[category](np.random.default_rng(seed))


def encode(arr: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    """Encode a ``uint8`` array as PNG or JPEG bytes (what a user would upload).

    Args:
        arr: ``(H, W)`` or ``(H, W, 3)`` uint8 array.
        fmt: ``"PNG"`` or ``"JPEG"``.
        quality: JPEG quality.
    """
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()
