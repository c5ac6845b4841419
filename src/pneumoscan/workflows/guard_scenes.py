"""Generated photograph-like scenes that are *not* chest X-rays, for fitting the guard.

A handful of bundled photographs is too few to teach the guard what a photograph is: the
classifier can learn those few pictures instead of the class. These generators make many
photo-like images, seeded and reproducible, from two ingredients:

* **the fitting photographs only** (:data:`~pneumoscan.workflows.guard_sources.FIT_SOURCES`;
  the held-out ones are never passed in): random crops at several scales, rotations and
  perspectives, collages of them with soft-edged occluding pieces, and a sharp subject in
  front of a defocused background (macro and portrait photography);
* **natural-image statistics**: a 1/f ("pink") texture background with a perspective ground
  ramp or a horizon, and occluding objects (ellipses, polygons, star- and petal-shaped
  outlines) each with its own 1/f texture, shading and hard or soft edges.

Every scene then gets what cameras and users do to photographs: vignetting, depth-of-field
blur, gamma, sensor noise and, most of the time, greyscale conversion (colour photographs
are already refused by the colour rule; the greyscale ones are the hard case).

Only numpy and Pillow are needed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("crop", "collage", "subject", "natural")


def _size(rng: np.random.Generator) -> tuple[int, int]:
    w = int(rng.integers(180, 800))
    aspect = float(np.exp(rng.uniform(np.log(0.66), np.log(1.6))))
    return w, int(np.clip(w / aspect, 140, 900))


def pink_noise(rng: np.random.Generator, h: int, w: int, exponent: float | None = None) -> np.ndarray:
    """A 1/f^β texture in [0, 1] (natural images have a power spectrum near β = 2).

    Args:
        rng: random generator.
        h, w: size.
        exponent: spectral exponent β of the power (default: random in 1.4-2.6).
    """
    beta = float(rng.uniform(1.4, 2.6)) if exponent is None else exponent
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (beta / 2)
    spec[0, 0] = 0
    a = np.fft.irfft2(spec, s=(h, w))
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-9)


def _crop(src: np.ndarray, rng: np.random.Generator, out: tuple[int, int], lo: float = 0.15) -> Image.Image:
    """A random crop of ``src`` (scale ``lo``-1 of its side), rotated and sometimes in
    perspective, resized to ``out`` (w, h)."""
    im = Image.fromarray(src).convert("RGB")
    w, h = im.size
    s = float(np.exp(rng.uniform(np.log(lo), 0)))
    cw, ch = max(16, int(w * s)), max(16, int(h * s * rng.uniform(0.75, 1.33)))
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    r = rng.random()
    if r < 0.2:
        im = im.rotate(float(rng.choice([90, 180, 270])), expand=True)
    elif r < 0.6:  # a tilted camera: rotate and crop back inside the picture
        ang = float(rng.uniform(-30, 30))
        big = im.rotate(ang, resample=Image.Resampling.BILINEAR, expand=False)
        k = 1 / (abs(np.cos(np.radians(ang))) + abs(np.sin(np.radians(ang))))
        bw, bh = big.size
        im = big.crop((int(bw * (1 - k) / 2), int(bh * (1 - k) / 2), int(bw * (1 + k) / 2), int(bh * (1 + k) / 2)))
    if rng.random() < 0.3:  # perspective: a keystone distortion of the plane
        bw, bh = im.size
        d = rng.uniform(0, 0.2, 4)
        quad = (bw * d[0], bh * d[1] * 0.5, 0, bh - 1, bw - 1, bh - 1, bw * (1 - d[2]), bh * d[3] * 0.5)
        im = im.transform((bw, bh), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)
    return im.resize(out, Image.Resampling.BILINEAR)


def _soft_mask(rng: np.random.Generator, w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    """An ellipse, polygon or star/petal outline inside ``box`` as an ``L`` mask, hard or feathered."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    kind = rng.integers(3)
    if kind == 0:
        d.ellipse(box, fill=255)
    else:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        n = int(rng.integers(3, 9)) if kind == 1 else int(rng.integers(24, 90))
        th = np.sort(rng.uniform(0, 2 * np.pi, n)) if kind == 1 else np.linspace(0, 2 * np.pi, n, endpoint=False)
        if kind == 1:
            rad = rng.uniform(0.5, 1.0, n)
        else:  # star or petals: r(θ) = 1 - a (1 - |cos(k θ / 2)|^p)
            k, amp, p = int(rng.integers(4, 14)), rng.uniform(0.2, 0.7), rng.uniform(0.5, 3)
            rad = 1 - amp * (1 - np.abs(np.cos(k * th / 2)) ** p)
        d.polygon([(float(cx + rx * r * np.cos(t)), float(cy + ry * r * np.sin(t))) for t, r in zip(th, rad)], fill=255)
    if rng.random() < 0.5:
        m = m.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 8))))
    return m


