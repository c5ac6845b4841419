"""The shipped guard accepts chest films as other hospitals make them and still refuses what
is not a chest X-ray.

A small, seeded, held-out set: the committed fixture chest X-rays that the guard was not
fitted on (``tests/fixtures/xray/val`` and the ``tests/fixtures/fullres`` image from
``chest_xray_fullres/val``), each transformed by
every family of :mod:`pneumoscan.workflows.guard_transforms` (letterboxing, rotation, tight
crops, wide fields, exposure, lines and electrodes, markers and text, noise and blur,
inversion, 16-bit storage, ICU mixes) with the held-out parameter profile and seeds that
neither ``guard fit`` nor its evaluation use; and generated non-X-rays, also padded or
inverted. Everything goes through the real reader as encoded bytes, as in ``predict``.
Where the shared data are present (``../shared/data``), 32 held-out images of
``chest_xray_224/val`` and ``chest_xray_fullres/val`` are checked the same way.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.core.imaging import to_uint8
from pneumoscan.data.io import read_image_with_meta
from pneumoscan.guard import Guard
from pneumoscan.guard.canonical import content_box
from pneumoscan.guard.features import image_features
from pneumoscan.workflows.guard_synth import GENERATORS, encode, generate
from pneumoscan.workflows.guard_transforms import FAMILIES, HELD_OUT, letterbox, transform_cxr

#: Seeds far from those ``guard fit`` uses for fitting (< 10⁹) and evaluation (7·10⁸ + ...).
SEED = 3_000_000_000
#: Fixture images that ``guard fit`` fits on (``chest_xray_fullres/train``): not held out.
FITTED = {"person1003_virus_1685.jpeg"}


@pytest.fixture(scope="module")
def heldout_xrays(xray_dir: Path, fullres_dir: Path) -> list[np.ndarray]:
    """The fixture chest X-rays outside the guard's fitting set, as uint8 arrays."""
    files = sorted((xray_dir / "val").rglob("*.jpeg")) + sorted(fullres_dir.glob("*.jpeg"))
    return [to_uint8(read_image_with_meta(f, max_side=512)[0]) for f in files if f.name not in FITTED]


def _check(data: bytes, name: str):
    img, meta = read_image_with_meta(data, max_side=224, name=name)
    return Guard.default().check(img, meta)


def test_transformed_chest_films_are_accepted(heldout_xrays: list[np.ndarray]) -> None:
    t0 = time.process_time()
    refused: dict[str, list[str]] = {}
    n = 0
    for fi, family in enumerate(FAMILIES):
        for i, a in enumerate(heldout_xrays):
            rng = np.random.default_rng(SEED + 1_000 * fi + i)
            data, name = transform_cxr(a, family, rng, HELD_OUT)
            r = _check(data, name)
            n += 1
            if not r.ok:
                refused.setdefault(family, []).append(f"{i}: {r.reason}")
    misses = sum(len(v) for v in refused.values())
    assert misses <= 0.03 * n, refused  # the fit's held-out target is 98 %
    assert all(len(v) <= 1 for v in refused.values()), refused  # no family systematically refused
    assert time.process_time() - t0 < 15  # CPU seconds: about 2 on an idle core


def test_held_out_shared_films_are_accepted_in_every_family(shared_dir: Path | None) -> None:
    """32 held-out films of the shared data (``chest_xray_224/val``, ``chest_xray_fullres/val``),
    8 per family and each family on other films: at most one refusal per family, 97 % overall."""
    if shared_dir is None:
        pytest.skip("../shared/data is not present")
    files = sorted((shared_dir / "chest_xray_224" / "val").rglob("*.jpeg")) + sorted((shared_dir / "chest_xray_fullres" / "val").rglob("*.jpeg"))
    if len(files) < 16:
        pytest.skip("too few held-out images in ../shared/data")
    films = [to_uint8(read_image_with_meta(f, max_side=512)[0]) for f in files]
    refused: dict[str, list[str]] = {}
    n = 0
    for fi, family in enumerate(FAMILIES):
        for k in range(8):
            i = (fi * 8 + k) % len(films)
            data, name = transform_cxr(films[i], family, np.random.default_rng(SEED + 500_000 + 1_000 * fi + k), HELD_OUT)
            r = _check(data, name)
            n += 1
            if not r.ok:
                refused.setdefault(family, []).append(f"{files[i].name}: {r.reason}")
    assert sum(len(v) for v in refused.values()) <= 0.03 * n, refused
    assert all(len(v) <= 1 for v in refused.values()), refused


