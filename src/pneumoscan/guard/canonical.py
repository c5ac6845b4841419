"""The canonical form of an image for the not-a-chest-X-ray guard.

Chest films come padded, letterboxed, with any window, level, bit depth and size. Before
anything is measured, :func:`prepare` reduces an image to ``WORK_SIDE`` pixels, crops its
uniform borders (:func:`content_box`: black, white or grey bars, frames, even with burnt-in
text in them), resizes the content to a ``SIDE``² square and finds the stretch of its
intensities between their 0.5th and 99.5th percentiles. The guard's rules judge the content's
size, aspect and contrast, and :mod:`pneumoscan.guard.features` measures that square.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.imaging import fit_within, resize_float

#: Side of the square, stretched copy most features are measured on (the models' inputs are
#: stretched squares too).
SIDE = 128
#: Larger images are first reduced to fit this side (the size ``predict`` decodes at for
#: the guard), so that texture statistics do not depend on the resolution of the input.
WORK_SIDE = 224
#: Percentiles the intensities are stretched between (markers, text and wires above the
#: upper one saturate instead of compressing the film).
STRETCH = (0.5, 99.5)
#: A border line (row or column) is cropped when this share of its pixels lies within
#: ``BORDER_TOL`` (of the image's range) of the outermost line's most common level (JPEG
#: ringing and sensor noise included).
BORDER_COVERAGE = 0.97
BORDER_TOL = 0.03
#: Lines of a border holding text are still this much border level, and such lines in a row
#: span at most this share of the side.
BORDER_MOSTLY = 0.6
BORDER_TEXT = 0.08


def _sorted_percentiles(s: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(s, qs)`` (linear interpolation, float64 results) of already sorted
    values ``s``: one sort serves every percentile the guard needs."""
    v = np.asarray(qs, dtype=np.float64) / 100.0 * (s.size - 1)
    lo = np.floor(v).astype(np.intp)
    hi = np.minimum(lo + 1, s.size - 1)
    g = v - lo
    a, b = s[lo].astype(np.float64), s[hi].astype(np.float64)
    d = b - a
    # numpy's _lerp: from below for g < 0.5, from above otherwise (exact at the ends)
    return np.where(g >= 0.5, b - d * (1 - g), a + d * g)


def _border_lines(a: np.ndarray, lo: float, span: float, tol: float, coverage: float) -> tuple[int, int]:
    """``(first, end)``: the rows of ``a`` left after dropping the uniform rows at the top and
    at the bottom. A row is uniform when ``coverage`` of its pixels lie within ``tol`` of the
    outermost row's most common level. A few rows of burnt-in text in such a border (at least
    :data:`BORDER_MOSTLY` border level, at most :data:`BORDER_TEXT` of the side in a row) go
    with it when a uniform row lies further in. Levels are measured on the scale where ``lo``
    is 0 and ``lo + span`` is 1."""
    n, m = a.shape
    k = int(round(tol * 255))
    max_gap = max(3, int(BORDER_TEXT * n))
    depths = []
    for lines in (a, a[::-1]):
        counts = np.bincount(np.clip(np.rint((lines[0] - lo) * (255 / span)), 0, 255).astype(np.intp), minlength=256)
        mode = int(np.argmax(counts))
        depth = 0
        if counts[max(0, mode - k) : mode + k + 1].sum() >= BORDER_MOSTLY * m:  # else: no border here
            level, tol_raw, gap = lo + mode / 255 * span, tol * span, 0
            for start in range(0, n, 16):  # a few rows at a time: borders are usually thin
                share = np.count_nonzero(np.abs(lines[start : start + 16] - level) <= tol_raw, axis=1) / m
                for i, sh in enumerate(share.tolist(), start):
                    if sh >= coverage:
                        depth, gap = i + 1, 0
                    elif sh >= BORDER_MOSTLY and gap < max_gap:
                        gap += 1
                    else:
                        break
                else:
                    continue
                break
        depths.append(depth)
    return depths[0], n - depths[1]


def content_box(img: np.ndarray, tol: float = BORDER_TOL, coverage: float = BORDER_COVERAGE) -> tuple[int, int, int, int]:
    """The box inside uniform borders (letterbox bars, padding, frames of any grey level).

    Args:
        img: 2-D float greyscale image in [0, 1].
        tol: largest difference from a border's level still counted as border, as a share of
            the image's range (12-bit pixels in a 16-bit file are judged like 8-bit ones).
        coverage: share of a row or column's pixels that must be border level.

    Returns:
        ``(y0, y1, x0, x1)``; the whole image when cropping would leave less than 8 % of a
        side (a blank image is blank, not a tiny crop of itself).
    """
    h, w = img.shape
    y0, y1, x0, x1 = 0, h, 0, w
    lo, span = float(img.min()), float(img.max() - img.min())
    if span <= 1e-6:
        return y0, y1, x0, x1
    small_h, small_w = max(2, 0.08 * h), max(2, 0.08 * w)
    for _ in range(2):  # rows, columns, and again (a frame with a text line in a corner)
        before = (y0, y1, x0, x1)
        a, b = _border_lines(img[y0:y1, x0:x1], lo, span, tol, coverage)
        y0, y1 = y0 + a, y0 + max(b, a)
        if y1 - y0 < small_h:
            return 0, h, 0, w
        a, b = _border_lines(img[y0:y1, x0:x1].T, lo, span, tol, coverage)
        x0, x1 = x0 + a, x0 + max(b, a)
        if x1 - x0 < small_w:
            return 0, h, 0, w
        if (y0, y1, x0, x1) == before:
            break
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
    box = content_box(img)
    y0, y1, x0, x1 = box
    sq = resize_float(img[y0:y1, x0:x1], SIDE, SIDE)
    s = np.sort(sq, axis=None)
    lo, hi = (float(v) for v in _sorted_percentiles(s, STRETCH))
    return Prepared(img, box, sq, s, lo, hi)
