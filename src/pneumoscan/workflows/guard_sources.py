"""The images the not-a-chest-X-ray guard is fitted and measured on (``pneumoscan guard fit``).

Chest X-rays come from the Kermany data (``chest_xray_224/train`` split by patient into a fit
part and a held-out part, ``chest_xray_224/val``, ``chest_xray_fullres``). Images that are not
chest X-rays come from what is available offline:

* photographs, textures, microscopy, text and phantoms bundled with scikit-image
  (``skimage.data``), scikit-learn (``load_sample_images``) and matplotlib (sample data,
  with two elevation maps);
* CT, MR, NM and ultrasound slices bundled with pydicom (as plain images: DICOM files
  themselves are already refused by their Modality);
* generated images (:mod:`pneumoscan.workflows.guard_synth`): noise, blank, gradients,
  patterns, documents, UI screenshots, charts, shapes, CT/MR-like cross-sections;
* photograph-like scenes (:mod:`pneumoscan.workflows.guard_scenes`) cut from the fitting
  photographs only, and scenes with natural-image statistics;

each source also heavily augmented (crops, rotations, greyscale, gamma, inversion, blur,
noise, borders, rescaling, JPEG). Chest X-rays are transformed to imitate other hospitals'
films (:mod:`pneumoscan.workflows.guard_transforms`: letterboxing, rotation, tight crops,
wide fields, exposure, lines and electrodes, markers and text, noise, inversion, 16 bits):
the fitting set with the ``FIT`` profile, and held-out patients' images, per family, with
the ``HELD_OUT`` profile and other seeds. Each :class:`Item` loads as encoded bytes, so
fitting reads it through the real reader, as ``predict`` does
(:mod:`pneumoscan.workflows.guard_fit`).

Whole source images (not just augmentations) and generator seeds are split between fitting
and evaluation. scikit-image is needed here only (``pip install scikit-image``), never to run
the guard.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

from ..core.imaging import to_uint8
from ..data.io import read_image_with_meta
from ..data.patients import parse_patient_id
from ..errors import ConfigError, DataError
from .guard_scenes import photo_scene
from .guard_synth import GENERATORS, encode
from .guard_transforms import FAMILIES, FIT, HELD_OUT, letterbox, transform_cxr

#: Bundled real images that are not chest X-rays, with the split they belong to. Whole
#: source images are held out, so the evaluation never sees an augmentation of a fitted image.
FIT_SOURCES = (
    "skimage:astronaut", "skimage:camera", "skimage:coffee", "skimage:coins", "skimage:moon", "skimage:hubble_deep_field",
    "skimage:retina", "skimage:text", "skimage:brick", "skimage:grass", "skimage:binary_blobs", "skimage:horse",
    "skimage:logo", "skimage:cell", "skimage:lfw_subset", "skimage:shepp_logan_phantom",
    "pydicom:693_J2KI.dcm", "pydicom:CT_small.dcm", "pydicom:examples_overlay.dcm", "pydicom:liver_1frame.dcm",
    "pydicom:image_dfl.dcm", "pydicom:examples_palette.dcm", "matplotlib:jacksboro_fault_dem.npz",
)
EVAL_SOURCES = (
    "skimage:chelsea", "skimage:rocket", "skimage:immunohistochemistry", "skimage:page", "skimage:clock",
    "skimage:gravel", "skimage:microaneurysms", "skimage:colorwheel", "skimage:stereo_motorcycle", "skimage:checkerboard",
    "sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg", "matplotlib:Minduka_Present_Blue_Pack.png",
    "matplotlib:s1045.ima.gz",
    "pydicom:J2K_pixelrep_mismatch.dcm", "pydicom:MR_small.dcm", "pydicom:JPEG2000.dcm", "pydicom:examples_jpeg2k.dcm",
    "pydicom:examples_rgb_color.dcm", "matplotlib:topobathy.npz", "matplotlib:logo2.png",
)
#: Category of each bundled source (for the report).
SOURCE_CATEGORY = {
    "skimage:text": "document", "skimage:page": "document", "skimage:shepp_logan_phantom": "ct_mr_slice",
    "skimage:binary_blobs": "pattern", "skimage:checkerboard": "pattern", "skimage:logo": "graphic",
    "skimage:colorwheel": "graphic", "skimage:horse": "graphic", "skimage:brick": "texture", "skimage:grass": "texture",
    "skimage:gravel": "texture", "skimage:cell": "microscopy", "skimage:immunohistochemistry": "microscopy",
    "skimage:microaneurysms": "microscopy", "skimage:retina": "medical_photo", "matplotlib:s1045.ima.gz": "ct_mr_slice",
    "matplotlib:Minduka_Present_Blue_Pack.png": "graphic", "pydicom:image_dfl.dcm": "pattern",
    "matplotlib:logo2.png": "graphic", "matplotlib:jacksboro_fault_dem.npz": "elevation_map",
    "matplotlib:topobathy.npz": "elevation_map",
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
        elif name.endswith(".npz"):  # elevation maps: their first array
            with np.load(p) as z:
                a = np.asarray(z[z.files[0]], dtype=np.float64)
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


def _bytes_of(arr: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    if arr.ndim == 2 and rng.random() < 0.1:  # 16-bit PNG: not only chest X-rays come so
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
    if out.ndim == 2 and rng.random() < 0.1:  # padded like a letterboxed film (cropped again by the guard)
        out = letterbox(out, rng, FIT)
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- item lists
def _patient_bucket(path: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{parse_patient_id(path)}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32


def _file_loader(path: Path) -> Callable[[], tuple[bytes, str]]:
    return lambda: (path.read_bytes(), str(path))


def transform_loader(path: Path, family: str, seed: int, profile: dict[str, Any] = HELD_OUT) -> Callable[[], tuple[bytes, str]]:
    """A loader of one transformed copy of a chest X-ray (:func:`transform_cxr`).

    Args:
        path: the chest X-ray file.
        family: the transformation family.
        seed: seed of its random parameters.
        profile: ``FIT`` or ``HELD_OUT``.
    """
    def load() -> tuple[bytes, str]:
        rng = np.random.default_rng(seed)
        img, _ = read_image_with_meta(path)
        data, name = transform_cxr(to_uint8(img), family, rng, profile)
        return data, f"{path.name}~{family}{seed}{Path(name).suffix}"

    return load


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png") and p.is_file())


def chest_items(
    data: Path, fit_fraction: float = 0.35, seed: int = 0, aug_per_image: int = 3, limit: int | None = None,
    per_family: int = 150,
) -> list[Item]:
    """Chest X-ray items: a patient-grouped fit part of ``chest_xray_224/train`` (plus
    transformed copies) and ``chest_xray_fullres/train``; the rest of train, ``chest_xray_224/val``
    and ``chest_xray_fullres/val`` held out, and transformed copies of held-out images.

    Args:
        data: the data root holding ``chest_xray_224`` and ``chest_xray_fullres``.
        fit_fraction: share of train patients used to fit.
        seed: seed of the patient split and transformations.
        aug_per_image: transformed copies of each fit image (families in turn, ``FIT`` profile).
        limit: at most this many train images (quick runs).
        per_family: held-out images transformed by each family (``HELD_OUT`` profile,
            category ``cxr_<family>``; a different image for every family).
    """
    train = _images(data / "chest_xray_224" / "train")
    if not train:
        raise DataError(f"no chest X-rays under {data / 'chest_xray_224' / 'train'}")
    if limit:
        rng = np.random.default_rng(seed)
        train = [train[i] for i in sorted(rng.choice(len(train), min(limit, len(train)), replace=False))]
    items: list[Item] = []
    families = list(FAMILIES)
    heldout: list[Path] = []
    n_fit = 0
    for i, p in enumerate(train):
        fit = _patient_bucket(str(p), seed) < fit_fraction
        items.append(Item(1, "cxr_fit" if fit else "cxr_train_heldout", "fit" if fit else "eval", str(p), _file_loader(p)))
        if not fit:
            heldout.append(p)
            continue
        for k in range(aug_per_image):
            fam = families[(n_fit * aug_per_image + k) % len(families)]
            items.append(Item(1, f"cxr_fit_{fam}", "fit", str(p), transform_loader(p, fam, seed * 1_000_003 + i * 17 + k, FIT)))
        n_fit += 1
    order = np.random.default_rng(700_000_000 + seed).permutation(len(heldout))
    for j, idx in enumerate(order[: per_family * len(families)]):
        fam, p = families[j % len(families)], heldout[idx]
        items.append(Item(1, f"cxr_{fam}", "eval", str(p), transform_loader(p, fam, 700_000_000 + seed * 1_000_003 + j, HELD_OUT)))
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


def fit_photo_keys() -> list[str]:
    """The fitting sources that are photographs (what :func:`photo_scene` crops from; never
    a held-out source)."""
    return [k for k in FIT_SOURCES if k not in EVAL_SOURCES and SOURCE_CATEGORY.get(k, "ct_mr_slice" if k.startswith("pydicom:") else "photo") == "photo"]


def _scene_loader(seed: int) -> Callable[[], tuple[bytes, str]]:
    def load() -> tuple[bytes, str]:
        rng = np.random.default_rng(seed)
        a = photo_scene(rng, [load_source(k) for k in fit_photo_keys()])
        if rng.random() < 0.5:  # and what users do to photographs (crop, blur, noise, borders, ...)
            a = augment_other(a, rng)
        data, name = _bytes_of(a, rng)
        return data, f"photo_scene-{seed}{Path(name).suffix}"

    return load


def other_items(
    seed: int = 0, n_fit: int = 200, n_eval: int = 60, aug_fit: int = 40, aug_eval: int = 12, n_scene_fit: int = 600,
) -> list[Item]:
    """Non-chest items: bundled images (whole sources held out for evaluation) with augmented
    variants, generated images (evaluation seeds disjoint from fitting seeds) and
    photograph-like scenes (:mod:`pneumoscan.workflows.guard_scenes`, built from the fitting
    photographs only: category ``photo_scene``, reported apart from the held-out photographs).

    Args:
        seed: base seed.
        n_fit, n_eval: generated images per category for fitting / evaluation.
        aug_fit, aug_eval: augmented variants per bundled source image.
        n_scene_fit: photograph-like scenes for fitting (``n_eval`` more, other seeds, are
            measured).
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
    for k in range(n_scene_fit):
        items.append(Item(0, "photo_scene", "fit", "synth:photo_scene", _scene_loader(500_000_000 + seed * 1_000_000 + k)))
    for k in range(n_eval):
        items.append(Item(0, "photo_scene", "eval", "synth:photo_scene", _scene_loader(950_000_000 + seed * 1_000_000 + k)))
    return items
