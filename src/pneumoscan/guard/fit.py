"""Fitting and measuring the not-a-chest-X-ray guard (``pneumoscan guard fit``).

Chest X-rays come from the Kermany data (``chest_xray_224/train`` split by patient into a fit
part and a held-out part, ``chest_xray_224/val``, ``chest_xray_fullres``). Images that are not
chest X-rays come from what is available offline:

* photographs, textures, microscopy, text and phantoms bundled with scikit-image
  (``skimage.data``), scikit-learn (``load_sample_images``) and matplotlib (sample data);
* CT, MR, NM and ultrasound slices bundled with pydicom (as plain images: DICOM files
  themselves are already refused by their Modality);
* generated images (:mod:`pneumoscan.guard.synth`): noise, blank, gradients, patterns,
  documents, UI screenshots, charts, shapes, CT/MR-like cross-sections;

each source also heavily augmented (crops, rotations, greyscale, gamma, inversion, blur,
noise, rescaling, JPEG). Every image goes through the real reader
(:func:`pneumoscan.data.io.read_image_with_meta` on encoded bytes), as in ``predict``.

Evaluation uses only images not used to fit: held-out patients and the official validation
images for chest X-rays; other *source images* (not just other augmentations) and other
generator seeds for the rest. scikit-image is needed here only (``pip install scikit-image``),
never to run the guard.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageFilter

from ..data.io import read_image_with_meta, to_uint8
from ..data.patients import parse_patient_id
from ..errors import ConfigError, DataError, PneumoscanError
from ..utils.io import atomic_write_text
from .core import FORMAT, DEFAULT_RULES, Guard
from .features import feature_names, image_features, template_features, thumbnail
from .synth import GENERATORS, encode

log = logging.getLogger(__name__)

#: Reduced-size decoding used while fitting, as ``predict`` does for a 224-px model.
READ_MAX_SIDE = 224

#: Bundled real images that are not chest X-rays, with the split they belong to. Whole
#: source images are held out, so the evaluation never sees an augmentation of a fitted image.
FIT_SOURCES = (
    "skimage:astronaut", "skimage:camera", "skimage:coffee", "skimage:coins", "skimage:moon", "skimage:hubble_deep_field",
    "skimage:retina", "skimage:text", "skimage:brick", "skimage:grass", "skimage:binary_blobs", "skimage:horse",
    "skimage:logo", "skimage:cell", "skimage:lfw_subset", "skimage:shepp_logan_phantom",
    "pydicom:693_J2KI.dcm", "pydicom:CT_small.dcm", "pydicom:examples_overlay.dcm", "pydicom:liver_1frame.dcm",
    "pydicom:image_dfl.dcm",
)
EVAL_SOURCES = (
    "skimage:chelsea", "skimage:rocket", "skimage:immunohistochemistry", "skimage:page", "skimage:clock",
    "skimage:gravel", "skimage:microaneurysms", "skimage:colorwheel", "skimage:stereo_motorcycle", "skimage:checkerboard",
    "sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg", "matplotlib:Minduka_Present_Blue_Pack.png",
    "matplotlib:s1045.ima.gz",
    "pydicom:J2K_pixelrep_mismatch.dcm", "pydicom:MR_small.dcm", "pydicom:JPEG2000.dcm", "pydicom:examples_jpeg2k.dcm",
    "pydicom:examples_rgb_color.dcm",
)
#: Category of each bundled source (for the report).
SOURCE_CATEGORY = {
    "skimage:text": "document", "skimage:page": "document", "skimage:shepp_logan_phantom": "ct_mr_slice",
    "skimage:binary_blobs": "pattern", "skimage:checkerboard": "pattern", "skimage:logo": "graphic",
    "skimage:colorwheel": "graphic", "skimage:horse": "graphic", "skimage:brick": "texture", "skimage:grass": "texture",
    "skimage:gravel": "texture", "skimage:cell": "microscopy", "skimage:immunohistochemistry": "microscopy",
    "skimage:microaneurysms": "microscopy", "skimage:retina": "medical_photo", "matplotlib:s1045.ima.gz": "ct_mr_slice",
    "matplotlib:Minduka_Present_Blue_Pack.png": "graphic", "pydicom:image_dfl.dcm": "pattern",
}


@dataclass
class Item:
    """One image of the guard's fit or evaluation set.

    Attributes:
        label: 1 = chest X-ray, 0 = not.
        category: report group (``cxr_heldout``, ``photo``, ``document``, ...).
        split: ``"fit"`` or ``"eval"``.
        source: the source image or generator (for grouping).
        load: returns ``(bytes, name)`` of the encoded image.
    """

    label: int
    category: str
    split: str
    source: str
    load: Callable[[], tuple[bytes, str]]


# ----------------------------------------------------------------------------- sources
def _require_skimage() -> Any:
    try:
        import skimage.data as skd
    except ImportError as e:
        raise ConfigError("fitting the guard needs scikit-image (pip install 'pneumoscan[guard]' or scikit-image)") from e
    return skd


@functools.lru_cache(maxsize=64)
def load_source(key: str) -> np.ndarray:
    """A bundled non-chest image as ``uint8`` (greyscale or RGB).

    Args:
        key: ``library:name`` as in :data:`FIT_SOURCES` / :data:`EVAL_SOURCES`.
    """
    lib, name = key.split(":", 1)
    if lib == "skimage":
        skd = _require_skimage()
        a = getattr(skd, name)()
        if isinstance(a, tuple):
            a = a[0]
        if name == "lfw_subset":  # 200 tiny faces: a mosaic of 8x8 of them
            a = np.concatenate([np.concatenate(list(a[r * 8 : r * 8 + 8]), axis=1) for r in range(8)], axis=0)
    elif lib == "sklearn":
        from sklearn.datasets import load_sample_image

        a = load_sample_image(name)
    elif lib == "matplotlib":
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / name
        if name.endswith(".ima.gz"):
            a = np.frombuffer(gzip.open(p).read(), ">u2").reshape(256, 256).astype(np.float64)
        else:
            a = np.asarray(Image.open(p).convert("RGB"))
    elif lib == "pydicom":
        import pydicom

        p = Path(pydicom.__file__).parent / "data" / "test_files" / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g, _ = read_image_with_meta(p)
        a = g
    else:
        raise ConfigError(f"unknown source {key}")
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def _bytes_of(arr: np.ndarray, rng: np.random.Generator, allow16: bool = False) -> tuple[bytes, str]:
    if allow16 and arr.ndim == 2 and rng.random() < 0.15:  # 16-bit PNG, as exported from PACS
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint16) * 257).save(buf, format="PNG")
        return buf.getvalue(), "x.png"
    if rng.random() < 0.5:
        return encode(arr, "JPEG", int(rng.integers(60, 96))), "x.jpg"
    return encode(arr, "PNG"), "x.png"


# ----------------------------------------------------------------------------- augmentation
def _gamma(a: np.ndarray, g: float) -> np.ndarray:
    lut = (np.linspace(0, 1, 256) ** g * 255).astype(np.uint8)
    return lut[a]


def augment_cxr(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible variant of a chest X-ray (other scanners, exports, positioning): small
    crop/zoom, rotation, gamma/contrast, blur, noise, black or white borders, aspect change.

    Args:
        a: ``uint8`` greyscale image.
        rng: random generator.
    """
    im = Image.fromarray(a if a.ndim == 2 else a.mean(axis=2).astype(np.uint8))
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.6:
        im = im.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=int(rng.choice([0, 0, 255])))
    side = int(rng.integers(160, 1200))
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.8))))
    im = im.resize((side, max(64, int(side / aspect))), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    out = _gamma(np.asarray(im), float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))))
    if rng.random() < 0.3:
        lo, hi = rng.uniform(0, 40), rng.uniform(215, 255)
        out = (lo + out.astype(np.float32) * (hi - lo) / 255).astype(np.uint8)
    if rng.random() < 0.25:
        out = np.clip(out + rng.normal(0, rng.uniform(1, 6), out.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.15:  # letterbox / collimator borders
        hh, ww = out.shape
        pad = int(min(hh, ww) * rng.uniform(0.02, 0.1))
        canvas = np.full((hh + 2 * pad, ww + 2 * pad), int(rng.choice([0, 255])), np.uint8)
        canvas[pad : pad + hh, pad : pad + ww] = out
        out = canvas
    return out


def augment_other(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A heavily altered variant of a non-chest image: crop, rotation, flip, greyscale,
    gamma, inversion, blur, noise, rescaling.

    Args:
        a: ``uint8`` greyscale or RGB image.
        rng: random generator.
    """
    im = Image.fromarray(a)
    w, h = im.size
    s = rng.uniform(0.35, 1.0)
    cw, ch = max(16, int(w * s * rng.uniform(0.8, 1.2))), max(16, int(h * s * rng.uniform(0.8, 1.2)))
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        im = im.rotate(float(rng.choice([90, 180, 270]) + rng.uniform(-10, 10)), expand=True)
    if rng.random() < 0.6 and im.mode != "L":
        im = im.convert("L")
    side = int(rng.integers(96, 1000))
    im = im.resize((side, max(48, int(side * rng.uniform(0.6, 1.6)))), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 4))))
    out = _gamma(np.asarray(im), float(np.exp(rng.uniform(np.log(0.4), np.log(2.5)))))
    if rng.random() < 0.15:
        out = 255 - out
    if rng.random() < 0.3:
        out = np.clip(out + rng.normal(0, rng.uniform(2, 20), out.shape), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- item lists
def _patient_bucket(path: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{parse_patient_id(path)}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32


def _file_loader(path: Path) -> Callable[[], tuple[bytes, str]]:
    return lambda: (path.read_bytes(), str(path))


def _aug_loader(path: Path, seed: int) -> Callable[[], tuple[bytes, str]]:
    def load() -> tuple[bytes, str]:
        rng = np.random.default_rng(seed)
        img, _ = read_image_with_meta(path)
        arr = augment_cxr(to_uint8(img), rng)
        data, name = _bytes_of(arr, rng, allow16=True)
        return data, f"{path.name}~aug{seed}{Path(name).suffix}"

    return load


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png") and p.is_file())


def chest_items(data: Path, fit_fraction: float = 0.35, seed: int = 0, aug_per_image: int = 1, limit: int | None = None) -> list[Item]:
    """Chest X-ray items: a patient-grouped fit part of ``chest_xray_224/train`` (plus
    augmented copies) and ``chest_xray_fullres/train``; the rest of train, ``chest_xray_224/val``
    and ``chest_xray_fullres/val`` held out.

    Args:
        data: the data root holding ``chest_xray_224`` and ``chest_xray_fullres``.
        fit_fraction: share of train patients used to fit.
        seed: seed of the patient split and augmentations.
        aug_per_image: augmented copies of each fit image.
        limit: at most this many train images (quick runs).
    """
    train = _images(data / "chest_xray_224" / "train")
    if not train:
        raise DataError(f"no chest X-rays under {data / 'chest_xray_224' / 'train'}")
    if limit:
        rng = np.random.default_rng(seed)
        train = [train[i] for i in sorted(rng.choice(len(train), min(limit, len(train)), replace=False))]
    items: list[Item] = []
    for i, p in enumerate(train):
        fit = _patient_bucket(str(p), seed) < fit_fraction
        items.append(Item(1, "cxr_fit" if fit else "cxr_train_heldout", "fit" if fit else "eval", str(p), _file_loader(p)))
        if fit:
            for k in range(aug_per_image):
                items.append(Item(1, "cxr_fit_augmented", "fit", str(p), _aug_loader(p, seed * 1_000_003 + i * 17 + k)))
        elif i % 10 == 0:  # robustness: altered copies of held-out images (reported apart)
            items.append(Item(1, "cxr_heldout_augmented", "eval", str(p), _aug_loader(p, 700_000_000 + seed * 1_000_003 + i)))
    for p in _images(data / "chest_xray_224" / "val"):
        items.append(Item(1, "cxr_val_224", "eval", str(p), _file_loader(p)))
    for p in _images(data / "chest_xray_fullres" / "train"):
        items.append(Item(1, "cxr_fit", "fit", str(p), _file_loader(p)))
    for p in _images(data / "chest_xray_fullres" / "val"):
        items.append(Item(1, "cxr_fullres_val", "eval", str(p), _file_loader(p)))
    return items


def _source_loader(key: str, seed: int | None) -> Callable[[], tuple[bytes, str]]:
    def load() -> tuple[bytes, str]:
        a = load_source(key)
        rng = np.random.default_rng(0 if seed is None else seed)
        if seed is not None:
            a = augment_other(a, rng)
        data, name = _bytes_of(a, rng)
        return data, f"{key}~{seed}{Path(name).suffix}"

    return load


def _synth_loader(cat: str, seed: int) -> Callable[[], tuple[bytes, str]]:
    def load() -> tuple[bytes, str]:
        rng = np.random.default_rng(seed)
        a = GENERATORS[cat](rng)
        if rng.random() < 0.25:
            a = augment_other(a, rng)
        data, name = _bytes_of(a, rng)
        return data, f"{cat}-{seed}{Path(name).suffix}"

    return load


def other_items(seed: int = 0, n_fit: int = 150, n_eval: int = 60, aug_fit: int = 30, aug_eval: int = 12) -> list[Item]:
    """Non-chest items: bundled images (whole sources held out for evaluation) with augmented
    variants, and generated images (evaluation seeds disjoint from fitting seeds).

    Args:
        seed: base seed.
        n_fit, n_eval: generated images per category for fitting / evaluation.
        aug_fit, aug_eval: augmented variants per bundled source image.
    """
    items: list[Item] = []
    for split, keys, n_aug in (("fit", FIT_SOURCES, aug_fit), ("eval", EVAL_SOURCES, aug_eval)):
        for key in keys:
            lib = key.split(":")[0]
            cat = SOURCE_CATEGORY.get(key, "ct_mr_slice" if lib == "pydicom" else "photo")
            items.append(Item(0, cat, split, key, _source_loader(key, None)))
            for k in range(n_aug):
                s = seed * 7_919 + k + (0 if split == "fit" else 500_000) + int(hashlib.sha256(key.encode()).hexdigest()[:6], 16)
                items.append(Item(0, cat, split, key, _source_loader(key, s)))
    for ci, cat in enumerate(GENERATORS):
        for k in range(n_fit):
            items.append(Item(0, cat, "fit", f"synth:{cat}", _synth_loader(cat, seed * 1_000_000 + ci * 10_000 + k)))
        for k in range(n_eval):
            items.append(Item(0, cat, "eval", f"synth:{cat}", _synth_loader(cat, 900_000_000 + seed * 1_000_000 + ci * 10_000 + k)))
    return items


# ----------------------------------------------------------------------------- featurise
@dataclass
class Row:
    """Features of one item, with the rule decision."""

    item: Item
    feats: dict[str, float] | None
    thumb: np.ndarray | None
    rule: str | None
    reason: str | None


def featurise(items: Iterable[Item], rules_guard: Guard, progress: bool = False) -> list[Row]:
    """Decode every item through the real reader, apply the guard's rules and compute the
    classifier features of the images the rules let through."""
    from tqdm import tqdm

    items = list(items)
    rows: list[Row] = []
    for it in tqdm(items, desc="guard features", disable=not progress, unit="img"):
        try:
            data, name = it.load()
            img, meta = read_image_with_meta(data, max_side=READ_MAX_SIDE, name=name)
        except PneumoscanError as e:
            log.warning("skipping %s: %s", it.source, e)
            continue
        refusal = rules_guard._rules(img, meta)
        if refusal is not None:
            rows.append(Row(it, None, None, refusal[0], refusal[1]))
            continue
        rows.append(Row(it, image_features(img, meta, None), thumbnail(img), None, None))
    return rows


# ----------------------------------------------------------------------------- fit
def _placeholder_guard() -> Guard:
    """A guard whose classifier accepts everything: only its rules are used while fitting."""
    return Guard({"format": FORMAT, "features": [], "mean": [], "scale": [], "coef": [], "intercept": 10.0, "threshold": 0.5})


def fit_guard(
    data: str | Path,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    fit_fraction: float = 0.35,
    target_acceptance: float = 0.995,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the guard's classifier, measure it on held-out images and write its parameters.

    Args:
        data: data root with ``chest_xray_224`` and ``chest_xray_fullres``.
        out: where to write ``guard.json`` (``None``: do not write).
        seed: seed of splits, augmentations and generators.
        fit_fraction: share of ``chest_xray_224/train`` patients used to fit.
        target_acceptance: the threshold is set so that this share of the fitting chest
            X-rays (cross-validated scores) is accepted.
        limit: at most this many ``chest_xray_224/train`` images (quick runs).
        progress: show progress bars.

    Returns:
        The report: acceptance of held-out chest X-rays and refusal of held-out other images,
        overall and per category, and the parameters.
    """
    t0 = time.time()
    data = Path(data)
    if not (data / "chest_xray_224").is_dir():
        raise DataError(f"{data} holds no chest_xray_224/ folder (pass the shared data root)")
    items = chest_items(data, fit_fraction, seed, limit=limit) + other_items(seed)
    rows = featurise(items, _placeholder_guard(), progress)
    report = fit_rows(rows, seed=seed, target_acceptance=target_acceptance)
    report.update({"fit_fraction": fit_fraction, "seconds": round(time.time() - t0, 1)})
    params = report["params"]
    params["fit"] = {
        "command": f"pneumoscan guard fit --data {data} --seed {seed}",
        "cxr_accepted": report["cxr_accepted"], "cxr_n": report["cxr_n"],
        "other_refused": report["other_refused"], "other_n": report["other_n"],
        "per_category": {k: round(v["rate"], 4) for k, v in report["per_category"].items()},
    }
    if out is not None:
        atomic_write_text(out, json.dumps(params, indent=1) + "\n")
        log.info("wrote %s", out)
    return report


def fit_rows(
    rows: list[Row], *, seed: int = 0, target_acceptance: float = 0.995, kind: str = "mlp", hidden: int = 16,
    alpha: float = 1e-2, C: float = 0.3,
) -> dict[str, Any]:
    """Fit the classifier on the ``fit`` rows and measure the whole guard on the ``eval`` rows.

    The threshold is the score that accepts ``target_acceptance`` of the fitting chest X-rays
    in 5-fold cross-validation grouped by patient / source image (clipped to [0.02, 0.9]).

    Args:
        rows: featurised items (:func:`featurise`).
        seed: random state of the network's initialisation (and recorded in the report).
        target_acceptance: share of fitting chest X-rays (cross-validated) to accept.
        kind: ``"mlp"`` (one hidden ReLU layer; the shipped choice: it refuses greyscale
            photographs better at the same acceptance) or ``"logistic"``.
        hidden: hidden units of the MLP.
        alpha: L2 penalty of the MLP.
        C: inverse L2 regularisation strength of the logistic regression.

    Returns:
        The report (see :func:`fit_guard`) with the parameters under ``params``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPClassifier

    if kind not in ("mlp", "logistic"):
        raise ConfigError(f"unknown guard classifier '{kind}' (mlp or logistic)")

    def make() -> Any:
        if kind == "mlp":
            return MLPClassifier((hidden,), alpha=alpha, max_iter=2000, random_state=seed)
        return LogisticRegression(C=C, class_weight="balanced", max_iter=5000)

    names = feature_names()
    train = [r for r in rows if r.item.split == "fit" and r.feats is not None]
    cxr_fit = [r for r in train if r.item.label == 1 and r.item.category == "cxr_fit"]
    if len(cxr_fit) < 20:
        raise DataError("too few chest X-rays to fit the guard")
    template = np.mean([r.thumb for r in cxr_fit], axis=0)
    template = (template - template.mean()) / (template.std() + 1e-6)

    def matrix(rs: list[Row]) -> np.ndarray:
        out_ = np.empty((len(rs), len(names)), np.float64)
        for i, r in enumerate(rs):
            f = {**r.feats, **template_features(r.thumb, template)}  # type: ignore[arg-type]
            out_[i] = [f[n] for n in names]
        return out_

    X = matrix(train)
    y = np.array([r.item.label for r in train])
    groups = np.array([parse_patient_id(r.item.source) if r.item.label else r.item.source for r in train])
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    Xs = (X - mean) / scale
    oof = np.zeros(len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of small folds
        for tr, te in GroupKFold(n_splits=5).split(Xs, y, groups):
            oof[te] = make().fit(Xs[tr], y[tr]).predict_proba(Xs[te])[:, 1]
        model = make().fit(Xs, y)
    pos_oof = np.sort(oof[y == 1])
    threshold = float(np.clip(pos_oof[int((1 - target_acceptance) * len(pos_oof))] - 1e-6, 0.02, 0.9))
    params: dict[str, Any] = {
        "format": FORMAT,
        "classifier": kind,
        "features": names,
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "threshold": threshold,
        "template": np.round(template, 6).tolist(),
        "rules": dict(DEFAULT_RULES),
    }
    if kind == "mlp":
        params.update({
            "hidden_weights": model.coefs_[0].tolist(), "hidden_bias": model.intercepts_[0].tolist(),
            "coef": model.coefs_[1][:, 0].tolist(), "intercept": float(model.intercepts_[1][0]),
        })
    else:
        params.update({"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0])})
    guard = Guard(params)

    # ---------------------------------------------------------------- measure on held-out images
    ev: dict[str, list[int]] = {}
    acc_cxr: list[int] = []
    ref_other: list[int] = []
    by_rule: dict[str, int] = {}
    for r in rows:
        if r.item.split != "eval":
            continue
        if r.feats is None:
            ok = False
            if r.item.label == 0:
                by_rule[r.rule or "?"] = by_rule.get(r.rule or "?", 0) + 1
        else:
            f = {**r.feats, **template_features(r.thumb, template)}  # type: ignore[arg-type]
            ok = guard._score(f) >= threshold
        correct = int(ok) if r.item.label == 1 else int(not ok)
        ev.setdefault(r.item.category, []).append(correct)
        if r.item.category.endswith("_augmented"):
            continue  # altered chest X-rays: reported per category, not in the headline rate
        (acc_cxr if r.item.label == 1 else ref_other).append(correct)
    per_cat = {k: {"n": len(v), "correct": int(sum(v)), "rate": float(np.mean(v))} for k, v in sorted(ev.items())}
    fit_counts: dict[str, int] = {}
    for r in rows:
        if r.item.split == "fit":
            fit_counts[r.item.category] = fit_counts.get(r.item.category, 0) + 1
    report = {
        "cxr_accepted": float(np.mean(acc_cxr)) if acc_cxr else float("nan"),
        "cxr_n": len(acc_cxr),
        "other_refused": float(np.mean(ref_other)) if ref_other else float("nan"),
        "other_n": len(ref_other),
        "per_category": per_cat,
        "refused_by_rule": by_rule,
        "fit_counts": fit_counts,
        "fit_oof_cxr_accepted": float((pos_oof >= threshold).mean()),
        "fit_oof_other_refused": float((oof[y == 0] < threshold).mean()),
        "threshold": threshold,
        "classifier": kind,
        "seed": seed,
        "params": params,
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """The fit report as text (per-category rates on held-out images)."""
    lines = [
        f"held-out chest X-rays accepted: {report['cxr_accepted']:.2%} of {report['cxr_n']} (unaltered images)",
        f"held-out other images refused:  {report['other_refused']:.2%} of {report['other_n']}",
        f"(threshold {report['threshold']:.3f}; cross-validated on the fit set: "
        f"{report['fit_oof_cxr_accepted']:.2%} chest accepted, {report['fit_oof_other_refused']:.2%} other refused)",
        "",
        f"{'category':<22}{'n':>6}  {'correct':>8}",
    ]
    for k, v in report["per_category"].items():
        what = "accepted" if k.startswith("cxr") else "refused"
        lines.append(f"{k:<22}{v['n']:>6}  {v['rate']:>8.2%} {what}")
    rules = report.get("refused_by_rule") or {}
    if rules:
        lines.append("")
        lines.append("held-out other images refused by a rule before the classifier: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())))
    return "\n".join(lines)


def default_data_root() -> Path | None:
    """``$PNEUMOSCAN_DATA`` or ``../shared/data`` beside the working directory, if present."""
    for cand in (os.environ.get("PNEUMOSCAN_DATA"), "../shared/data"):
        if cand and (Path(cand) / "chest_xray_224").is_dir():
            return Path(cand)
    return None