def _box(rng: np.random.Generator, w: int, h: int, centred: bool = False) -> tuple[int, int, int, int]:
    s = rng.uniform(0.35, 0.8) if centred else rng.uniform(0.1, 0.5)
    bw, bh = max(8, int(w * s * rng.uniform(0.7, 1.3))), max(8, int(h * s * rng.uniform(0.7, 1.3)))
    if centred:
        cx, cy = w / 2 + rng.normal(0, 0.06) * w, h / 2 + rng.normal(0, 0.06) * h
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    return int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2)


def _textured(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A 1/f-textured, shaded RGB patch (an object's surface)."""
    t = pink_noise(rng, h, w) * rng.uniform(0.2, 0.8) + rng.uniform(0, 0.6)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    t = t + rng.uniform(-0.4, 0.4) * (xx - 0.5) + rng.uniform(-0.4, 0.4) * (yy - 0.5)  # light from one side
    tint = rng.uniform(0.6, 1.2, 3)
    return Image.fromarray((np.clip(t[..., None] * tint, 0, 1) * 255).astype(np.uint8))


def _natural(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    bg = pink_noise(rng, h, w)
    yy = np.linspace(0, 1, h)[:, None]
    if rng.random() < 0.5:  # a horizon: sky above, textured ground with a perspective ramp below
        hz = rng.uniform(0.2, 0.7)
        sky = rng.uniform(0.5, 1.0) - 0.3 * yy + 0.1 * bg
        ground = bg * rng.uniform(0.4, 1.0) * (0.5 + (yy - hz)) + rng.uniform(0, 0.3)
        bg = np.where(yy < hz, sky, ground)
    else:
        bg = bg * rng.uniform(0.5, 1.0) + rng.uniform(-0.3, 0.3) * (yy - 0.5)
    tint = rng.uniform(0.6, 1.2, 3)
    im = Image.fromarray((np.clip(np.broadcast_to(bg, (h, w))[..., None] * tint, 0, 1) * 255).astype(np.uint8))
    for _ in range(int(rng.integers(1, 9))):  # occluding objects, far to near
        box = _box(rng, w, h, centred=rng.random() < 0.25)
        im.paste(_textured(rng, w, h), (0, 0), _soft_mask(rng, w, h, box))
    return im


def photo_scene(rng: np.random.Generator, sources: Sequence[np.ndarray]) -> np.ndarray:
    """One photograph-like scene (``uint8``, greyscale most of the time, else RGB).

    Args:
        rng: random generator.
        sources: ``uint8`` photographs to crop from (the *fitting* sources only).
    """
    w, h = _size(rng)
    kind = KINDS[int(rng.integers(len(KINDS)))] if sources else "natural"
    pick = lambda: sources[int(rng.integers(len(sources)))]  # noqa: E731
    if kind == "crop":  # down to a close-up of one detail
        im = _crop(pick(), rng, (w, h), lo=0.06)
    elif kind == "collage":
        im = _crop(pick(), rng, (w, h), lo=0.3)
        for _ in range(int(rng.integers(1, 5))):
            im.paste(_crop(pick(), rng, (w, h)), (0, 0), _soft_mask(rng, w, h, _box(rng, w, h)))
    elif kind == "subject":  # a sharp subject on a defocused background
        bg = _crop(pick(), rng, (w, h), lo=0.3) if rng.random() < 0.6 else _natural(rng, w, h)
        im = bg.filter(ImageFilter.GaussianBlur(float(rng.uniform(3, 14))))
        fg = _crop(pick(), rng, (w, h)) if rng.random() < 0.6 else _textured(rng, w, h)
        im.paste(fg, (0, 0), _soft_mask(rng, w, h, _box(rng, w, h, centred=True)))
    else:
        im = _natural(rng, w, h)
    if rng.random() < 0.4:  # out of focus, a soft lens or camera shake: from slight to heavy
        im = im.filter(ImageFilter.GaussianBlur(float(np.exp(rng.uniform(np.log(0.5), np.log(12))))))
    a = np.asarray(im).astype(np.float64) / 255
    if rng.random() < 0.5:  # vignetting
        yy, xx = np.mgrid[0:h, 0:w]
        r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
        a = a * np.clip(1 - rng.uniform(0.2, 0.7) * r2 / 2, 0, 1)[..., None]
    a = np.clip(a, 0, 1) ** float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    if rng.random() < 0.4:
        a = a + rng.normal(0, rng.uniform(0.005, 0.04), a.shape)
    out = (np.clip(a, 0, 1) * 255).astype(np.uint8)
    if rng.random() < 0.8:
        out = np.asarray(Image.fromarray(out).convert("L"))
    return np.ascontiguousarray(out)