@pytest.mark.parametrize("category", sorted(GENERATORS))
def test_generated_non_xrays_are_refused(category: str) -> None:
    results = [_check(encode(generate(category, SEED + k)), f"{category}.png") for k in range(6)]
    refused = [r for r in results if not r.ok]
    assert len(refused) >= 5, [r.to_dict() for r in results]  # at most one miss in six
    for r in refused:
        assert r.reason and "\n" not in r.reason and r.rule


def test_padded_and_inverted_non_xrays_are_refused() -> None:
    """Cropping uniform borders and matching the polarity must not open a door: letterboxed
    or inverted documents, screenshots, charts and CT/MR-like slices stay refused."""
    outcomes = []
    for k, category in enumerate(("document", "screenshot", "chart", "cross_section", "shapes", "noise")):
        for j in range(3):
            rng = np.random.default_rng(SEED + 50_000 + 10 * k + j)
            a = generate(category, SEED + 60_000 + 10 * k + j)
            grey = a if a.ndim == 2 else a.mean(axis=2).astype(np.uint8)
            variant = letterbox(grey, rng, HELD_OUT) if j != 1 else 255 - grey
            outcomes.append(_check(encode(variant), f"{category}-{j}.png").ok)
    assert sum(outcomes) <= 1, outcomes


def test_reasons_are_honest(heldout_xrays: list[np.ndarray]) -> None:
    """Each refusal says what was measured: colour, no contrast, the size of the content, or
    the classifier's score; a 12-bit film in a 16-bit PNG is not 'blank'."""
    yy, xx = np.mgrid[0:300, 0:400]
    rgb = np.stack([xx * 255 // 400, yy * 255 // 300, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    r = _check(encode(rgb), "colour.png")
    assert r.rule == "colour" and r.reason.startswith("does not look like a frontal chest X-ray (colour image: "), r
    r = _check(encode(np.full((400, 300), 30, np.uint8)), "flat.png")
    assert r.rule == "blank" and r.reason == "does not look like a frontal chest X-ray (blank image: no contrast)", r
    speck = np.zeros((600, 600), np.uint8)
    speck[270:322, 268:326] = np.random.default_rng(0).integers(0, 255, (52, 58))
    r = _check(encode(speck), "speck.png")
    assert r.rule == "too_small" and "inside uniform borders of a 600x600 image" in r.reason, r
    doc = _check(encode(generate("document", SEED)), "doc.png")
    assert doc.rule == "classifier" and doc.reason.startswith("does not look like a frontal chest X-ray (guard score"), doc
    film12 = heldout_xrays[0].astype(np.uint16) * 16  # 12-bit data, 0..4080 of 65535
    buf = io.BytesIO()
    Image.fromarray(film12).save(buf, format="PNG")
    assert _check(buf.getvalue(), "film16.png").ok
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 300), 2000, np.uint16)).save(buf, format="PNG")
    assert _check(buf.getvalue(), "flat16.png").rule == "blank"


def test_letterbox_is_cropped_before_the_features(heldout_xrays: list[np.ndarray]) -> None:
    a = heldout_xrays[0]
    h, w = a.shape
    padded = np.zeros((h + 60, w + 200), np.uint8)
    padded[30 : 30 + h, 100 : 100 + w] = a
    y0, y1, x0, x1 = content_box(padded.astype(np.float32) / 255)
    assert abs(y0 - 30) <= 2 and abs(y1 - 30 - h) <= 2 and abs(x0 - 100) <= 2 and abs(x1 - 100 - w) <= 2
    g = Guard.default()
    f0 = image_features(a.astype(np.float32) / 255, {}, g.template)
    f1 = image_features(padded.astype(np.float32) / 255, {}, g.template)
    assert abs(g._score(f0) - g._score(f1)) < 0.05


def test_guard_is_fast(heldout_xrays: list[np.ndarray]) -> None:
    g = Guard.default()
    imgs = [read_image_with_meta(encode(a), max_side=224) for a in heldout_xrays]
    g.check(*imgs[0])
    t0 = time.process_time()  # CPU time of this process: busy neighbours do not count
    for img, meta in imgs * 5:
        g.check(img, meta)
    per_image_ms = (time.process_time() - t0) / (5 * len(imgs)) * 1000
    assert per_image_ms < 50, per_image_ms  # about 2 ms on an idle core; generous for busy CI
